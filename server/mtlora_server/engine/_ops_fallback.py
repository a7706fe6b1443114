"""Private stand-ins for the ops engineer's `lora_ops` / `sampling` APIs, used only while those modules are absent.

Same signatures as the real ones (see the engine brief): `AdapterSlots`, `RoutingStats`, `sample`, `logprobs_of`.
They are deliberately simple (a loop over the distinct adapter slots present in a batch, the `mtlora.adapters`
math per slot) and exact, so engine tests are meaningful either way. `ops.py` picks the real modules when present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import TokenLogprob


class RoutingStats:
    """Accumulates per-slot mean routing weight per expert and mean routing entropy (nats)."""

    def __init__(self) -> None:
        self._usage: dict[int, torch.Tensor] = {}
        self._entropy: dict[int, float] = {}
        self._count: dict[int, int] = {}

    def record(self, slot: int, w: torch.Tensor) -> None:
        """w: [n, g, N] routing weights of n tokens."""
        w = w.float()
        ent = -(w * w.clamp_min(1e-12).log()).sum(-1).mean().item()
        usage = w.mean(dim=(0, 1)).cpu()
        n = self._count.get(slot, 0)
        prev = self._usage.get(slot)
        self._usage[slot] = usage if prev is None or prev.shape != usage.shape else (prev * n + usage) / (n + 1)
        self._entropy[slot] = (self._entropy.get(slot, 0.0) * n + ent) / (n + 1)
        self._count[slot] = n + 1

    def summary(self, slot: int) -> dict:
        if slot not in self._count:
            return {"expert_usage": [], "entropy": 0.0}
        return {"expert_usage": self._usage[slot].tolist(), "entropy": self._entropy[slot]}


class AdapterSlots:
    """Per-slot adapter tensors keyed by (layer, site); `apply` computes a batched delta for mixed slots."""

    def __init__(self, model_config, max_adapters: int, max_rank: int, max_experts: int, max_groups: int,
                 dtype: torch.dtype, device) -> None:
        self.max_adapters, self.max_rank, self.max_experts, self.max_groups = (max_adapters, max_rank,
                                                                               max_experts, max_groups)
        self.dtype, self.device = dtype, torch.device(device)
        self._slots: dict[int, tuple] = {}          # slot -> (config, {prefix: (A, B, R, g)})

    def load(self, slot: int, config, tensors: dict[str, torch.Tensor]) -> None:
        if config.rank > self.max_rank or config.num_experts > self.max_experts:
            raise ValueError(f"adapter rank {config.rank} / experts {config.num_experts} exceed max_lora_rank "
                             f"{self.max_rank} / max_experts {self.max_experts}")
        sites = {}
        for name in tensors:
            if name.endswith(".lora_A"):
                prefix = name[: -len(".lora_A")]
                A = tensors[name].to(self.device, self.dtype)
                B = tensors[prefix + ".lora_B"].to(self.device, self.dtype)
                R = tensors.get(prefix + ".router")
                R = None if R is None else R.to(self.device, self.dtype)
                g = 1 if R is None else R.shape[0] // config.num_experts
                if g > self.max_groups:
                    raise ValueError(f"{prefix}: {g} routing groups exceed max_groups {self.max_groups}")
                sites[prefix] = (A, B, R, g)
        self._slots[slot] = (config, sites)

    def clear(self, slot: int) -> None:
        self._slots.pop(slot, None)

    def active_sites(self, layer: int) -> list[str]:
        out = []
        for config, _ in self._slots.values():
            out.extend(s for s in config.sites() if s not in out)
        return out

    def apply(self, layer: int, site: str, x: torch.Tensor, slot_idx: torch.Tensor, stats=None):
        """x: [T, d_in], slot_idx: [T] -> delta [T, d_out] or None when no token uses this site."""
        prefix = f"layers.{layer}.{site}"
        delta = None
        for slot in torch.unique(slot_idx).tolist():
            if slot < 0 or slot not in self._slots or prefix not in self._slots[slot][1]:
                continue
            config, sites = self._slots[slot]
            A, B, R, g = sites[prefix]
            rows = (slot_idx == slot).nonzero().squeeze(1)
            z = x[rows].to(self.dtype)                                              # [n, d_in]
            y = torch.einsum("tr,nor->tno", F.linear(z, A), B)                      # [n, N, d_out]
            if R is None:
                out = y[:, 0]
            else:
                w = torch.softmax(F.linear(z, R).view(len(rows), g, -1).float(), dim=-1)   # [n, g, N]
                if stats is not None:
                    stats.record(slot, w)
                y = y.view(len(rows), y.shape[1], g, -1)                            # [n, N, g, gs]
                out = torch.einsum("tngc,tgn->tgc", y, w.to(y.dtype)).reshape(len(rows), -1)
            if delta is None:
                delta = x.new_zeros(x.shape[0], out.shape[-1])
            delta[rows] = (out * config.scaling).to(x.dtype)
        return delta


def sample(logits: torch.Tensor, params: list, generators: list) -> torch.Tensor:
    """logits: [B, V] fp32 -> chosen token ids [B]."""
    out = torch.empty(logits.shape[0], dtype=torch.long)
    for i, (row, p, gen) in enumerate(zip(logits, params, generators)):
        if p.temperature == 0.0:
            out[i] = int(torch.argmax(row))
            continue
        row = row / p.temperature
        if p.top_k and p.top_k > 0:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_vals, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_vals, -1)
            drop = probs.cumsum(-1) - probs > p.top_p           # keep the smallest prefix reaching top_p
            row = row.clone()
            row[order[drop]] = float("-inf")
        probs = torch.softmax(row, -1)
        out[i] = int(torch.multinomial(probs.cpu(), 1, generator=gen))
    return out


def apply_min_tokens(logits: torch.Tensor, banned_ids_per_row: list) -> torch.Tensor:
    """Copy of logits [B, V] with each row's banned ids set to -inf (None / []: untouched)."""
    out = logits.clone()
    for i, ids in enumerate(banned_ids_per_row):
        if ids:
            out[i, list(ids)] = float("-inf")
    return out


def logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, k_list: list[int]) -> list[TokenLogprob]:
    """Per row: logprob of the chosen token plus the top-k alternatives (best first)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    result = []
    for i, k in enumerate(k_list):
        tok = int(chosen[i])
        top = []
        if k > 0:
            vals, ids = torch.topk(lp[i], k)
            top = list(zip(ids.tolist(), vals.tolist()))
        result.append(TokenLogprob(tok, float(lp[i, tok]), top))
    return result
