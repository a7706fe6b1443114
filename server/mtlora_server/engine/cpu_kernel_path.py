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
"""

from __future__ import annotations

import logging

import torch

from mtlora.config import AdapterConfig
from mtlora.errors import AdapterLoadError
from mtlora.sites import BY_NAME

from . import cpu_adapters
from .routing_stats import RoutingStats
from .slot_plan import SlotPlan

log = logging.getLogger("mtlora_server.engine.lora_ops")


class CpuKernelPath:
    """Mixin of `lora_ops.AdapterSlots`: the C++ adapter kernel's calls and data (module doc)."""

    def _kernel_only(self, layer: int, x: torch.Tensor, targets, plan: SlotPlan,
                     stats: RoutingStats | None) -> bool:
        """The decode case, every slot of the step within the kernel's reach (<= KERNEL_ROWS contiguous rows): one
        kernel call whose layout is cached per (layer, target sites) while the set of adapted sites stays the
        same, over its site group's table (rows filled for slots that lack one). False (nothing done): the general
        path runs. (Runs ~120 times a decode step: the step's segments are looked up once per step in the plan's
        memo.)"""
        step = plan.memo.get(("kernel", x.dtype))
        if step is None:
            step = plan.memo[("kernel", x.dtype)] = cpu_adapters.KernelCalls.segments(plan, self._kernel_rows(x))
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
        segs, slots, _ = cpu_adapters.KernelCalls.segments(plan, self._kernel_rows(x))
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

