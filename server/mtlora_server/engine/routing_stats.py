"""`RoutingStats`: per-slot routing usage sampled from the adapter ops (the engine's /metrics and stats()).

Contract: accumulates, per slot, the sum of per-token routing weight per expert (averaged over the slot's groups),
the sum of per-token routing entropy (nats, averaged over groups) and the token count; `summary(slot)` returns the
means. Every adapter path (per-slot, stacked, Triton) records through `record`.

`record` only keeps what it is given; `flush()` does the arithmetic for every record since the last flush, batched
(the runner flushes after each sampled forward; `summary`, `reset` and the sum attributes flush first, so a reader
never sees a stale sum). The CPU paths record in the exact form (one slot, or slots of one shape: no padding), which
flushes with no op per record, per (g, N) shape; the Triton path in the padded form (masks, sync-free). Why: a
sampled step records once per (layer, site, slot) -- thousands of records with 32 slots -- and computing each on its
own (~15 small ops) cost ~5 % of every step of the many-adapter benchmark (py-spy; docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class _Record:
    slots: torch.Tensor | int          # [n] slot of each row, or one slot for all n rows
    weights: torch.Tensor               # [n, g, N] fp32 routing weights
    groups: torch.Tensor | None         # padded form: [S] routing groups per slot; None: exact form
    expert_mask: torch.Tensor | None    # padded form: [S, N_max] bool
    valid: torch.Tensor | None          # padded form: [n] bool, or None (all rows count)


class RoutingStats:
    """Per-slot sums of routing weight per expert [S, N_max], of routing entropy [S] and token counts [S].

    Buffers grow on first use, so the engine may construct it with no arguments. Sums stay on the op's device; only
    `summary()` synchronises.
    """

    def __init__(self, max_adapters: int = 0, max_experts: int = 0):
        self._weight_sum = torch.zeros(max_adapters, max_experts, dtype=torch.float64)  # [S, N_max]
        self._entropy_sum = torch.zeros(max_adapters, dtype=torch.float64)              # [S]
        self._count = torch.zeros(max_adapters, dtype=torch.float64)                    # [S]
        self._experts: torch.Tensor | None = None                                   # [S] experts per slot
        self._pending: list[_Record] = []

    # the sums, always flushed
    @property
    def weight_sum(self) -> torch.Tensor:
        self.flush()
        return self._weight_sum

    @property
    def entropy_sum(self) -> torch.Tensor:
        self.flush()
        return self._entropy_sum

    @property
    def count(self) -> torch.Tensor:
        self.flush()
        return self._count

    def reset(self, slot: int | None = None) -> None:
        """Forget everything (slot None) or one slot's sums (e.g. after it was re-loaded)."""
        self.flush()
        rows = slice(None) if slot is None else slot
        for t in (self._weight_sum, self._entropy_sum, self._count) + (() if self._experts is None else
                                                                        (self._experts,)):
            if slot is None or slot < t.shape[0]:
                t[rows] = 0

    def _grow(self, slots: int, experts: int, device: torch.device) -> None:
        S, N = max(slots, self._weight_sum.shape[0]), max(experts, self._weight_sum.shape[1])
        if (S, N) != tuple(self._weight_sum.shape) or self._weight_sum.device != device:
            ws = torch.zeros(S, N, dtype=torch.float64, device=device)
            ws[: self._weight_sum.shape[0], : self._weight_sum.shape[1]] = self._weight_sum.to(device)
            es, ct = (torch.zeros(S, dtype=torch.float64, device=device) for _ in range(2))
            es[: self._entropy_sum.shape[0]] = self._entropy_sum.to(device)
            ct[: self._count.shape[0]] = self._count.to(device)
            self._weight_sum, self._entropy_sum, self._count = ws, es, ct

    def record(self, slots: torch.Tensor | int, weights: torch.Tensor, groups: torch.Tensor | None = None,
               expert_mask: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> None:
        """Routing weights of n routed tokens at one site; two forms:
        - exact (groups, expert_mask None): every row's slot routes exactly weights.shape[1] groups over
          weights.shape[2] experts (the CPU paths: one slot, or stacked slots of one shape). `slots`: an int (every
          row that slot's) or a [n] tensor (its max is read: CPU only).
        - padded (the Triton path): weights [n, g_max, N_max] padded, groups [S] routing groups per slot,
          expert_mask [S, N_max] (N per slot), valid [n] bool rows that count (None: all); masks instead of
          boolean indexing keep it sync-free.
        Kept until `flush()`; the tensors must not be written in place before then (the paths hand over fresh
        ones)."""
        if (groups is None) != (expert_mask is None) or (groups is None and valid is not None):
            raise ValueError("RoutingStats.record: pass groups and expert_mask together (padded form), valid only "
                             "with them")
        self._pending.append(_Record(slots, weights, groups, expert_mask, valid))

    def flush(self) -> None:
        """Add every pending record to the sums (module doc): the exact records batched per (g, N), the padded
        ones padded to common maxima and batched together."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        exact: dict[tuple[int, int], list[_Record]] = {}
        padded = []
        for r in pending:
            if r.groups is None:
                exact.setdefault(tuple(r.weights.shape[1:]), []).append(r)
            else:
                padded.append(r)
        for (g, N), recs in exact.items():
            self._flush_exact(g, N, recs)
        if padded:
            self._flush_padded(padded)

    def _flush_exact(self, g: int, N: int, recs: list[_Record]) -> None:
        """Records whose rows all route g groups over N experts: no padding, no per-record op."""
        dev = recs[0].weights.device
        ints = [r for r in recs if not isinstance(r.slots, torch.Tensor)]
        rows = [r for r in recs if isinstance(r.slots, torch.Tensor)]
        slots, w = [], [r.weights for r in ints] + [r.weights for r in rows]
        top = max([r.slots for r in ints] + [int(r.slots.max()) for r in rows if r.slots.numel()], default=-1)
        if ints:
            slots.append(torch.tensor([r.slots for r in ints], dtype=torch.long, device=dev).repeat_interleave(
                torch.tensor([r.weights.shape[0] for r in ints], device=dev)))
        slots += [r.slots for r in rows]
        slots_t = torch.cat(slots)                                                  # [n]
        self._grow(top + 1, N, dev)
        self._accumulate(slots_t, torch.cat(w), torch.full_like(slots_t, g),      # a few ops per shape, not record
                         torch.ones_like(slots_t, dtype=torch.bool))
        self._raise_experts(top + 1, slots_t, N)

    def _flush_padded(self, recs: list[_Record]) -> None:
        dev = recs[0].weights.device
        S = max(r.expert_mask.shape[0] for r in recs)
        G = max(r.weights.shape[1] for r in recs)
        N = max(r.expert_mask.shape[1] for r in recs)
        self._grow(S, N, dev)
        slots, g, w, keep = [], [], [], []
        for r in recs:
            n = r.weights.shape[0]
            s = r.slots if isinstance(r.slots, torch.Tensor) else torch.full((n,), r.slots, dtype=torch.long,
                                                                              device=dev)
            slots.append(s)
            g.append(r.groups[s])
            gw, nw = r.weights.shape[1], r.weights.shape[2]
            w.append(r.weights if (gw, nw) == (G, N) else F.pad(r.weights, (0, N - nw, 0, G - gw)))
            keep.append(r.valid if r.valid is not None else torch.ones(n, dtype=torch.bool, device=dev))
        self._accumulate(torch.cat(slots), torch.cat(w), torch.cat(g), torch.cat(keep))
        self._count_experts(recs)

    def _accumulate(self, slots: torch.Tensor, weights: torch.Tensor, g: torch.Tensor, keep: torch.Tensor) -> None:
        """slots, g: [n]; weights: [n, G, N] (groups >= g and experts past a slot's N are 0); keep: [n] bool."""
        real = torch.arange(weights.shape[1], device=weights.device)[None, :] < g[:, None]       # [n, G]
        w = weights.double() * real[:, :, None]                                     # [n, G, N] (pad groups 0)
        gd = g.to(torch.float64)
        per_expert = w.sum(1) / gd[:, None]                                         # [n, N]
        ent = -(w * w.clamp_min(1e-30).log()).sum(-1).sum(-1) / gd                  # [n]
        k = keep.to(torch.float64)
        N = weights.shape[2]
        self._weight_sum[:, :N].index_add_(0, slots, per_expert * k[:, None])
        self._entropy_sum.index_add_(0, slots, ent * k)
        self._count.index_add_(0, slots, k)

    def _raise_experts(self, S: int, slots: torch.Tensor, N: int) -> None:
        """Exact records: these slots route over N experts at this site (experts per slot = max over sites)."""
        self._size_experts(S, slots.device)
        self._experts[slots] = self._experts[slots].clamp_min(N)

    def _size_experts(self, S: int, device) -> None:
        if self._experts is None or self._experts.shape[0] < S:
            old, self._experts = self._experts, torch.zeros(S, dtype=torch.long, device=device)
            if old is not None:
                self._experts[: old.shape[0]] = old.to(device)

    def _count_experts(self, recs: list[_Record]) -> None:
        """Padded records: experts per slot from the masks (a slot's mask is empty at sites it does not adapt).
        Each distinct mask once, all masks of one shape in one stacked reduction."""
        by_shape: dict[tuple, dict[int, torch.Tensor]] = {}
        for r in recs:
            by_shape.setdefault(tuple(r.expert_mask.shape), {})[id(r.expert_mask)] = r.expert_mask
        for masks in by_shape.values():
            n_exp = torch.stack(list(masks.values())).sum(2).amax(0).to(self._count.device)   # [S]; no host sync
            S = n_exp.shape[0]
            self._size_experts(S, n_exp.device)
            self._experts[:S] = torch.maximum(self._experts[:S], n_exp)

    def summary(self, slot: int) -> tuple[list[float], float]:
        """(mean routing weight per expert of this slot's adapter, mean routing entropy in nats)."""
        self.flush()
        if slot >= self._count.shape[0] or float(self._count[slot]) == 0:
            return [], 0.0
        n = float(self._count[slot])
        N = int(self._experts[slot]) if self._experts is not None else self._weight_sum.shape[1]
        return (self._weight_sum[slot, :N] / n).tolist(), float(self._entropy_sum[slot]) / n
