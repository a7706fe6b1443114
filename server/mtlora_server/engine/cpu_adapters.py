"""Adapter deltas of decode-sized slots on CPU: one C++ call per layer and site group instead of ~5 torch ops
per slot and site.

Why: at decode every slot has a handful of rows, and the per-slot torch path (`lora_ops`, `mtlora.grouped`) spends
each op's fixed cost (dispatch, allocation, oneDNN set-up: ~5-20 us) on a few hundred FLOPs; with 4 adapters this
was ~20 ms of a ~100 ms SmolLM2 decode step at batch 64 (docs/benchmarks.md), most of it overhead. The kernel
(`csrc/adapter_rows.cpp`) does shrink, router softmax, routed expand and the in-place add for every small slot of
one site group in one call, reading each weight row once per block of 4 rows.

Contract:
- `kernel() -> module | None`: the compiled extension (`cpu_ext.CpuExtension`, built on first use, ~40 s once
  per machine), or None when it cannot be built or `MTLORA_CPU_ADAPTERS=torch` is set (callers keep the torch
  path). Never raises.
- `enable(slots, required=False) -> bool`: hands the kernel to an `AdapterSlots` (`slots.cpu_kernel`); the
  engine calls it on CPU unless `cpu_adapters=torch` or batch-invariant mode; `required` (`cpu_adapters=kernel`)
  turns "unavailable" into a ConfigError naming the flag.
- `SlotArena.build(pack, positions, nsite)`: one slot's `mtlora.grouped.Pack` for one site group as a flat vector
  (W, then each site's B) and its meta row; positions[i] is the site index (0..nsite-1, the order of the `outs`
  given to `add_rows`) of pack.parts[i]. float32 or bfloat16, the slots' own dtype: the kernel widens bf16
  weights as it reads them, so the arithmetic is that of an fp32 copy at half the bytes (decode is bandwidth-
  bound: fp32 copies of the 4-adapter mix were ~40 MB read per step). Derived data: rebuild when the slot
  changes; other slots' arenas stay (an adapter swap rebuilds one slot's, not every slot's).
- `Arena.of(slot_arenas, nsite)`: the arenas of one call's segments in segment order, meta [P, 2 + 7*nsite]
  (layout: the C++ file's header); a slot with rows 0 (adapting none of these sites) is skipped.
- `segments(groups, max_rows) -> [P, 3] int64 | None`: (slot, lo, hi) of each slot whose rows are one contiguous
  range of at most max_rows (the decode case), from a `SlotPlan.groups`; None when there is none.
- `add_rows(ext, x [T, d_in], outs [[T, d_out_s]], arena, segs, stats=None)`: adds every listed slot's delta into
  each site's out, in place (x and outs in one dtype, float32 or bfloat16; outs may be column views); with a
  `RoutingStats`, also records the routing weights the kernel computed (the steps that sample them: the same
  records as the torch paths). Math: exactly `mtlora.grouped.expand_into` in fp32 (as lora_ops' small-slot
  path); parity: tests/unit/test_cpu_adapters.py against `mtlora.grouped` and the `mtlora.adapters` oracle, the
  torch paths in bf16, and whole engine runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from mtlora import grouped

from .cpu_ext import CSRC, CpuExtension

log = logging.getLogger(__name__)

ENV = "MTLORA_CPU_ADAPTERS"           # "torch": never build or use the kernel
EXTENSION = CpuExtension(CSRC / "adapter_rows.cpp", "mtlora_adapter_rows", ENV, "CPU adapter rows")
HEAD, SITE = 2, 7                     # meta: (w_off, rows), then per site (used, a_off, r, r_off, N, g, b_off)


def kernel():
    """The compiled extension, or None (module doc)."""
    return EXTENSION.load()


def enable(slots, required: bool = False) -> bool:
    """Give `lora_ops.AdapterSlots` the kernel (CPU engines); False when it is unavailable, or a ConfigError
    naming the engine flag when `required` (cpu_adapters=kernel)."""
    slots.cpu_kernel = EXTENSION.require("cpu_adapters", required)
    if slots.cpu_kernel is not None:
        log.info("adapter work of decode-sized slots runs in one C++ call per site group (cpu_adapters kernel)")
    return slots.cpu_kernel is not None


@dataclass
class SlotArena:
    """One slot's pack for one site group as a flat vector and its meta row (offsets into that vector)."""

    data: torch.Tensor        # [numel] fp32 / bf16: W [rows, d_in], then each site's B [g, N*r, d_out/g]
    meta: list[int]           # 2 + 7*nsite ints: w_off, rows, then per site (used, a_off, r, r_off, N, g, b_off)

    @classmethod
    def empty(cls, nsite: int, dtype: torch.dtype) -> "SlotArena":
        """A slot that adapts none of the group's sites (rows 0: the kernel skips it)."""
        return cls(torch.zeros(0, dtype=dtype), [0] * (HEAD + SITE * nsite))

    @classmethod
    def build(cls, pk: grouped.Pack, positions: list[int], nsite: int) -> "SlotArena":
        if pk.W.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the adapter kernel reads float32 or bfloat16 packs, got {pk.W.dtype}")
        meta = [0, pk.W.shape[0]] + [0] * (SITE * nsite)
        chunks, off = [pk.W.reshape(-1)], pk.W.numel()
        for part, pos in zip(pk.parts, positions):
            meta[HEAD + SITE * pos:HEAD + SITE * (pos + 1)] = [1, part.a_off, part.r, part.r_off, part.N, part.g, off]
            chunks.append(part.B.reshape(-1))
            off += part.B.numel()
        return cls(torch.cat(chunks).contiguous(), meta)


@dataclass
class Arena:
    """The arenas of one call's segments, in segment order (built per set of slots, from their `SlotArena`s)."""

    datas: list[torch.Tensor]
    meta: torch.Tensor                                      # [P, 2 + 7*nsite] int64
    meta_rows: list[list[int]] = field(default_factory=list)

    @classmethod
    def of(cls, slot_arenas: list[SlotArena], nsite: int) -> "Arena":
        rows = [a.meta for a in slot_arenas]
        dtypes = {a.data.dtype for a in slot_arenas}
        if len(dtypes) > 1:
            raise ValueError(f"one call's arenas share one dtype; got {sorted(map(str, dtypes))}")
        return cls([a.data for a in slot_arenas], torch.tensor(rows, dtype=torch.long).view(-1, HEAD + SITE * nsite),
                   rows)


def segments(groups: dict[int, torch.Tensor | slice], max_rows: int) -> torch.Tensor | None:
    """[P, 3] (slot, lo, hi) of the contiguous slots with at most max_rows rows, or None (module doc)."""
    segs = [(slot, rows.start, rows.stop) for slot, rows in groups.items()
            if isinstance(rows, slice) and rows.stop - rows.start <= max_rows]
    return torch.tensor(segs, dtype=torch.long) if segs else None


_NONE = torch.zeros(0)
_NO_OFF = torch.zeros(0, 0, dtype=torch.long)


def add_rows(ext, x: torch.Tensor, outs: list[torch.Tensor], arena: Arena, segs: torch.Tensor,
             stats=None) -> None:
    """Add the listed slots' deltas into outs in place (module doc); with `stats` (a RoutingStats), record every
    slot's routing weights at every site it adapts, as the torch paths do (ones [n, g, 1] for a site without a
    router)."""
    if stats is None:
        ext.adapter_rows(x, outs, arena.datas, arena.meta, segs, _NONE, _NO_OFF)
        return
    nsite = len(outs)
    woff = torch.full((segs.shape[0], nsite), -1, dtype=torch.long)
    routed, ones, off = [], [], 0
    for p, (slot, lo, hi) in enumerate(segs.tolist()):
        m = arena.meta_rows[p]
        for si in range(nsite):
            used, _, _, r_off, N, g, _ = m[HEAD + SITE * si:HEAD + SITE * (si + 1)]
            if not used or not m[1]:
                continue
            if r_off < 0:
                ones.append((slot, hi - lo, g))
                continue
            woff[p, si] = off
            routed.append((slot, off, hi - lo, g, N))
            off += (hi - lo) * g * N
    wout = torch.empty(off, dtype=torch.float32)
    ext.adapter_rows(x, outs, arena.datas, arena.meta, segs, wout if off else _NONE, woff if off else _NO_OFF)
    for slot, o, n, g, N in routed:
        stats.record(slot, wout[o:o + n * g * N].view(n, g, N))
    for slot, n, g in ones:
        stats.record(slot, torch.ones(n, g, 1))
