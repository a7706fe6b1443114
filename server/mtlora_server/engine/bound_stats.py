"""Routing statistics of a bound kernel step (`cpu_kernel_path.bind_step` on a step that samples them).

Why: a sampling step (every `core.ROUTING_STATS_EVERY`-th) went through `apply_shared`, with a weights buffer, a
layout and ~9 `RoutingStats.record` calls per layer: +7 ms on a ~100 ms batch-64 mix4 decode step, ~0.9 % of
every step on average (docs/benchmarks.md). Here the whole step's routing weights go to one buffer, laid out so
that the weights of every routed (slot, site) with the same (g, N) are contiguous: one record per shape instead
of one per (layer, site, slot), and the plan is kept while the step's segments repeat.

Contract:
- `StatsPlan.of(calls, segs)`: calls[layer][k] is None or the (meta rows by slot, number of sites) of the bound
  call's table (`cpu_adapters.Arena.meta_rows`); segs [P, 3] the step's segments. Gives, per bound call, the
  kernel's `woff` [P, nsite] (offsets into the step's buffer; -1: no router), and per shape (g, N) the buffer's
  range and each row's slot. Sites without a router record ones [n, g, 1] (as every CPU path does).
- `plan.record(stats) -> wout`: a fresh float32 buffer for the kernel to fill, with the step's records handed to
  `RoutingStats` (which reads them at its flush, after the forward).
Parity with `apply_shared`'s statistics: tests/unit/test_cpu_kernel_bound.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cpu_adapters import HEAD, SITE


@dataclass
class _Shape:
    g: int
    N: int
    slots: torch.Tensor            # [rows] the slot of each row, in buffer order
    start: int                     # the shape's range in the step's buffer
    end: int


@dataclass
class StatsPlan:
    woff: list[list[torch.Tensor | None]]     # per layer, per call: the kernel's woff, or None (no bound call)
    routed: list[_Shape]
    ones: list[tuple[torch.Tensor, torch.Tensor]]   # (slots [n], ones [n, g, 1]) per g of the unrouted sites
    total: int

    @classmethod
    def of(cls, calls, segs: torch.Tensor) -> "StatsPlan":
        seg_list = segs.tolist()
        by_shape: dict[tuple[int, int], list[tuple]] = {}   # (g, N) -> (layer, call, segment, site, slot, n)
        unrouted: dict[int, list[tuple[int, int]]] = {}     # g -> (slot, n)
        for layer, row in enumerate(calls):
            for k, call in enumerate(row):
                if call is None:
                    continue
                meta_rows, nsite = call
                for p, (slot, lo, hi) in enumerate(seg_list):
                    m = meta_rows[slot]
                    for si in range(nsite if m[1] else 0):
                        used, _, _, r_off, N, g, _ = m[HEAD + SITE * si:HEAD + SITE * (si + 1)]
                        if used and r_off < 0:
                            unrouted.setdefault(g, []).append((slot, hi - lo))
                        elif used:
                            by_shape.setdefault((g, N), []).append((layer, k, p, si, slot, hi - lo))
        woff = [[None if c is None else torch.full((len(seg_list), c[1]), -1, dtype=torch.long) for c in row]
                for row in calls]
        routed, off = [], 0
        for (g, N), entries in by_shape.items():
            start = off
            for layer, k, p, si, _, n in entries:
                woff[layer][k][p, si] = off
                off += n * g * N
            slots = torch.tensor([e[4] for e in entries]).repeat_interleave(torch.tensor([e[5] for e in entries]))
            routed.append(_Shape(g, N, slots, start, off))
        ones = []
        for g, entries in unrouted.items():
            slots = torch.tensor([s for s, _ in entries]).repeat_interleave(torch.tensor([n for _, n in entries]))
            ones.append((slots, torch.ones(slots.shape[0], g, 1)))
        return cls(woff, routed, ones, off)

    def record(self, stats) -> torch.Tensor:
        wout = torch.empty(self.total, dtype=torch.float32)
        for s in self.routed:
            stats.record(s.slots, wout[s.start:s.end].view(-1, s.g, s.N))
        for slots, ones in self.ones:
            stats.record(slots, ones)
        return wout
