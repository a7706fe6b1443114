"""MoLoRA math and placement: every method x placement x group size equals an einsum written here from the
formula in mtlora/adapters.py's docstring (independently of the module's own code), on a tiny random LLaMA."""

from __future__ import annotations

import pytest
import torch

from mtlora import inject
from mtlora.adapters import AdaptedBlock, AdaptedLinear, MoLoRA
from mtlora.config import LINEAR_MODULES, AdapterConfig
from mtlora.errors import ConfigError
from mtlora.reference import random_adapter_tensors
from mtlora.testing import tiny_llama_config

D = 64  # hidden size of the tiny model; q: 64, k/v: 32, ffn: 128


def formula(z, A, B, R, scaling, groups):
    """delta_k = s * sum_i w[group(k), i] * (B_i A z)[k], w = softmax_N(R z viewed [g, N]); float64 throughout."""
    z, A, B = z.double(), A.double(), B.double()
    n_exp, d_out, _ = B.shape
    h = torch.einsum("td,rd->tr", z, A)                                   # [T, r]
    y = torch.einsum("tr,nor->tno", h, B)                                 # [T, N, d_out]
    if R is None:
        w = torch.ones(z.shape[0], 1, 1, dtype=torch.float64)
    else:
        w = torch.softmax(torch.einsum("td,kd->tk", z, R.double()).reshape(-1, groups, n_exp), dim=-1)
    w_per_channel = w.repeat_interleave(d_out // groups, dim=1)           # [T, d_out, N]: group(k) = k // size
    return scaling * torch.einsum("tno,ton->to", y, w_per_channel)


CASES = [  # (id, AdapterConfig kwargs)
    ("mtlora-ffn-N3-g1", dict(method="mtlora", placement="ffn", num_experts=3)),
    ("mtlora-attn-N2-gs16", dict(method="mtlora", placement="attention", num_experts=2, routing_group_size=16)),
    ("mtlora-both-N4-gs1", dict(method="mtlora", placement="both", num_experts=4, routing_group_size=1)),
    ("mtlora-both-N1", dict(method="mtlora", placement="both", num_experts=1)),
    ("hydralora-qv-N3", dict(method="hydralora", target_modules=["q_proj", "v_proj"], num_experts=3)),
    ("hydralora-all-N2-gs8", dict(method="hydralora", target_modules=list(LINEAR_MODULES), num_experts=2,
                                  routing_group_size=8)),
    ("lora-q-down", dict(method="lora", target_modules=["q_proj", "down_proj"])),
]


@pytest.mark.parametrize("kw", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_module_matches_formula(kw):
    config = AdapterConfig(rank=4, alpha=12.0, **kw)
    for d_in, d_out in [(64, 64), (64, 32), (128, 64)]:
        mod = MoLoRA(d_in, d_out, config)
        gen = torch.Generator().manual_seed(d_in + d_out)
        with torch.no_grad():
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        z = torch.randn(5, d_in, generator=gen)
        want = formula(z, mod.lora_A, mod.lora_B, mod.router, config.alpha / config.rank,
                       config.groups_for(d_out))
        torch.testing.assert_close(mod(z).double(), want, rtol=1e-5, atol=1e-5)
        # Leading batch dimensions are carried through unchanged.
        torch.testing.assert_close(mod(z.view(1, 5, d_in))[0], mod(z))


@pytest.mark.parametrize("kw", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_attached_sites_match_formula(kw):
    """In the real model, every wrapped site outputs base(x) + formula(x), at every layer."""
    from mtlora.testing import tiny_llama_model

    model = tiny_llama_model()
    config = AdapterConfig(rank=4, alpha=8.0, **kw)
    adapters = inject.attach(model, config)
    inject.load_adapter_state(model, random_adapter_tensors(config, model.config, seed=3, scale=0.5))
    seen = {}

    def hook(prefix):
        def fn(module, args, kwargs, output):
            seen[prefix] = (module, args, kwargs, output)
        return fn

    handles = []
    for layer_idx, layer in enumerate(inject.decoder_layers(model)):
        for site in config.sites():
            wrapper = layer.get_submodule(site)
            assert isinstance(wrapper, AdaptedBlock if config.method == "mtlora" else AdaptedLinear)
            handles.append(wrapper.register_forward_hook(hook(f"layers.{layer_idx}.{site}"), with_kwargs=True))
    with torch.no_grad():
        model(input_ids=torch.tensor([[3, 17, 42, 99, 7, 250]]), use_cache=False)
        assert sorted(seen) == sorted(adapters)
        for prefix, (wrapper, args, kwargs, output) in seen.items():
            inner = wrapper.block if isinstance(wrapper, AdaptedBlock) else wrapper.base
            base_out = inner(*args, **kwargs)
            base_out, got = (base_out[0], output[0]) if isinstance(base_out, tuple) else (base_out, output)
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]          # [1, T, d_in]
            a = adapters[prefix]
            want = formula(x[0], a.lora_A, a.lora_B, a.router, config.scaling, a.num_groups)
            assert want.abs().max() > 0.05, "adapter too small for this check to mean anything"
            # got - base cancels fp32 values of the base's magnitude, hence the absolute tolerance.
            torch.testing.assert_close((got - base_out)[0].double(), want, rtol=1e-4, atol=3e-4)
    for h in handles:
        h.remove()


@pytest.mark.parametrize("kw,size,dim", [
    (dict(method="mtlora", placement="ffn"), 24, 64),
    (dict(method="hydralora", target_modules=["k_proj"]), 48, 32),
    (dict(method="hydralora", target_modules=["gate_proj"]), 96, 128),
])
def test_group_size_not_dividing_names_both_numbers(tiny_model, kw, size, dim):
    config = AdapterConfig(num_experts=2, routing_group_size=size, **kw)
    with pytest.raises(ConfigError) as err:
        inject.attach(tiny_model, config)
    assert f"routing_group_size {size}" in str(err.value) and str(dim) in str(err.value)
    assert err.value.field == "routing_group_size"
    with pytest.raises(ConfigError, match=str(size)):
        inject.expected_shapes(tiny_llama_config(), config)


@pytest.mark.parametrize("kw", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_fresh_adapter_leaves_logits_bit_exact(tiny_model, kw):
    ids = torch.tensor([[1, 5, 9, 200, 33]])
    with torch.no_grad():
        base = tiny_model(input_ids=ids).logits
        inject.attach(tiny_model, AdapterConfig(**kw))
        adapted = tiny_model(input_ids=ids).logits
        inject.detach(tiny_model)
        again = tiny_model(input_ids=ids).logits
    assert torch.equal(adapted, base)
    assert torch.equal(again, base)


def test_attach_twice_and_detach_restore(tiny_model):
    config = AdapterConfig(method="mtlora", placement="both", num_experts=2)
    originals = [(layer.mlp, layer.self_attn) for layer in inject.decoder_layers(tiny_model)]
    inject.attach(tiny_model, config)
    with pytest.raises(ConfigError, match="already"):
        inject.attach(tiny_model, config)
    inject.detach(tiny_model)
    assert [(layer.mlp, layer.self_attn) for layer in inject.decoder_layers(tiny_model)] == originals


def test_attach_follows_the_model_training_mode(tiny_model):
    config = AdapterConfig(method="hydralora", target_modules=["q_proj"], num_experts=2, dropout=0.5)
    adapters = inject.attach(tiny_model.eval(), config)
    assert not any(a.training for a in adapters.values())
    inject.load_adapter_state(tiny_model, random_adapter_tensors(config, tiny_model.config))
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(tiny_model(input_ids=ids).logits, tiny_model(input_ids=ids).logits)


def test_site_dims_names_the_unknown_site():
    cfg = tiny_llama_config()
    assert inject.site_dims(cfg, "mlp.down_proj") == (cfg.intermediate_size, cfg.hidden_size)
    with pytest.raises(ConfigError, match="unknown adapter site 'mlp.bogus'"):
        inject.site_dims(cfg, "mlp.bogus")
