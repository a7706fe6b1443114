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
- `SlotArena.build(pack, positions, nsite, pairs=False)`: one slot's `mtlora.grouped.Pack` for one site group as
  a flat vector (W, then each site's B, chunk-major: per group the columns in chunks of `CHUNK`, each chunk's
  [N*r, width] rows contiguous, so the kernel streams them in order) and its meta row; positions[i] is the site
  index (0..nsite-1, the order of the `outs` given to `add_rows`) of pack.parts[i]. float32 or bfloat16, the
  slots' own dtype: the kernel widens bf16 weights as it reads them (or, for the bf16 shrink on AVX-512 BF16,
  multiplies bf16 pairs exactly in fp32), so the arithmetic is that of an fp32 copy at half the bytes (decode is
  bandwidth-bound: fp32 copies of the 4-adapter mix were ~40 MB read per step). Derived data: rebuild when the slot
  changes; other slots' arenas stay (an adapter swap rebuilds one slot's, not every slot's). `pairs` (bf16 only;
  `pair_layout(ext, dtype)` says when: a kernel with AVX-512 BF16): B in row pairs (`pair_major`, the kernel's
  layout 1, recorded in the meta row), and the kernel's expand runs on bf16 dot products too, on the routed input
  rounded to bf16 once -- as the torch path's bf16 matmul rounds it -- at about twice the fp32 FMA rate.
- `SlotData.of(pack, keys, pairs)`: the same flat vector with each part's offsets keyed by its site instead of a
  position; `.arena(sites)` places it in a call over `sites` (a meta row, no tensor work). `prepare(config, tensors,
  groups, num_layers, dtype, pairs) -> PreparedAdapter`: an adapter's SlotData per (layer, input), straight from its
  validated tensors and equal to what the lazy path derives from the slot buffers; pure, so the registry's load
  workers run it and an adapter swap then builds no arena on the step thread (issue 18).
- `Arena(num_slots, nsite, dtype)`: one site group's table of slot arenas, indexed by slot, meta [S, 3 + 7*nsite]
  (layout: the C++ file's header), kept across steps and patched one slot at a time (`put` / `drop`);
  `Arena.of(slot_arenas, nsite)`: a table whose slot i holds slot_arenas[i]. A slot with rows 0 (adapting none of
  these sites) is skipped by the kernel. `bind(ext, cols)`: the kernel's `RowsCall` over the table with each
  site's columns given (`cpu_kernel_path.bind_step`), kept until a row changes.
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
from dataclasses import dataclass

import torch

from mtlora import grouped
from mtlora.sites import BY_NAME, SITE_NAMES

from .cpu_ext import CSRC, CpuExtension

log = logging.getLogger(__name__)

ENV = "MTLORA_CPU_ADAPTERS"           # "torch": never build or use the kernel
EXTENSION = CpuExtension(CSRC / "adapter_rows.cpp", "mtlora_adapter_rows", ENV, "CPU adapter rows")
HEAD, SITE = 3, 7                     # meta: (w_off, rows, layout), then per site (used, a_off, r, r_off, N, g, b_off)
CHUNK = 32                            # columns per chunk of B in an arena (the kernel's CW, exported as ext.CHUNK)


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
    meta: list[int]           # 3 + 7*nsite ints: w_off, rows, layout, per site (used, a_off, r, r_off, N, g, b_off)

    @classmethod
    def empty(cls, nsite: int, dtype: torch.dtype) -> "SlotArena":
        """A slot that adapts none of the group's sites (rows 0: the kernel skips it)."""
        return cls(torch.zeros(0, dtype=dtype), [0] * (HEAD + SITE * nsite))

    @classmethod
    def build(cls, pk: grouped.Pack, positions: list[int], nsite: int, pairs: bool = False) -> "SlotArena":
        """pack.parts[i] goes to site index positions[i] of a call over nsite sites."""
        return SlotData.of(pk, positions, pairs).arena(range(nsite))


@dataclass
class SlotData:
    """One adapter's kernel data for the sites it adapts among one site group: the flat vector (`SlotArena.data`)
    and each part's offsets keyed by its site. Independent of the slot and of which other sites a call covers, so
    it is built once per adapter (`prepare`, off the step thread) and placed into any call by `arena(sites)`, which
    only writes a meta row."""

    data: torch.Tensor
    rows: int                                     # shrink (+ router) rows of W
    pairs: bool                                   # B in the pair layout (kernel layout 1)
    parts: tuple[tuple[object, tuple[int, ...]], ...]   # (site key, (a_off, r, r_off, N, g, b_off))

    @classmethod
    def of(cls, pk: grouped.Pack, keys, pairs: bool = False) -> "SlotData":
        """pack.parts[i] is the site keys[i]."""
        if pk.W.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the adapter kernel reads float32 or bfloat16 packs, got {pk.W.dtype}")
        if pairs and pk.W.dtype != torch.bfloat16:
            raise ValueError("the pair layout of B is for bfloat16 packs")
        chunks, off, parts = [pk.W.reshape(-1)], pk.W.numel(), []
        for part, key in zip(pk.parts, keys):
            parts.append((key, (part.a_off, part.r, part.r_off, part.N, part.g, off)))
            flat = pair_major(part.B) if pairs else chunk_major(part.B)
            chunks.append(flat)
            off += flat.numel()
        return cls(torch.cat(chunks).contiguous(), pk.W.shape[0], pairs, tuple(parts))

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def arena(self, sites) -> SlotArena:
        """This data in a call over `sites` (a sequence of site keys holding every key of this data)."""
        sites = list(sites)
        meta = [0, self.rows, int(self.pairs)] + [0] * (SITE * len(sites))
        for key, vals in self.parts:
            pos = sites.index(key)
            meta[HEAD + SITE * pos:HEAD + SITE * (pos + 1)] = [1, *vals]
        return SlotArena(self.data, meta)


@dataclass
class PreparedAdapter:
    """An adapter's `SlotData` per (layer, input) -- `mtlora.sites.Site.reads` names the input a site group shares
    -- for slots of one dtype and B layout (`prepare`)."""

    dtype: torch.dtype
    pairs: bool
    groups: dict[tuple[int, str], SlotData]

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.groups.values())


def prepare(config, tensors: dict[str, torch.Tensor], groups: dict[str, int], num_layers: int,
            dtype: torch.dtype, pairs: bool) -> PreparedAdapter:
    """The kernel data of a validated adapter (`tensors` in native layout, `groups`: site -> routing groups g),
    exactly what the slots' lazy path derives from the slot buffers (`site_buffers.pack_slot` -> `SlotData.of`):
    the same dtype cast, router view and fp32 scaling, the sites of each input in canonical order. Pure: reads no
    slot state, so it runs in a load worker."""
    scaling = float(torch.tensor(config.scaling, dtype=torch.float32))          # as the slots' fp32 scaling holds it
    out = {}
    with torch.no_grad():
        for layer in range(num_layers):
            by_input: dict[str, list[str]] = {}
            for name in SITE_NAMES:
                if name in groups:
                    by_input.setdefault(BY_NAME[name].reads, []).append(name)
            for reads, names in by_input.items():
                sites = []
                for name in names:
                    prefix = f"layers.{layer}.{name}"
                    router = tensors[f"{prefix}.router"].to(dtype) if config.has_router else None
                    sites.append(grouped.SiteWeights.from_native(tensors[f"{prefix}.lora_A"].to(dtype),
                                                                 tensors[f"{prefix}.lora_B"].to(dtype), router,
                                                                 scaling))
                out[(layer, reads)] = SlotData.of(grouped.pack(sites), names, pairs)
    return PreparedAdapter(dtype, pairs, out)


def chunk_major(B: torch.Tensor) -> torch.Tensor:
    """B [g, Nr, dg] as a flat vector, per group its columns in chunks of CHUNK (the last narrower), each chunk's
    [Nr, width] contiguous: the expand reads every chunk front to back instead of one cache line per row.
    The full chunks are one permute (not a slice per chunk: an adapter swap builds ~100 of these per slot)."""
    g, nr, dg = B.shape
    full = dg // CHUNK * CHUNK
    head = B[:, :, :full].reshape(g, nr, -1, CHUNK).permute(0, 2, 1, 3).reshape(g, -1)   # [g, nC * Nr * CHUNK]
    return torch.cat([head, B[:, :, full:].reshape(g, -1)], dim=1).reshape(-1)


def pair_major(B: torch.Tensor) -> torch.Tensor:
    """B [g, Nr, dg] in the kernel's layout 1: per group, chunks of CHUNK columns, each chunk's rows in pairs
    [ceil(Nr/2), width, 2] (a zero row padding an odd Nr), as AVX-512 BF16 dot products take them."""
    g, nr, dg = B.shape
    if nr % 2:
        B = torch.cat([B, B.new_zeros(g, 1, dg)], dim=1)
    bp = B.reshape(g, -1, 2, dg)                                                   # [g, Np, 2, dg]
    full = dg // CHUNK * CHUNK
    head = bp[..., :full].reshape(g, bp.shape[1], 2, -1, CHUNK).permute(0, 3, 1, 4, 2).reshape(g, -1)
    return torch.cat([head, bp[..., full:].transpose(2, 3).reshape(g, -1)], dim=1).reshape(-1)


def pair_layout(ext, dtype: torch.dtype) -> bool:
    """Whether arenas of `dtype` for kernel `ext` take the pair layout: bf16 where the kernel has AVX-512 BF16."""
    return dtype == torch.bfloat16 and bool(getattr(ext, "BF16_DOT", False))


class Arena:
    """One site group's kernel table, kept across steps: slot s's arena at `datas[s]` and its meta row at
    `meta[s]` ([S, 3 + 7*nsite] int64, the C++ file's layout). The kernel reads the rows its segments name, so a
    step over any set of slots uses the table as it is, and an adapter swap replaces one row (`put`) instead of
    rebuilding a per-slot-set copy for every call. `ready`: the slots whose row is current; `drop(slot)` forgets
    one (its arena is released; the stale meta row is never read: callers fill a slot before naming it, and the
    kernel checks every named row against its arena anyway)."""

    def __init__(self, num_slots: int, nsite: int, dtype: torch.dtype):
        self.nsite, self.dtype = nsite, dtype
        self._empty = torch.zeros(0, dtype=dtype)
        self.datas: list[torch.Tensor] = [self._empty] * num_slots
        self.meta = torch.zeros(num_slots, HEAD + SITE * nsite, dtype=torch.long)
        self.meta_rows: list[list[int]] = [[0] * (HEAD + SITE * nsite) for _ in range(num_slots)]
        self.ready: set[int] = set()
        self.stats_layouts: dict = {}                       # segments -> StatsLayout (`add_rows` with stats)
        self._bound: dict[tuple, object] = {}               # columns -> the kernel's RowsCall over this table

    @classmethod
    def of(cls, slot_arenas: list[SlotArena], nsite: int) -> "Arena":
        """A table whose slot i holds slot_arenas[i] (one dtype)."""
        dtypes = {a.data.dtype for a in slot_arenas}
        if len(dtypes) > 1:
            raise ValueError(f"one call's arenas share one dtype; got {sorted(map(str, dtypes))}")
        table = cls(len(slot_arenas), nsite, next(iter(dtypes)))
        for slot, sa in enumerate(slot_arenas):
            table.put(slot, sa)
        return table

    def put(self, slot: int, sa: SlotArena) -> None:
        if sa.data.dtype != self.dtype or len(sa.meta) != self.meta.shape[1]:
            raise ValueError(f"slot {slot}: a {sa.data.dtype} arena with {len(sa.meta)} meta values does not fit "
                             f"a {self.dtype} table of {self.nsite} sites")
        self.datas[slot] = sa.data
        self.meta[slot] = torch.tensor(sa.meta, dtype=torch.long)
        self.meta_rows[slot] = sa.meta
        self.ready.add(slot)
        self.stats_layouts.clear()
        self._bound.clear()

    def drop(self, slot: int) -> None:
        self.datas[slot] = self._empty
        self.ready.discard(slot)
        self._bound.clear()                                 # (a bound call holds the dropped arena)

    def bind(self, ext, cols: tuple[tuple[int, int, int], ...]):
        """The kernel's `RowsCall` over this table with these site columns ((source 0 = out | 1 = fused, first
        column, width) per site): built on first use, kept until a slot's row changes."""
        call = self._bound.get(cols)
        if call is None:
            call = self._bound[cols] = ext.RowsCall(self.datas, self.meta, torch.tensor(cols, dtype=torch.long))
        return call

    def slot_arena(self, slot: int) -> SlotArena:
        return SlotArena(self.datas[slot], self.meta_rows[slot])


def suits(x: torch.Tensor, outs: list[torch.Tensor]) -> bool:
    """Whether the kernel takes these operands: x and every out float32 or bfloat16 (one dtype), column stride 1."""
    return x.dtype in (torch.float32, torch.bfloat16) and x.stride(1) == 1 \
        and all(o.dtype == x.dtype and o.stride(1) == 1 for o in outs)


@dataclass
class KernelCall:
    """The layout of one (layer, target sites) call while the adapted sites stay the same."""

    stamp: tuple                        # (the slots' sites version, x dtype)
    positions: list[int] | None         # indices of the targets the kernel adds into; None: it takes no part
    table: "Arena | None"               # the call's site group's table (filled per step by `KernelCalls.fill`)
    sites: tuple = ()                   # the site group (the table's key)


class KernelCalls:
    """What an `AdapterSlots` derives for the kernel, kept across steps: per (layer, site group) one `Arena` table
    indexed by slot, and per (layer, target sites) a call's layout -- so each of a decode step's ~120 calls is a
    dict lookup, a set check and the kernel call in Python. A swap drops one slot's rows (`forget`); the slot's
    rows are filled again at its first step (from its `PreparedAdapter` when it has one), the other slots' rows
    and every call layout stay (a call layout is rebuilt only when the set of adapted sites changes)."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.tables: dict[tuple, Arena] = {}              # (layer, sites) -> table
        self._calls: dict[tuple, KernelCall] = {}          # (layer, target sites) -> call layout
        self.epoch = 0                                     # bumped whenever any table's rows change

    def forget(self, slot: int) -> None:
        self.epoch += 1
        for table in self.tables.values():
            table.drop(slot)

    def slot_arenas(self) -> dict[tuple, SlotArena]:
        """(layer, sites, slot) -> SlotArena of every current row (tests and inspection)."""
        return {(*key, slot): t.slot_arena(slot) for key, t in self.tables.items() for slot in sorted(t.ready)}

    @staticmethod
    def segments(plan, max_rows: int) -> tuple[torch.Tensor | None, tuple[int, ...], bool]:
        """(`segments` of the step's plan, their slots, whether they are every slot of the step), once a step."""
        got = plan.memo.get(("kernel_segs", max_rows))
        if got is None:
            segs = segments(plan.groups, max_rows)
            slots = () if segs is None else tuple(segs[:, 0].tolist())
            got = plan.memo[("kernel_segs", max_rows)] = (segs, slots, len(slots) == len(plan.groups))
        return got

    def table(self, layer: int, sites: tuple, dtype: torch.dtype) -> Arena:
        t = self.tables.get((layer, sites))
        if t is None:
            t = self.tables[(layer, sites)] = Arena(self.num_slots, len(sites), dtype)
        return t

    def fill(self, table: Arena, sites: tuple, slots, data_of) -> Arena:
        """The table with a current row for every slot of `slots`; data_of(slot) -> the slot's `SlotData` for
        these sites or None (the slot adapts none of them), called for slots without a current row only."""
        if not table.ready.issuperset(slots):
            self.epoch += 1
            for slot in slots:
                if slot not in table.ready:
                    got = data_of(slot)
                    table.put(slot, got.arena(sites) if got is not None else SlotArena.empty(len(sites), table.dtype))
        return table

    def call(self, key: tuple, stamp: tuple, build) -> KernelCall:
        """The call layout for key, from build() -> KernelCall fields (positions, table, sites) when the stamp
        changed."""
        c = self._calls.get(key)
        if c is None or c.stamp != stamp:
            c = self._calls[key] = KernelCall(stamp, *build())
        return c


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
    lay = _stats_layout(arena, segs, len(outs))
    wout = torch.empty(lay.total, dtype=torch.float32)
    ext.adapter_rows(x, outs, arena.datas, arena.meta, segs, wout if lay.total else _NONE,
                     lay.woff if lay.total else _NO_OFF)
    for slot, o, n, g, N in lay.routed:
        stats.record(slot, wout[o:o + n * g * N].view(n, g, N))
    for slot, ones in lay.ones:
        stats.record(slot, ones)


@dataclass
class StatsLayout:
    """Where the kernel writes one call's routing weights (per the segments' row counts): woff [P, nsite] for the
    kernel, (slot, offset, n, g, N) per routed site, (slot, ones [n, g, 1]) per site without a router (read-only,
    shared: the stats only read them)."""

    woff: torch.Tensor
    routed: list[tuple[int, int, int, int, int]]
    ones: list[tuple[int, torch.Tensor]]
    total: int


STATS_LAYOUTS_KEPT = 64                  # per Arena: layouts of this many distinct segment sets (then start over)


def _stats_layout(arena: Arena, segs: torch.Tensor, nsite: int) -> StatsLayout:
    """The call's StatsLayout, cached on the arena by its segments (steps that sample statistics repeat them)."""
    seg_list = segs.tolist()
    key = tuple(map(tuple, seg_list))
    lay = arena.stats_layouts.get(key)
    if lay is not None:
        return lay
    woff = torch.full((len(seg_list), nsite), -1, dtype=torch.long)
    routed, ones, off = [], [], 0
    for p, (slot, lo, hi) in enumerate(seg_list):
        m = arena.meta_rows[slot]
        for si in range(nsite):
            used, _, _, r_off, N, g, _ = m[HEAD + SITE * si:HEAD + SITE * (si + 1)]
            if not used or not m[1]:
                continue
            if r_off < 0:
                ones.append((slot, torch.ones(hi - lo, g, 1)))
                continue
            woff[p, si] = off
            routed.append((slot, off, hi - lo, g, N))
            off += (hi - lo) * g * N
    if len(arena.stats_layouts) >= STATS_LAYOUTS_KEPT:
        arena.stats_layouts.clear()
    lay = arena.stats_layouts[key] = StatsLayout(woff, routed, ones, off)
    return lay
