"""Balance and spectral losses: values against independent loop formulas, gradients where (and only where) due."""

from __future__ import annotations

import pytest
import torch

from mtlora import inject
from mtlora.config import AdapterConfig
from mtlora.testing import tiny_llama_model
from mtlora_train.losses import (SpectralRegularizer, balance_loss, clear_routing, cross_expert_term,
                                 official_term, spectral_maps)


def _paper_reference(bs: list[torch.Tensor]) -> torch.Tensor:
    """The paper's formula with one SVD per expert and explicit pair loops (independent of the batched code)."""
    primes = []
    for b in bs:
        _, s, vh = torch.linalg.svd(b.detach().double())
        w = torch.exp(-s / s.mean())
        primes.append(b.double() @ (vh.T @ torch.diag(w) @ vh))
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(bs)):
        for j in range(i + 1, len(bs)):
            total = total + (primes[i].T @ primes[j]).pow(2).sum()
    return total


def test_cross_expert_term_matches_pairwise_formula():
    torch.manual_seed(0)
    b = torch.randn(4, 24, 6)                                   # [N, d_out, r]
    got = cross_expert_term(b, spectral_maps(b))
    want = _paper_reference(list(b))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_spectral_weights_damp_large_singular_directions():
    # B' keeps small-sigma directions more than large ones: w_k = exp(-sigma_k / mean) is decreasing in sigma.
    u, _ = torch.linalg.qr(torch.randn(16, 3))
    b = (u * torch.tensor([10.0, 1.0, 0.1])).unsqueeze(0)      # [1, 16, 3], singular values 10, 1, 0.1
    m = spectral_maps(b)[0]
    gains = torch.linalg.norm(b[0] @ m, dim=0) / torch.linalg.norm(b[0], dim=0)
    assert gains[0] < gains[1] < gains[2]


def test_official_term_matches_hand_computation():
    torch.manual_seed(1)
    mats = [torch.randn(10, 4) for _ in range(3)]
    want = 0.0
    for b in mats:
        s = torch.linalg.svdvals(b)
        w = torch.exp(-s / (s.mean() + 1e-8))
        scale = torch.linalg.norm(b) / 2.0 + 1e-8
        diff = b.T @ b - torch.eye(4) * scale ** 2
        want += float(((diff * torch.outer(w, w)) ** 2).sum())
    assert float(official_term(mats)) == pytest.approx(want / 3, rel=1e-5)


def _routed_model(**kw):
    model = tiny_llama_model()
    cfg = AdapterConfig(method="mtlora", rank=4, num_experts=4, placement="ffn", **kw)
    adapters = inject.attach(model, cfg)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.normal_(0, 0.1)                              # non-zero B: a fresh adapter has B == 0
    return model, adapters


def test_spectral_gradient_reaches_b_only_and_maps_stay_fixed_between_refreshes():
    model, adapters = _routed_model()
    reg = SpectralRegularizer(adapters, "paper", every_epochs=1)
    loss = reg.loss(step=0, epoch=0)
    loss.backward()
    for a in adapters.values():
        assert a.lora_B.grad is not None and a.lora_B.grad.abs().sum() > 0
        assert a.lora_A.grad is None and a.router.grad is None
    maps = {k: v.clone() for k, v in reg.maps.items()}
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.add_(torch.randn_like(a.lora_B))
    reg.loss(step=1, epoch=0)                                     # same epoch: factors are not refreshed
    assert all(torch.equal(maps[k], reg.maps[k]) for k in maps)
    reg.loss(step=2, epoch=1)                                     # next epoch: refreshed
    assert not any(torch.equal(maps[k], reg.maps[k]) for k in maps)
    assert all(not m.requires_grad for m in reg.maps.values())


def test_spectral_step_schedule_and_zero_init_refresh():
    model = tiny_llama_model()
    adapters = inject.attach(model, AdapterConfig(method="mtlora", rank=4, num_experts=3, placement="ffn"))
    reg = SpectralRegularizer(adapters, "paper", every_steps=5)
    reg.loss(0, 0)                                                # B == 0: maps carry no spectrum yet
    assert reg.degenerate
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.normal_()
    reg.loss(1, 0)                                                # refreshed at once although not due
    assert not reg.degenerate and reg.schedule.last_step == 1
    first = {k: v.clone() for k, v in reg.maps.items()}
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.mul_(torch.rand_like(a.lora_B))
    reg.loss(5, 0)
    assert all(torch.equal(first[k], reg.maps[k]) for k in first)
    reg.loss(6, 0)                                                # 6 - 1 >= 5
    assert reg.schedule.last_step == 6


def test_official_variant_applies_only_when_due():
    model, adapters = _routed_model()
    reg = SpectralRegularizer(adapters, "official", every_steps=3)
    fired = [reg.loss(step, 0) is not None for step in range(7)]
    # last = -1: due at 2 (2 - -1 >= 3), then at 5
    assert fired == [False, False, True, False, False, True, False]


def _balance_reference(w: torch.Tensor, mask: torch.Tensor) -> float:
    n = w.shape[-1]
    sums = torch.zeros(n, dtype=torch.float64)
    count = 0
    for b in range(w.shape[0]):
        for t in range(w.shape[1]):
            if mask[b, t]:
                for g in range(w.shape[2]):
                    sums += w[b, t, g].double()
                    count += 1
    p = sums / count
    return float(p.var(unbiased=True) / p.mean() ** 2)


@pytest.mark.parametrize("group_size", [None, 32])
def test_balance_loss_value_ignores_padding(group_size):
    model, adapters = _routed_model(routing_group_size=group_size)
    for a in adapters.values():
        a.record_routing = True
    ids = torch.randint(3, 200, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    model(input_ids=ids, attention_mask=mask)
    want = sum(_balance_reference(a.last_routing.detach(), mask) for a in adapters.values()) / len(adapters)
    assert float(balance_loss(adapters.values(), mask).detach()) == pytest.approx(want, rel=1e-5)
    clear_routing(adapters.values())
    assert balance_loss(adapters.values(), mask) is None


def _router_grads(use_reentrant: bool) -> list[float]:
    model, adapters = _routed_model()
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.requires_grad_(False)
    for a in adapters.values():
        a.requires_grad_(True)
        a.record_routing = True
    ids = torch.randint(3, 200, (2, 9))
    model(input_ids=ids)
    loss = balance_loss(adapters.values())
    if loss.requires_grad:
        loss.backward()
    return [float(a.router.grad.abs().sum()) if a.router.grad is not None else 0.0 for a in adapters.values()]


def test_balance_loss_trains_routers_under_non_reentrant_checkpointing():
    assert all(g > 0 for g in _router_grads(use_reentrant=False))
    # Contrast: reentrant checkpointing runs the forward under no_grad, so the routers would get nothing.
    assert all(g == 0 for g in _router_grads(use_reentrant=True))


def test_recipe_enables_non_reentrant_checkpointing():
    from mtlora_train.recipe import enable_non_reentrant_checkpointing

    model, adapters = _routed_model()
    model.train()
    enable_non_reentrant_checkpointing(model)
    model.requires_grad_(False)
    for a in adapters.values():
        a.requires_grad_(True)
        a.record_routing = True
    model(input_ids=torch.randint(3, 200, (1, 8)))
    balance_loss(adapters.values()).backward()
    assert all(a.router.grad is not None and a.router.grad.abs().sum() > 0 for a in adapters.values())
