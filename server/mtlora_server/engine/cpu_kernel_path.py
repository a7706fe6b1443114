"""The CPU adapter kernel's side of `lora_ops.AdapterSlots`: which calls go to `cpu_adapters`' C++ kernel, and
the per-slot kernel data they read (split out of lora_ops to keep the slot table's module readable).

Contract:
- `CpuKernelPath` is a mixin of `AdapterSlots`; it reads the host's `cpu_kernel`, `dtype`, `device`, `row_tile`,
  `num_layers`, `sites_version`, `_kcalls` (a `cpu_adapters.KernelCalls`), `_prepared` (slot -> PreparedAdapter),
  and its `_bufs`, `_slot_pack`, `_kernel_rows`, `_check_limits`.
- `_kernel_only(layer, x, targets, plan, stats) -> bool`: the decode case, one kernel call for the whole site
  group; False (nothing done) when some slot of the step is past the kernel's row limit or the operands do not
  suit it. `_apply_kernel(...)`: the kernel's share of a mixed step (the slots within the limit); returns them.
- `_arena(layer, key_sites, bufs, slots)`: the site group's table with a current row for each of `slots` (from
  the adapter's `PreparedAdapter` when it came with one, else derived from the slot buffers).
- `prepare(config, tensors)`: the kernel data of a validated adapter for `load(..., prepared=)`, any thread.
- `bind_step(plan, stats, dtype, calls) -> BoundStep | None`: the decoder's whole step through the kernel with the
  Python per call cut to one bound C++ call: for every layer and every `AdaptCall` of the decoder (its 4 adapter
  call sites: the sites that read one input, and where each writes: the call's `out`, or columns of its fused
  projection output), a `RowsCall` over the site group's table (`cpu_adapters.Arena.bind`), or None where no
  slot of the step adapts a site of the call; on a step that samples routing statistics the calls write them
  into one buffer recorded into the step's `RoutingStats` (bound_stats.py). None (the decoder goes through
  `apply_shared`): no kernel, not CPU, batch-invariant mode, a dtype the kernel does not take, or a slot of the
  step past the kernel's row limit. Same tables, same kernel, same arithmetic as `_kernel_only`: a
  `BoundStep` call adds exactly what `apply_shared` would (tests/unit/test_cpu_kernel_bound.py).
  (Why: ~120 calls a decode step each spent ~15-20 us in Python -- target lists, column views, layout lookups,
  the list arguments' conversion -- about 2 % of a batch-64 step with 4 adapters: docs/benchmarks.md.) Bound per
  (sites version, dtype, calls); per step only when the step's slot set or a table changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch

from mtlora.config import AdapterConfig
from mtlora.errors import AdapterLoadError
from mtlora.sites import BY_NAME, FusedColumn

from . import cpu_adapters
from .bound_stats import StatsPlan
from .routing_stats import RoutingStats
from .slot_plan import SlotPlan

log = logging.getLogger("mtlora_server.engine.lora_ops")


@dataclass(frozen=True)
class AdaptCall:
    """One adapter call site of the decoder: the sites that read one input -- `site`, whose delta goes into the
    call's `out` [T, width], and `columns`, whose deltas go into their columns of the call's fused projection
    output."""

    site: str
    width: int
    columns: tuple[FusedColumn, ...] = ()

    def targets(self) -> list[tuple[str, int, int, int]]:
        """(site, source: 0 = out | 1 = fused, first column, width) of every site of the call."""
        return [(self.site, 0, 0, self.width)] + [(c.site, 1, c.start, c.width) for c in self.columns]


@dataclass
class BoundStep:
    """A step's kernel calls (`bind_step`): layers[layer][call] a `RowsCall` (args: x, out, fused, segs, wout,
    woff) or None (nothing to add); `segs` the step's segments, the same for every call."""

    layers: list[list]
    segs: torch.Tensor


@dataclass
class _CallLayout:
    """One (layer, AdaptCall)'s part in the kernel while the adapted sites stay the same."""

    layer: int
    table: cpu_adapters.Arena
    sites: tuple[str, ...]         # the call's sites some slot adapts here (the table's key), in call order
    bufs: list                     # `_bufs` of them (index in `sites`, SiteBuffers)
    cols: tuple                    # per site of `sites`: (source, first column, width)


class CpuKernelPath:
    """Mixin of `lora_ops.AdapterSlots`: the C++ adapter kernel's calls and data (module doc)."""

    def bind_step(self, plan: SlotPlan, stats: RoutingStats | None, dtype: torch.dtype,
                  calls: tuple[AdaptCall, ...]) -> BoundStep | None:
        """The step's kernel calls bound, or None: the `apply_shared` path runs (module doc)."""
        if self.cpu_kernel is None or self.device.type != "cpu" or self.row_tile \
                or dtype not in (torch.float32, torch.bfloat16) or self.dtype not in (torch.float32, dtype):
            return None
        segs, slots, whole = cpu_adapters.KernelCalls.segments(plan, self._kernel_rows(dtype))
        if not whole or segs is None:
            return None
        key = (self.sites_version, dtype, calls)
        if self._bound_layouts[0] != key:
            self._bound_layouts = (key, [[self._call_layout(layer, call) for call in calls]
                                         for layer in range(self.num_layers)])
        step_key = (key, slots, self._kcalls.epoch)
        if self._bound_step[0] != step_key:
            layers = [[self._bind(lay, slots) for lay in row] for row in self._bound_layouts[1]]
            self._bound_step = ((key, slots, self._kcalls.epoch), layers)       # (the epoch after any fill)
        step = BoundStep(self._bound_step[1], segs)
        return step if stats is None else self._with_stats(step, stats)

    def _with_stats(self, step: BoundStep, stats: RoutingStats) -> BoundStep:
        """The step's calls writing their routing weights into one buffer recorded into `stats` (bound_stats.py;
        the plan kept while the binding and the segments stay the same)."""
        key = (self._bound_step[0], tuple(map(tuple, step.segs.tolist())))
        if self._stats_plan[0] != key:
            calls = [[None if c is None else (lay.table.meta_rows, len(lay.sites)) for c, lay in zip(row, lays)]
                     for row, lays in zip(step.layers, self._bound_layouts[1])]
            self._stats_plan = (key, StatsPlan.of(calls, step.segs))
        plan = self._stats_plan[1]
        wout = plan.record(stats)
        return BoundStep([[None if c is None else partial(c, wout=wout, woff=w) for c, w in zip(row, woffs)]
                          for row, woffs in zip(step.layers, plan.woff)], step.segs)

    def _call_layout(self, layer: int, call: AdaptCall) -> _CallLayout | None:
        targets = call.targets()
        bufs = self._bufs(layer, [(site, None) for site, *_ in targets])
        if not bufs:
            return None
        sites = tuple(targets[i][0] for i, _ in bufs)
        return _CallLayout(layer, self._kcalls.table(layer, sites, self.dtype), sites,
                           [(k, b) for k, (_, b) in enumerate(bufs)], tuple(targets[i][1:] for i, _ in bufs))

    def _bind(self, lay: _CallLayout | None, slots: tuple[int, ...]):
        """The layout's RowsCall with a current row for every slot of the step, or None (nothing to add)."""
        if lay is None:
            return None
        table = lay.table if lay.table.ready.issuperset(slots) else self._arena(lay.layer, lay.sites, lay.bufs,
                                                                                 slots)
        if not any(table.meta_rows[slot][1] for slot in slots):
            return None
        return table.bind(self.cpu_kernel, lay.cols)

    def _kernel_only(self, layer: int, x: torch.Tensor, targets, plan: SlotPlan,
                     stats: RoutingStats | None) -> bool:
        """The decode case, every slot of the step within the kernel's reach (<= KERNEL_ROWS contiguous rows): one
        kernel call whose layout is cached per (layer, target sites) while the set of adapted sites stays the
        same, over its site group's table (rows filled for slots that lack one). False (nothing done): the general
        path runs. (Runs ~120 times a decode step: the step's segments are looked up once per step in the plan's
        memo.)"""
        step = plan.memo.get(("kernel", x.dtype))
        if step is None:
            step = plan.memo[("kernel", x.dtype)] = cpu_adapters.KernelCalls.segments(plan,
                                                                                      self._kernel_rows(x.dtype))
        segs, slots, whole = step
        if not whole:
            return False
        c = self._kcalls.call((layer, tuple([t[0] for t in targets])), (self.sites_version, x.dtype),
                              lambda: self._kernel_layout(layer, x, targets))
        if c.positions is None:
            return False
        if c.positions:
            table = c.table if c.table.ready.issuperset(slots) else \
                self._arena(layer, c.sites, self._bufs(layer, targets), slots)
            cpu_adapters.add_rows(self.cpu_kernel, x, [targets[i][1] for i in c.positions], table, segs, stats)
        return True

    def _kernel_layout(self, layer: int, x: torch.Tensor, targets) -> tuple:
        """(positions of the targets the kernel adds into, their site group's table, the group), or (None, None,
        ()) when it cannot."""
        bufs = self._bufs(layer, targets)
        if not cpu_adapters.suits(x, [targets[i][1] for i, _ in bufs]):
            return None, None, ()
        if not bufs:
            return [], None, ()
        key_sites = tuple(targets[i][0] for i, _ in bufs)
        return [i for i, _ in bufs], self._kcalls.table(layer, key_sites, self.dtype), key_sites

    def _apply_kernel(self, layer: int, x: torch.Tensor, targets, bufs, key_sites: tuple,
                      plan: SlotPlan, stats: RoutingStats | None) -> set[int]:
        """Every slot with few contiguous rows (<= KERNEL_ROWS: decode, short prefill chunks) in one call of
        cpu_adapters' kernel for this site group, recording routing weights when the step samples them; returns
        the slots done (none when dtypes or layouts do not suit the kernel)."""
        outs = [targets[i][1] for i, _ in bufs]
        segs, slots, _ = cpu_adapters.KernelCalls.segments(plan, self._kernel_rows(x.dtype))
        if segs is None or not cpu_adapters.suits(x, outs):
            return set()
        cpu_adapters.add_rows(self.cpu_kernel, x, outs, self._arena(layer, key_sites, bufs, slots), segs, stats)
        return set(slots)

    def _arena(self, layer: int, key_sites: tuple, bufs, slots: tuple[int, ...]) -> cpu_adapters.Arena:
        """The table of these sites with a current row for each of `slots` (cpu_adapters.KernelCalls: a slot's
        row is built on its first use and kept until that slot changes; from the adapter's `PreparedAdapter`
        when it came with one, else derived from the slot buffers here)."""
        table = self._kcalls.table(layer, key_sites, self.dtype)
        if table.ready.issuperset(slots):
            return table
        position = {i: k for k, (i, _) in enumerate(bufs)}
        reads = {BY_NAME[site].reads for site in key_sites}

        def data_of(slot: int):
            prepared = self._prepared.get(slot)
            if prepared is not None and len(reads) == 1:
                data = prepared.groups.get((layer, next(iter(reads))))
                if data is None or all(key in key_sites for key, _ in data.parts):
                    return data                   # (a call over a subset of the group's sites derives its own)
            sp = self._slot_pack(layer, key_sites, bufs, slot)
            pairs = cpu_adapters.pair_layout(self.cpu_kernel, self.dtype)
            return None if sp is None else cpu_adapters.SlotData.of(
                sp.pack, [key_sites[position[t]] for t in sp.targets], pairs)
        return self._kcalls.fill(table, key_sites, slots, data_of)

    def prepare(self, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> "cpu_adapters.PreparedAdapter | None":
        """The CPU kernel's data of a validated adapter (`cpu_adapters.prepare`), for `load(..., prepared=)`; safe in
        any thread (reads no slot state). None where the kernel does not run the adapter work (no kernel, not CPU,
        batch-invariant mode) or the adapter does not fit the limits (`load` says why); a failure here is logged and
        gives None too (the lazy path still serves the adapter), so it never fails a load."""
        if self.cpu_kernel is None or self.device.type != "cpu" or self.row_tile:
            return None
        try:
            groups = self._check_limits(0, config)
        except AdapterLoadError:
            return None
        try:
            return cpu_adapters.prepare(config, tensors, groups, self.num_layers, self.dtype,
                                        cpu_adapters.pair_layout(self.cpu_kernel, self.dtype))
        except Exception as exc:  # noqa: BLE001 - an optimisation only: the slot derives the data on first use
            log.warning("kernel data for a %s adapter not prepared (%s: %s); it is derived on first use",
                        config.method, type(exc).__name__, exc)
            return None

