"""Our training step against the official mtLoRA training step, on the same weights and batch.

The reference below is an independent plain re-statement of the official code (github.com/doem97/ICLR26_mtLoRA:
`peft/tuners/block_adapters.py::LowRankBlockAdapter.forward`, `peft/tuners/lora.py::LoraLinear.forward`,
`peft/utils/transformers_patch.py` (block adapter = MLP/attention output + adapter(MLP/attention input)),
`utils/hydralora_utils.py::collect_balance_loss`, `utils/hydralora_trainer.py::compute_spectral_regularization` and
`compute_loss`), written in the official style -- one Linear per expert, a loop over experts accumulating
`weight_i.repeat_interleave(group_size) * B_i(A(x)) * scaling`, cv² of the route weights averaged over every
position, the per-matrix weighted Gram penalty -- and not calling anything in `mtlora` or `mtlora_train` for the
maths. The official package itself (a PEFT fork that replaces `peft`) is not installable beside our dependencies, so
this is a transcription, not an import. Compared: CE, balance and (official variant) spectral terms, the total, and
the gradient of every adapter tensor, for LoRA, HydraLoRA (q,v) and block-FFN mtLoRA with fine-grained routing.
Batches have no padding: the official balance term averages over padding positions too, ours excludes them
(documented in docs/training.md), so on unpadded batches the two must agree exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtlora.testing import make_tiny_model_dir
from mtlora_train.config import TrainConfig
from mtlora_train.recipe import MtloraRecipe


class OfficialStyleAdapter(nn.Module):
    """LowRankBlockAdapter / LoraLinear's adapter path, as the official code computes it."""

    def __init__(self, d_in, d_out, rank, num_experts, alpha, group_size=None):
        super().__init__()
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.ModuleList([nn.Linear(rank, d_out, bias=False) for _ in range(num_experts)])
        self.num_experts, self.scaling = num_experts, alpha / rank
        self.group_size = group_size
        self.num_groups = d_out // group_size if group_size else 1
        self.lora_route = nn.Linear(d_in, num_experts * self.num_groups, bias=False) if num_experts > 1 else None
        self.last_blc = None

    @staticmethod
    def cv_squared(x):
        if x.shape[0] == 1:
            return torch.tensor([0], device=x.device, dtype=x.dtype)[0]
        return x.float().var() / (x.float().mean() ** 2 + 1e-10)

    def forward(self, x):
        hidden = self.lora_A(x)
        if self.num_experts == 1:
            self.last_blc = None
            return self.lora_B[0](hidden) * self.scaling
        logits = self.lora_route(x)
        if self.group_size:
            b, s = logits.shape[:2]
            logits = logits.view(b, s, self.num_groups, self.num_experts)
        route_weight = F.softmax(logits, dim=-1, dtype=torch.float32).to(x.dtype)
        result = torch.zeros(*x.shape[:-1], self.lora_B[0].out_features, dtype=x.dtype)
        for i in range(self.num_experts):
            if self.group_size:
                weight_i = route_weight[:, :, :, i].repeat_interleave(self.group_size, dim=-1)
            else:
                weight_i = route_weight[:, :, i].unsqueeze(-1)
            result = result + weight_i * self.lora_B[i](hidden) * self.scaling
        self.last_blc = self.cv_squared(route_weight.mean(dim=tuple(range(route_weight.dim() - 1))))
        return result


class PlusAdapter(nn.Module):
    """Official placement: wrapped(x) + adapter(x) (component: the projection; block: the MLP)."""

    def __init__(self, wrapped, adapter):
        super().__init__()
        self.wrapped, self.adapter = wrapped, adapter

    def forward(self, x):
        return self.wrapped(x) + self.adapter(x)


def official_spectral(b_matrices):
    """compute_spectral_regularization, DDP branch (fewer than 64 matrices: no sampling)."""
    total = torch.tensor(0.0)
    for b in b_matrices:
        rank = b.shape[1]
        gram = b.t() @ b
        with torch.no_grad():
            s = torch.linalg.svdvals(b.detach().float())
            weights = torch.exp(-s / (s.mean() + 1e-8))
            scale = torch.linalg.norm(b.detach()).item() / (rank ** 0.5) + 1e-8
        diff = gram - torch.eye(rank) * scale ** 2
        total = total + ((diff * weights.unsqueeze(0) * weights.unsqueeze(1)) ** 2).sum()
    return total / len(b_matrices)


def official_reference_model(model_dir, ours_tensors, cfg: TrainConfig):
    """A fresh base model with official-style adapters carrying our tensors (official layout)."""
    from mtlora.base import load_base_model

    model = load_base_model(model_dir)
    model.requires_grad_(False)
    n = 1 if cfg.method == "lora" else cfg.lora_nums
    group = cfg.routing_group_size if cfg.enable_fine_grained_routing and n > 1 else None
    sites = ["mlp"] if cfg.enable_block_adapter else [f"self_attn.{m}" for m in cfg.target_modules]
    refs = {}
    for idx, layer in enumerate(model.model.layers):
        for site in sites:
            parent = layer if site == "mlp" else layer.self_attn
            leaf = site.rsplit(".", 1)[-1]
            target = getattr(parent, leaf)
            d = model.config.hidden_size
            d_in, d_out = (d, d) if site == "mlp" else (target.in_features, target.out_features)
            ad = OfficialStyleAdapter(d_in, d_out, cfg.lora_rank, n, cfg.lora_alpha, group)
            prefix = f"layers.{idx}.{site}"
            with torch.no_grad():
                ad.lora_A.weight.copy_(ours_tensors[f"{prefix}.lora_A"])
                for i in range(n):
                    ad.lora_B[i].weight.copy_(ours_tensors[f"{prefix}.lora_B"][i])
                if ad.lora_route is not None:
                    ad.lora_route.weight.copy_(ours_tensors[f"{prefix}.router"])
            setattr(parent, leaf, PlusAdapter(target, ad))
            refs[prefix] = ad
    return model, refs


ARMS = {
    "lora": dict(method="lora"),
    "hydralora": dict(method="hydralora", lora_nums=3, enable_blc=True, enable_spectral_reg=True),
    "mtlora_block_fgr": dict(method="mtlora", lora_nums=3, enable_block_adapter=True, block_adapter_type="ffn",
                             enable_fine_grained_routing=True, routing_group_size=16, enable_blc=True,
                             enable_spectral_reg=True),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    rows = [{"instruction": "Write the word in capitals", "input": w, "output": w.upper(), "task_type": "upper"}
            for w in ("abcd", "efgh", "hgfe", "dcba")]
    (root / "data").mkdir()
    (root / "data" / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return make_tiny_model_dir(root / "model"), root


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_training_step_matches_official(workdir, arm):
    model_dir, root = workdir
    cfg = TrainConfig(model_name_or_path=str(model_dir), dataset_dir=str(root / "data"), output_dir=str(root / arm),
                      data_cache_dir=str(root / "cache"), lora_rank=4, lora_alpha=16, lora_dropout=0.0,
                      spectral_reg_variant="official", spectral_reg_lambda=0.5, blc_weight=0.3, save_steps=0,
                      max_seq_length=64, per_device_train_batch_size=4, **ARMS[arm])
    recipe = MtloraRecipe(cfg).setup()
    torch.manual_seed(3)
    with torch.no_grad():                      # trained-looking weights: B != 0, so every tensor gets a gradient
        for a in recipe.adapters.values():
            a.lora_B.normal_(0, 0.2)
            if a.router is not None:
                a.router.normal_(0, 0.5)
    ours = {k: v.clone() for k, v in recipe.adapter_tensors().items()}
    batch = next(iter(recipe.loader))
    assert bool(batch["attention_mask"].all()), "the parity batch must be unpadded (see the module docstring)"
    terms = recipe.loss_step(batch)
    terms["total"].backward()
    got_grads = {f"{p}.{n}": t.grad.clone() for p, a in recipe.adapters.items() for n, t in a.named_parameters()}

    ref_model, refs = official_reference_model(model_dir, ours, cfg)
    ref_model.train()
    out = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    total = out.loss
    torch.testing.assert_close(terms["ce"], out.loss.float(), rtol=1e-5, atol=1e-6)
    blcs = [r.last_blc for r in refs.values() if r.last_blc is not None]
    if cfg.uses_balance:
        balance = torch.stack(blcs).mean()
        torch.testing.assert_close(terms["balance"], balance, rtol=1e-5, atol=1e-8)
        total = total + cfg.blc_weight * balance
    else:
        assert terms["balance"] is None and not blcs
    if cfg.uses_spectral:
        spectral = official_spectral([b.weight for r in refs.values() for b in r.lora_B])
        torch.testing.assert_close(terms["spectral"], spectral, rtol=1e-5, atol=1e-7)
        assert float(spectral.detach()) > 0
        total = total + cfg.spectral_reg_lambda * spectral
    torch.testing.assert_close(terms["total"], total, rtol=1e-5, atol=1e-6)
    total.backward()
    for prefix, r in refs.items():
        want = {"lora_A": r.lora_A.weight.grad, "lora_B": torch.stack([b.weight.grad for b in r.lora_B])}
        if r.lora_route is not None:
            want["router"] = r.lora_route.weight.grad
        for name, g in want.items():
            assert g is not None and float(g.abs().sum()) > 0
            torch.testing.assert_close(got_grads[f"{prefix}.{name}"], g, rtol=1e-4, atol=1e-7,
                                       msg=lambda m: f"{arm} {prefix}.{name}: {m}")
    assert set(got_grads) == {f"{p}.{n}" for p, r in refs.items()
                              for n in (["lora_A", "lora_B"] + (["router"] if r.lora_route is not None else []))}
    assert math.isfinite(float(total.detach()))
