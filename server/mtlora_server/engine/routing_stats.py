"""`RoutingStats`: per-slot routing usage sampled from the adapter ops (the engine's /metrics and stats()).

Contract: accumulates, per slot, the sum of per-token routing weight per expert (averaged over the slot's groups),
the sum of per-token routing entropy (nats, averaged over groups) and the token count; `summary(slot)` returns the
means. Every adapter path (per-slot, stacked, Triton) records through `record`.
"""

from __future__ import annotations

import torch


class RoutingStats:
    """Per-slot sums of routing weight per expert [S, N_max], of routing entropy [S] and token counts [S].

    Buffers grow on first use, so the engine may construct it with no arguments. Sums stay on the op's device; only
    `summary()` synchronises.
    """

    def __init__(self, max_adapters: int = 0, max_experts: int = 0):
        self.weight_sum = torch.zeros(max_adapters, max_experts, dtype=torch.float64)   # [S, N_max]
        self.entropy_sum = torch.zeros(max_adapters, dtype=torch.float64)               # [S]
        self.count = torch.zeros(max_adapters, dtype=torch.float64)                     # [S]
        self._experts: torch.Tensor | None = None                                   # [S] experts per slot

    def reset(self, slot: int | None = None) -> None:
        """Forget everything (slot None) or one slot's sums (e.g. after it was re-loaded)."""
        rows = slice(None) if slot is None else slot
        for t in (self.weight_sum, self.entropy_sum, self.count) + (() if self._experts is None else (self._experts,)):
            if slot is None or slot < t.shape[0]:
                t[rows] = 0

    def _grow(self, slots: int, experts: int, device: torch.device) -> None:
        S, N = max(slots, self.weight_sum.shape[0]), max(experts, self.weight_sum.shape[1])
        if (S, N) != tuple(self.weight_sum.shape) or self.weight_sum.device != device:
            ws = torch.zeros(S, N, dtype=torch.float64, device=device)
            ws[: self.weight_sum.shape[0], : self.weight_sum.shape[1]] = self.weight_sum.to(device)
            es, ct = (torch.zeros(S, dtype=torch.float64, device=device) for _ in range(2))
            es[: self.entropy_sum.shape[0]] = self.entropy_sum.to(device)
            ct[: self.count.shape[0]] = self.count.to(device)
            self.weight_sum, self.entropy_sum, self.count = ws, es, ct

    def record(self, slots: torch.Tensor, weights: torch.Tensor, groups: torch.Tensor,
               expert_mask: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """slots: [n] slot of each routed token; weights: [n, g_max, N_max] fp32 routing weights;
        groups: [S] routing groups per slot; expert_mask: [S, N_max] (only used to remember N per slot);
        valid: [n] bool, rows that count (None: all). A mask instead of boolean indexing keeps it sync-free."""
        S, N = expert_mask.shape
        self._grow(S, N, weights.device)
        g = groups[slots]                                                           # [n]
        real = torch.arange(weights.shape[1], device=weights.device)[None, :] < g[:, None]   # [n, g_max]
        w = weights.double() * real[:, :, None]                                     # [n, g_max, N] (pad groups 0)
        per_expert = w.sum(1) / g[:, None]                                          # [n, N]
        ent = -(w * w.clamp_min(1e-30).log()).sum(-1).sum(-1) / g                   # [n]
        ones = torch.ones_like(ent)
        if valid is not None:
            keep = valid.to(ent.dtype)                                              # [n]
            per_expert, ent, ones = per_expert * keep[:, None], ent * keep, keep
        self.weight_sum[:, :N].index_add_(0, slots, per_expert)
        self.entropy_sum.index_add_(0, slots, ent)
        self.count.index_add_(0, slots, ones)
        n_exp = expert_mask.sum(1).to(self.count.device)                            # [S]; 0 where site unused
        # Max over sites seen (a slot's mask is empty at sites it does not adapt); no host sync here.
        self._experts = n_exp if self._experts is None else torch.maximum(self._experts.to(n_exp.device), n_exp)

    def summary(self, slot: int) -> tuple[list[float], float]:
        """(mean routing weight per expert of this slot's adapter, mean routing entropy in nats)."""
        if slot >= self.count.shape[0] or float(self.count[slot]) == 0:
            return [], 0.0
        n = float(self.count[slot])
        N = int(self._experts[slot]) if self._experts is not None else self.weight_sum.shape[1]
        return (self.weight_sum[slot, :N] / n).tolist(), float(self.entropy_sum[slot]) / n
