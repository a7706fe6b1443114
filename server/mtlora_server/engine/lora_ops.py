"""Batched heterogeneous adapter ops: many adapters (mtlora / hydralora / lora) in one batch, one op per site.

Contract:
- `AdapterSlots` keeps every adapter in preallocated, zero-padded stacked tensors per (layer, site), sized for
  `max_adapters` slots the first time any adapter uses the site, so loading or clearing one slot only writes that
  slot's rows (no reallocation, stable `data_ptr`, no recompiles).
- Every token carries a slot index (-1: bare base model). `AdapterSlots.apply(layer, site, x, slot_idx)` returns the
  adapter delta [T, d_out] in x.dtype (zero rows for base tokens and for slots that do not use the site), or None
  when no loaded adapter uses the site. Math is exactly `mtlora.adapters.MoLoRA` (the oracle):
      h = A z, w = softmax_N(R z) per group (fp32),
      delta_k = s * sum_i w[group(k), i] * (B_i h)[k],  group(k) = k // (d_out // g_slot), s = alpha / r.
- Stacked layout for one site with S slots (`buffers(layer, site)`; the Triton kernel takes exactly these tensors):
      A [S, r_max, d_in], B [S, N_max, r_max, d_out] (native B_i [d_out, r] transposed once at load, so the
      expand is a plain matmul), R [S, g_max, N_max, d_in] (router rows group-major, as the native [g*N, d_in]
      router), expert_mask [S, N_max] bool, groups [S] long (>= 1), scaling [S] float.
- Paths: on CUDA with triton, the Triton kernel (`triton_molora.py`) per site; otherwise the grouped path
  `mtlora.grouped` (shared with the vLLM backend) per slot: `apply_shared(layer, x, targets, slot_idx,
  plan=SlotPlan)` takes the step's token -> slot segmentation (`SlotPlan`, computed once per step and reused by every
  site of every layer), fuses all sites that read the same input into one shrink matmul per slot (each slot's pack
  trimmed to its own r / N / g, cached until the slot changes), and adds each site's delta in place into its
  target (the matching slice of the fused projection output). On CPU, the slots with few contiguous rows in the
  step (<= KERNEL_ROWS: decode, short prefill chunks; any number in bf16 where the kernel has AVX-512 BF16 dot
  products) all go through one call of `cpu_adapters`' C++ kernel per site group when `cpu_kernel` is set (the
  engine sets it; that side of the class is `cpu_kernel_path.CpuKernelPath`); without it, slots with <=
  SMALL_ROWS rows of the same shape run together, STACK_MIN_SLOTS or more at a time (`slot_stack.py`: one bmm
  for their shrinks, one per site for their expands). The site list is `mtlora.sites.SITE_NAMES`.
  Test-only variants over the stacked layout (per-token loop, batched torch) live in tests/unit/molora_stacked.py.
  On CUDA, `apply_shared` with a plan runs the Triton kernels with the step's tile metadata (`SlotPlan.tiles`,
  engine/slot_plan.py), adding each site's delta in place, with no host sync inside a layer.
- `RoutingStats` (routing_stats.py, re-exported here) receives every path's routing weights when a step samples
  them.
"""

from __future__ import annotations

import logging
import math

import torch

from mtlora import grouped
from mtlora.config import AdapterConfig
from mtlora.errors import AdapterLoadError, ConfigError
from mtlora.inject import expected_shapes
from mtlora.sites import SITE_NAMES, site_dims

from . import cpu_adapters, slot_stack
from .cpu_kernel_path import CpuKernelPath
from .site_buffers import SiteBuffers, SlotFlags, SlotPack, pack_slot
from .invariant import pad_rows
from .routing_stats import RoutingStats  # noqa: F401  (re-exported: the engine and tests import it from here)
from .slot_plan import SlotPlan  # noqa: F401  (re-exported: the runner and tests import it from here)

log = logging.getLogger(__name__)

SITES = SITE_NAMES   # the adapter sites, in canonical order (defined once in mtlora.sites)
_MAX_TILE = 256
# A slot with at most this many rows in a step computes its adapter matmuls in fp32 on CPU: for a few rows oneDNN's
# bf16 GEMM costs ~20 us of fixed overhead per call against ~6 us in fp32 (measured on an avx512_bf16 EPYC; from
# ~64 rows bf16 wins). Decode steps are this case: each slot has a handful of rows per step.
SMALL_ROWS = 32
# With the CPU adapter kernel (cpu_adapters.py), slots with at most this many contiguous rows in the step go through
# it: measured against the per-slot torch path on SmolLM2's sites (4 mixed slots, bf16, 2 threads), the kernel is
# faster up to ~128 rows per slot (8.2 vs 18.9 ms per 30 layers at 32 rows, 32.7 vs 45.6 at 128) and slower from
# ~256 (58.6 vs 40.3), where oneDNN's GEMMs win. Decode slots and the short prefill chunks of many-adapter steps.
KERNEL_ROWS = 128
# ... except bf16 on a CPU with AVX-512 BF16 (the kernel's `BF16_DOT`): there its shrink runs on bf16 dot products
# and it is as fast as the torch path or faster at every slot size measured (a 2048-token prefill step of SmolLM2, bf16, 2 threads, adapter time:
# 4 slots of 512 rows lora4 81 -> 64 ms, mix4 177 -> 102 ms; one slot of 2048 rows lora4 75 / 76, mtlora 131 -> 99;
# docs/benchmarks.md), and computes in fp32 where the torch path rounds h to bf16: no row limit.
KERNEL_ROWS_BF16_DOT = 1 << 62
# With at least this many small slots adapting a site group in one step, they run together (slot_stack.py).
STACK_MIN_SLOTS = 2
# ... and slots with very unequal rows are split into runs (padding every slot to the largest costs arithmetic).
STACK_PAD_RATIO = 1.5


# -- segmentation (the Triton kernel's tiles) ---------------------------------------------------------------------
def segment_tiles(slot_idx: torch.Tensor, pad_row: int, min_tile: int = 1,
                  max_tile: int = _MAX_TILE) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Group the adapter tokens into tiles of `tile` rows that all share one slot (segment by slot).

    slot_idx: [T] (-1 = no adapter). Returns tile_slot [nt], tile_rows [nt, tile] (row indices into x; padding
    points at `pad_row`, an appended zero row) and the tile size. The tile is about T / (distinct slots), rounded
    up to a power of two, so padding stays below one tile per distinct slot.
    """
    rows = (slot_idx >= 0).nonzero().squeeze(1)                                     # [n]
    slots = slot_idx[rows]
    slots, order = torch.sort(slots, stable=True)
    rows = rows[order]
    uniq, counts = torch.unique_consecutive(slots, return_counts=True)              # [P], [P]
    n, P = rows.numel(), uniq.numel()
    if n == 0:
        return slot_idx.new_zeros(0), slot_idx.new_zeros(0, min_tile), min_tile
    tile = 1 << max(0, math.ceil(math.log2(max(1, -(-n // P)))))
    tile = max(min_tile, min(max_tile, tile))
    tiles_per = (counts + tile - 1) // tile                                         # [P]
    tile_slot = torch.repeat_interleave(uniq, tiles_per)                            # [nt]
    pos = torch.arange(n, device=rows.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # [n]
    first_tile = torch.repeat_interleave(tiles_per.cumsum(0) - tiles_per, counts)  # [n]
    tile_rows = torch.full((tile_slot.numel(), tile), pad_row, dtype=torch.long, device=rows.device)
    tile_rows[first_tile + pos // tile, pos % tile] = rows
    return tile_slot, tile_rows, tile


# -- the per-step plan and the fused per-slot path ---------------------------------------------------------------
class AdapterSlots(CpuKernelPath):
    """Preallocated adapter slots for a LLaMA-architecture base; one batched op per site per layer."""

    def __init__(self, model_config, max_adapters: int, max_rank: int = 16, max_experts: int = 16,
                 max_groups: int = 4, dtype=torch.float32, device="cpu"):
        for name, value in (("max_adapters", max_adapters), ("max_rank", max_rank),
                            ("max_experts", max_experts), ("max_groups", max_groups)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}", field=name)
        self.model_config = model_config
        self.num_layers = model_config.num_hidden_layers
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self.max_experts, self.max_groups = max_experts, max_groups
        self.dtype, self.device = dtype, torch.device(device)
        self._sites: dict[tuple[int, str], SiteBuffers] = {}
        self._configs: dict[int, AdapterConfig] = {}
        self._packs: dict[tuple, SlotPack | None] = {}                           # (layer, sites, slot) -> pack
        self._prepared: dict[int, cpu_adapters.PreparedAdapter] = {}             # slot -> the kernel's data
        self._stacks: dict[tuple, slot_stack.SlotStack] = {}                     # (layer, sites, shape) -> stack
        self.row_tile = 0              # batch-invariant mode: each slot's rows padded to a multiple (invariant.py)
        self.version = 0               # bumped by every load / clear (static-shape paths re-read `layout()`)
        self.cpu_kernel = None         # cpu_adapters' extension: small slots in one call per site group (CPU)
        self._kcalls = cpu_adapters.KernelCalls(max_adapters)     # the kernel's tables and call layouts
        self._step_sites: tuple = (None, [])           # step_sites' last (key, answer)
        self._bound_layouts: tuple = (None, [])        # bind_step's (key, per layer and call: _CallLayout | None)
        self._bound_step: tuple = (None, [])           # bind_step's last (key, per layer and call: RowsCall | None)
        self._stats_plan: tuple = (None, None)         # bind_step's last (key, bound_stats.StatsPlan)
        # every site's per-slot scalar fields, a row per (layer, site): loads and clears write them once per field
        self._flags = SlotFlags(self.num_layers * len(SITES), max_adapters, max_experts, self.device)
        self.sites_version = 0         # bumped when the set of adapted (layer, site)s changes (`_note_sites`)
        self._adapted: frozenset = frozenset()

    # -- loading -------------------------------------------------------------------------------------------------
    def _check_limits(self, slot: int, config: AdapterConfig) -> dict[str, int]:
        """Validate slot and sizes against the preallocated maxima; returns g per site."""
        if not 0 <= slot < self.max_adapters:
            raise AdapterLoadError(f"slot {slot} is out of range: this server has max_adapters "
                                   f"{self.max_adapters} (slots 0..{self.max_adapters - 1})")
        for field, value, limit in (("rank", config.rank, self.max_rank),
                                    ("num_experts", config.num_experts, self.max_experts)):
            if value > limit:
                raise AdapterLoadError(f"adapter {field} {value} exceeds the server's maximum {limit} "
                                       f"(raise max_{'rank' if field == 'rank' else 'experts'})")
        groups = {}
        for site in config.sites():
            try:
                g = config.groups_for(site_dims(self.model_config, site)[1])
            except ConfigError as exc:
                raise AdapterLoadError(f"routing_group_size: {exc}") from None
            if g > self.max_groups:
                raise AdapterLoadError(f"adapter routing groups (g) {g} at site {site} exceed the server's "
                                       f"maximum max_groups {self.max_groups} (field routing_group_size)")
            groups[site] = g
        return groups

    def _check_tensors(self, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
        expected = expected_shapes(self.model_config, config)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise AdapterLoadError(f"adapter tensors do not match the base model: missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]}")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise AdapterLoadError(f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
            if not torch.isfinite(tensors[name]).all():
                raise AdapterLoadError(f"tensor {name} contains NaN or Inf")

    def _site(self, layer: int, site: str) -> SiteBuffers:
        key = (layer, site)
        if key not in self._sites:   # lazily, but for every slot at once: later loads never reallocate
            d_in, d_out = site_dims(self.model_config, site)
            self._sites[key] = SiteBuffers(self.max_adapters, self.max_rank, self.max_experts, self.max_groups,
                                            d_in, d_out, self.dtype, self.device, self._flags)
            log.debug("allocated adapter buffers for layers.%d.%s", layer, site)
        return self._sites[key]

    def check(self, config: AdapterConfig, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Would this adapter fit a slot? (AdapterLoadError naming the limit or tensor; writes nothing)."""
        self._check_limits(0, config)
        if tensors is not None:
            self._check_tensors(config, tensors)

    def load(self, slot: int, config: AdapterConfig, tensors: dict[str, torch.Tensor],
             checked: bool = False, prepared: "cpu_adapters.PreparedAdapter | None" = None) -> None:
        """Write an adapter into `slot` (replacing what was there). Everything is checked before any write;
        `checked=True` skips the tensor pass (names, shapes, finiteness) for tensors that `check` (or
        `mtlora.checkpoint.load_adapter` with the model config) has validated already; the limits are always
        checked. `prepared`: `prepare(config, tensors)` of these very tensors, kept for the kernel (no arena is
        derived from the buffers on the step thread then); ignored when made for another dtype or layout."""
        groups = self._check_limits(slot, config)
        if not checked:
            self._check_tensors(config, tensors)
        self.clear(slot)
        r, N = config.rank, config.num_experts
        written: list[tuple[SiteBuffers, int]] = []
        with torch.no_grad():
            for layer in range(self.num_layers):
                for site, g in groups.items():
                    buf, prefix = self._site(layer, site), f"layers.{layer}.{site}"
                    buf.dims[slot] = (r, N, g)    # first: a write that fails midway is still cleared later
                    buf.A[slot, :r] = tensors[f"{prefix}.lora_A"].to(self.device, self.dtype)      # [r, d_in]
                    lora_b = tensors[f"{prefix}.lora_B"].to(self.device, self.dtype)              # [N, d_out, r]
                    buf.B[slot, :N, :r] = lora_b.transpose(1, 2)
                    if config.has_router:   # native router rows are group-major: [g*N, d_in] -> [g, N, d_in]
                        router = tensors[f"{prefix}.router"].to(self.device, self.dtype)
                        buf.R[slot, :g, :N] = router.view(g, N, -1)
                    written.append((buf, g))
            # the slot's flags for all its sites at once, then it counts as a user: nothing is half-loaded
            self._flags.set([buf.row for buf, _ in written], slot, [g for _, g in written], config.scaling, N)
        for buf, _ in written:
            buf.users.add(slot)
        self._configs[slot] = config
        if prepared is not None and prepared.dtype == self.dtype \
                and prepared.pairs == cpu_adapters.pair_layout(self.cpu_kernel, self.dtype):
            self._prepared[slot] = prepared
        self.version += 1
        self._note_sites()
        log.info("loaded %s adapter into slot %d (r=%d, N=%d, sites=%s)", config.method, slot, r, N,
                 ",".join(groups))

    def clear(self, slot: int) -> None:
        """Zero the slot in every allocated site; buffers stay allocated."""
        if not 0 <= slot < self.max_adapters:
            raise AdapterLoadError(f"slot {slot} is out of range 0..{self.max_adapters - 1}")
        with torch.no_grad():
            self._flags.reset([buf.row for buf in self._sites.values() if buf.clear(slot)], slot)
        self._configs.pop(slot, None)
        self._prepared.pop(slot, None)
        self.version += 1
        # A pack holds one slot's rows only: the other slots' packs stay valid (adapter swaps rebuild one slot's).
        self._packs = {key: pack for key, pack in self._packs.items() if key[-1] != slot}
        self._kcalls.forget(slot)
        self._bound_step = (None, [])                  # (its calls hold the slot's dropped arenas)
        self._note_sites()
        for key, stack in list(self._stacks.items()):
            stack.forget(slot)
            if not stack.row_of:
                del self._stacks[key]

    def active_sites(self, layer: int) -> list[str]:
        return [site for site in SITES if (layer, site) in self._sites and self._sites[(layer, site)].users]

    def _note_sites(self) -> None:
        """After a load / clear: bump `sites_version` when the set of (layer, site)s some slot adapts changed (the
        per-call kernel layouts and `step_sites` depend on that set only, not on which slot holds what)."""
        adapted = frozenset(key for key, buf in self._sites.items() if buf.users)
        if adapted != self._adapted:
            self._adapted, self.sites_version = adapted, self.sites_version + 1

    def step_sites(self, used: frozenset | None) -> list[frozenset]:
        """Per layer, the sites some loaded slot adapts there, among `used` (a step's sites; None: all). Kept
        per (sites version, used): a step asks once, not once per layer."""
        key = (self.sites_version, used)
        if self._step_sites[0] != key:
            self._step_sites = (key, [frozenset(s for s in self.active_sites(layer) if used is None or s in used)
                                      for layer in range(self.num_layers)])
        return self._step_sites[1]

    def layout(self) -> dict[tuple[int, str], tuple[int, int, int]]:
        """(layer, site) -> (r, N, g) maxima over the slots loaded there ((1, 1, 1) when none is), for every
        allocated site (decode_graphs.py sizes its static-shape adapter work from it)."""
        return {key: tuple(max(d[i] for d in buf.dims.values()) for i in range(3)) if buf.dims else (1, 1, 1)
                for key, buf in self._sites.items()}

    def buffers(self, layer: int, site: str) -> tuple | None:
        """(A, B, R, expert_mask, groups, scaling) of an allocated site, else None (tests, kernels)."""
        buf = self._sites.get((layer, site))
        return None if buf is None else buf.tensors()

    def used(self, layer: int, site: str) -> torch.Tensor:
        """[S] bool: which slots adapt this allocated site (fixed tensor, updated in place by load / clear)."""
        return self._sites[(layer, site)].used

    # -- the op --------------------------------------------------------------------------------------------------
    def apply(self, layer: int, site: str, x: torch.Tensor, slot_idx: torch.Tensor,
              stats: RoutingStats | None = None) -> torch.Tensor | None:
        """x: [T, d_in], slot_idx: [T] long -> delta [T, d_out] in x.dtype, or None if no adapter uses the site."""
        buf = self._sites.get((layer, site))
        if buf is None or not buf.users:
            return None
        slot_idx = slot_idx.to(x.device).long()
        # Tokens whose adapter does not adapt this site count as base tokens here (and stay out of the stats).
        eff = torch.where((slot_idx >= 0) & buf.used[slot_idx.clamp_min(0)], slot_idx, -1)   # [T]
        if x.is_cuda:
            from . import triton_molora
            if triton_molora.available():   # full padded sizes: constexprs never change, so no recompiles
                return triton_molora.molora_triton(x, eff, *buf.tensors(), stats=stats)
        out = x.new_zeros(x.shape[0], buf.B.shape[3])                               # [T, d_out]
        self._apply_planned(layer, x, [(site, out)], SlotPlan(eff), stats)
        return out

    def apply_shared(self, layer: int, x: torch.Tensor, targets: list[tuple[str, torch.Tensor]],
                     slot_idx: torch.Tensor, stats: RoutingStats | None = None,
                     plan: SlotPlan | None = None) -> None:
        """Add the deltas of several sites that all read `x` [T, d_in], in place: targets = [(site, out [T, d_out])]
        (out may be a column slice of a fused projection output). Same math as `apply` per site; with a plan on
        CPU all sites are fused per slot into one shrink matmul, otherwise this is one `apply` per site."""
        if plan is not None and x.is_cuda and self._triton():
            self._apply_triton(layer, x, targets, plan, stats)
            return
        if plan is not None and self.cpu_kernel is not None and not x.is_cuda and not self.row_tile \
                and self._kernel_only(layer, x, targets, plan, stats):
            return
        if plan is None or x.is_cuda:
            for site, out in targets:
                delta = self.apply(layer, site, x, slot_idx, stats)
                if delta is not None:
                    out += delta.to(out.dtype)
            return
        self._apply_planned(layer, x, targets, plan, stats)

    def _apply_planned(self, layer: int, x: torch.Tensor, targets: list[tuple[str, torch.Tensor]],
                       plan: SlotPlan, stats: RoutingStats | None) -> None:
        """Per slot of the plan: one shrink matmul for all its sites among `targets`, then each site's expand
        (`mtlora.grouped`), added in place into the site's target."""
        bufs = self._bufs(layer, targets)
        if not bufs:
            return
        key_sites = tuple(targets[i][0] for i, _ in bufs)
        stacked = set()
        if not self.row_tile and not x.is_cuda:
            if self.cpu_kernel is not None:
                stacked = self._apply_kernel(layer, x, targets, bufs, key_sites, plan, stats)
            else:
                stacked = self._apply_stacked(layer, x, targets, bufs, key_sites, plan, stats)
        x32: list[torch.Tensor] = []                # x in fp32, cast once for all the small slots of this call
        for slot, rows in plan.groups.items():
            sp = None if slot in stacked else self._slot_pack(layer, key_sites, bufs, slot)
            if sp is None:                                                          # slot adapts none of these
                continue
            if isinstance(rows, slice) and not self.row_tile:
                self._apply_slot_view(x, rows, sp, targets, slot, stats, x32)
                continue
            xs = x.index_select(0, rows) if isinstance(rows, torch.Tensor) else x[rows]
            n = xs.shape[0]
            hz = grouped.shrink(pad_rows(xs, self.row_tile), sp.pack)              # [n (+ pad), sum(r + g*N)]
            for i, part in zip(sp.targets, sp.pack.parts):
                delta, w = grouped.expand(hz, part)
                delta, w = delta[:n], (None if w is None else w[:n])
                out = targets[i][1]
                if isinstance(rows, slice):
                    out[rows] += delta.to(out.dtype)
                else:
                    out.index_add_(0, rows, delta.to(out.dtype))
                if stats is not None:
                    self._record(stats, slot, part, w, n, x.device)

    def _bufs(self, layer: int, targets) -> list[tuple[int, "SiteBuffers"]]:
        """(index in targets, buffers) of the targets' sites allocated here and used by some slot."""
        bufs = [(i, self._sites.get((layer, site))) for i, (site, _) in enumerate(targets)]
        return [(i, b) for i, b in bufs if b is not None and b.users]

    def _slot_pack(self, layer: int, key_sites: tuple, bufs, slot: int) -> "SlotPack | None":
        """The slot's pack for these sites (built on first use, kept until the slot changes)."""
        key = (layer, key_sites, slot)
        if key not in self._packs:
            self._packs[key] = pack_slot(bufs, slot)
        return self._packs[key]

    def _kernel_rows(self, dtype: torch.dtype) -> int:
        """The most contiguous rows of one slot the kernel takes (KERNEL_ROWS / KERNEL_ROWS_BF16_DOT above)."""
        if dtype == torch.bfloat16 and getattr(self.cpu_kernel, "BF16_DOT", False):
            return KERNEL_ROWS_BF16_DOT
        return KERNEL_ROWS

    def _apply_stacked(self, layer: int, x: torch.Tensor, targets, bufs, key_sites: tuple,
                       plan: SlotPlan, stats: RoutingStats | None) -> set[int]:
        """The slots with few rows (<= SMALL_ROWS, contiguous) run together, STACK_MIN_SLOTS or more of the same
        shape at a time, through the layer's `SlotStack`s (slot_stack.py); returns the slots done."""
        by_shape: dict[tuple, list[int]] = {}
        per_target = self._bufs_by_target(bufs, targets)                          # once per call, not per slot
        for slot, rows in plan.groups.items():
            if isinstance(rows, slice) and rows.stop - rows.start <= SMALL_ROWS:
                shape = tuple(b.dims.get(slot) if b is not None else None for b in per_target)
                if any(shape):
                    by_shape.setdefault(shape, []).append(slot)
        done: set[int] = set()
        for shape, members in by_shape.items():
            for slots in slot_stack.split_runs(members, plan.groups, STACK_PAD_RATIO):
                if len(slots) >= STACK_MIN_SLOTS:
                    self._run_stack(layer, x, targets, bufs, key_sites, plan, shape, slots, stats)
                    done.update(slots)
        return done

    def _run_stack(self, layer: int, x: torch.Tensor, targets, bufs, key_sites: tuple, plan: SlotPlan,
                   shape: tuple, slots: list[int], stats: RoutingStats | None) -> None:
        key = (layer, key_sites, shape)
        stack = self._stacks.get(key)
        if stack is None:
            stack = self._stacks[key] = slot_stack.SlotStack(x.shape[1], [t.shape[1] for _, t in targets], shape)
        stack_rows = [stack.refresh(s, self._slot_pack(layer, key_sites, bufs, s)) for s in slots]
        memo = ("stack_rows", key_sites, shape, tuple(slots))
        if memo not in plan.memo:
            plan.memo[memo] = slot_stack.StepRows.build(plan.groups, slots, stack_rows)
        rows = plan.memo[memo]
        # record(i, w): w [n_real, g, N] fp32, rows in rows.owner order (exact form: one shape)
        record = None if stats is None else (lambda i, w: stats.record(rows.owner.to(x.device), w))
        slot_stack.apply(x, stack, rows, targets, record)

    @staticmethod
    def _bufs_by_target(bufs, targets) -> list:
        """Each target's site buffers, or None (no loaded adapter uses the site)."""
        of = dict(bufs)
        return [of.get(i) for i in range(len(targets))]

    def _apply_slot_view(self, x: torch.Tensor, rows: slice, sp: SlotPack, targets, slot: int,
                         stats: RoutingStats | None, x32: list[torch.Tensor]) -> None:
        """The common case (contiguous rows, not batch-invariant): shrink on the row view, each site's delta added
        in place into its target's row view. A slot with few rows computes in fp32 (`SMALL_ROWS`), reading x32[0],
        the fp32 copy of x made by the first small slot of the call."""
        n = rows.stop - rows.start
        pk = sp.pack
        if n <= SMALL_ROWS and not x.is_cuda and x.dtype != torch.float32:
            if not x32:
                x32.append(x.float())
            x, pk = x32[0], pk.float()
        hz = grouped.shrink(x[rows], pk)                                            # [n, sum(r + g*N)]
        for i, part in zip(sp.targets, pk.parts):
            w = grouped.expand_into(hz, part, targets[i][1][rows])
            if stats is not None:
                self._record(stats, slot, part, w, n, x.device)

    @staticmethod
    def _record(stats: RoutingStats, slot: int, part: grouped.PackedSite, w: torch.Tensor | None, n: int,
                device) -> None:
        """Routing statistics of n tokens of one slot at one site (w [n, g, N] fp32, the slot's own g and N;
        None: one expert)."""
        stats.record(slot, torch.ones(n, part.g, 1, device=device) if w is None else w)

    @staticmethod
    def _triton() -> bool:
        from . import triton_molora
        return triton_molora.available()

    def _apply_triton(self, layer: int, x: torch.Tensor, targets: list[tuple[str, torch.Tensor]],
                      plan: SlotPlan, stats: RoutingStats | None) -> None:
        """CUDA: each site's delta added in place by the Triton kernels, tile metadata from the step's plan (built
        once per step): nothing here synchronises with the host, so a CUDA graph can capture it."""
        from . import triton_molora
        cfg = triton_molora.tile_config(plan.T, self.dtype)
        tiles = plan.tiles(cfg.bt, self.max_adapters)
        for site, out in targets:
            buf = self._sites.get((layer, site))
            if buf is None or not buf.users:
                continue
            triton_molora.molora_add_(x, tiles, buf.A, buf.B, buf.R, buf.nexp, buf.groups, buf.scaling, out, cfg,
                                      stats=stats, expert_mask=buf.expert_mask)
