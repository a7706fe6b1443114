"""Triton kernels for the batched heterogeneous MoLoRA op (the math of `mtlora.adapters.MoLoRA`, as `mtlora.grouped`).

Contract:
- The step's tokens are cut into tiles of BT rows that share one slot (`build_tiles`, called once per step through
  `lora_ops.SlotPlan.tiles`). The tile metadata is ONE int32 tensor [NT, 1 + BT] on the device (column 0: the
  tile's slot, -1 for a dead tile; then its BT token rows, T marking padding), built on the host from the step's
  host-side slot list and copied in one transfer. NT = cdiv(T, BT) + min(T, max_slots) depends only on the
  step's token count and the preallocated slot count, never on device data, so a captured CUDA graph of a
  bucket replays with new metadata copied into the same buffer.
- Inside a layer nothing synchronises with the host: no `.item()`, no `.tolist()`, no shape that depends on
  device data. Tiles whose slot does not adapt the site (its expert count `nexp[s]` is 0) and dead tiles run
  zero-trip loops and store nothing.
- Two launches per site:
  1. `_shrink_kernel`, grid (NT, KSPLIT): the tile's h = A_s x [BT, r] and router logits R_s x [BT, G*N] over
     one of KSPLIT slices of d_in (sharing every load of x), written as fp32 partials (no atomics: summed in a
     fixed order by the expand, so results are deterministic).
  2. `_expand_kernel`, grid (NT, cdiv(d_out, BKO)): sums the partials, takes the softmax per group over the
     slot's real experts (fp32), and for each routing group its output block touches (one, unless the block
     straddles a group boundary) one `tl.dot` of U = w_group (x) h [BT, N*r] with B_s [N*r, BKO]; a channel only
     ever accumulates its own group (no G-fold accumulator). The delta (times the slot's scaling) is added in
     place into the target (which may be a column slice of a fused projection output).
- Tile sizes come from `TILE_TABLE` (by step size T); `mtlora-bench gpu` sweeps candidates on the device and
  reports the winners; `set_tile_table` installs a table. Kernel constexprs depend on the preallocated maxima and
  the tile config only, so loading adapters never recompiles.
- fp32 inputs: arithmetic in fp32 (`input_precision="ieee"`). bf16 / fp16 inputs: the dots take the native dtype
  on tensor cores with fp32 accumulation (U = w h is rounded to the weight dtype first); softmax and accumulators
  are fp32. On CPU the kernels run under `TRITON_INTERPRET=1` (tests and `mtlora-bench gpu --dry-run`); there the
  dots always upcast to fp32, because the interpreter's bf16 dot is wrong, so the native half-precision dot is
  only exercised on a GPU (item 1 of `mtlora-bench gpu`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional; the torch path is used instead
    triton = None
    tl = None


def available() -> bool:
    """True when triton imports (the caller decides CUDA vs interpreter)."""
    return triton is not None


def interpreter_enabled() -> bool:
    """True when the Triton interpreter is switched on for this process (CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, 1 << max(0, (int(n) - 1).bit_length()))


# -- tile configuration ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    """bt: token rows per tile (>= 16 for tl.dot); bk: d_in chunk of the shrink loop; ksplit: shrink programs
    per tile along d_in; bko: output channels per expand program; num_warps: for both kernels."""

    bt: int = 16
    bk: int = 64
    ksplit: int = 4
    bko: int = 64
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("bt", "bk", "bko"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {v}")
        if self.ksplit < 1 or self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"TileConfig ksplit must be >= 1 and num_warps a power of two <= 16: {self}")


# (largest step size T, config), first match wins. Tuned on one H200 (`mtlora-bench gpu` tile sweep, 2026-12-04,
# commit b561e27: the 7B FFN block site, 8 slots of N 16 / r 16 / g 2, every token on its own adapter; device time
# per call at T = 1 / 16 / 64 / 256 / 2048: 6.4 / 10.8 / 12.1 / 17.8 / 70.2 us, against 36.7 / 44.1 / 44.1 / 45.5 /
# 105.6 us for the slowest candidate). Another GPU: run the sweep and install its "tile_table" (`set_tile_table`).
DEFAULT_TILE_TABLE: list[tuple[int, TileConfig]] = [
    (1, TileConfig(bt=16, bk=128, ksplit=16, bko=64, num_warps=4)),
    (256, TileConfig(bt=16, bk=64, ksplit=8, bko=64, num_warps=4)),
    (1 << 62, TileConfig(bt=32, bk=64, ksplit=4, bko=64, num_warps=4)),
]
TILE_TABLE: list[tuple[int, TileConfig]] = list(DEFAULT_TILE_TABLE)


def set_tile_table(table: list[tuple[int, TileConfig]] | None) -> None:
    """Install a tile table (None: the defaults). The last entry must cover every T."""
    global TILE_TABLE
    table = list(DEFAULT_TILE_TABLE if table is None else table)
    if not table or table[-1][0] < 1 << 40:
        raise ValueError("the tile table's last entry must cover every step size (max_T >= 2**40)")
    TILE_TABLE = table


# fp32 (the exact path: tests, reference checks) always uses one small config: fp32 `ieee` dots of big tiles take
# minutes to compile, and fp32 is not the dtype anyone serves fast.
FP32_TILE = TileConfig(bt=16, bk=64, ksplit=4, bko=64, num_warps=4)


def tile_config(T: int, dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    """The tile configuration for a step of T tokens in `dtype` (the table is for bf16 / fp16)."""
    if dtype == torch.float32:
        return FP32_TILE
    for max_t, cfg in TILE_TABLE:
        if T <= max_t:
            return cfg
    return TILE_TABLE[-1][1]


# -- per-step tile metadata (host side, once per step) ------------------------------------------------------------
@dataclass
class TileMeta:
    """The step's tiles on the device: meta [NT, 1 + bt] int32 (slot or -1, then bt rows; T = padding)."""

    meta: torch.Tensor
    bt: int
    T: int

    @property
    def n_tiles(self) -> int:
        return self.meta.shape[0]

    @property
    def tile_slot(self) -> torch.Tensor:        # [NT] int32 view
        return self.meta[:, 0]

    @property
    def tile_rows(self) -> torch.Tensor:        # [NT, bt] int32 view
        return self.meta[:, 1:]


def max_tiles(T: int, bt: int, max_slots: int) -> int:
    """Tiles a step of T tokens can need: each slot present adds at most one partial tile."""
    return -(-T // bt) + min(T, max_slots)


def build_tiles(slot_idx: torch.Tensor, bt: int, max_slots: int, device: torch.device | str) -> TileMeta:
    """slot_idx: [T] on the HOST (-1 = base). Tiles of one slot each, in slot order; one copy to `device`."""
    slot_idx = slot_idx.to("cpu", torch.long)
    T = int(slot_idx.shape[0])
    nt = max_tiles(T, bt, max_slots)
    meta = torch.full((nt, 1 + bt), T, dtype=torch.int32)
    meta[:, 0] = -1
    rows = (slot_idx >= 0).nonzero().squeeze(1)                                      # [n] adapter tokens
    if rows.numel():
        slots, order = torch.sort(slot_idx[rows], stable=True)
        rows = rows[order]
        uniq, counts = torch.unique_consecutive(slots, return_counts=True)           # [P], [P]
        if int(uniq.max()) >= max_slots:
            raise ValueError(f"slot {int(uniq.max())} is out of range for max_slots {max_slots}")
        per = (counts + bt - 1) // bt                                                # [P] tiles per slot
        used = int(per.sum())
        meta[:used, 0] = torch.repeat_interleave(uniq, per).to(torch.int32)
        pos = torch.arange(rows.numel()) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)   # [n]
        first = torch.repeat_interleave(per.cumsum(0) - per, counts)                 # [n]
        meta[first + pos // bt, 1 + pos % bt] = rows.to(torch.int32)
    device = torch.device(device)
    if device.type == "cuda":
        meta = meta.pin_memory().to(device, non_blocking=True)
    return TileMeta(meta.to(device), bt, T)


# -- kernels ------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit(do_not_specialize=["T"])      # T changes every step: one compile serves them all
    def _shrink_kernel(x_ptr, x_stride, meta_ptr, a_ptr, r_ptr, nexp_ptr, hp_ptr, lp_ptr, T, D_IN, K_PER,
                       R_MAX: tl.constexpr, N_MAX: tl.constexpr, G_MAX: tl.constexpr, BT: tl.constexpr,
                       BK: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr, GP: tl.constexpr,
                       KSPLIT: tl.constexpr, UPCAST: tl.constexpr):
        i = tl.program_id(0)
        ks = tl.program_id(1)
        s_raw = tl.load(meta_ptr + i * (BT + 1))
        s = tl.maximum(s_raw, 0).to(tl.int64)
        live = (s_raw >= 0) & (tl.load(nexp_ptr + s) > 0)                            # slot adapts this site
        t = tl.arange(0, BT)
        rows = tl.load(meta_ptr + i * (BT + 1) + 1 + t).to(tl.int64)                 # [BT]; T marks padding
        row_ok = rows < T
        rr = tl.arange(0, RP)
        j = tl.arange(0, GP * NP)                                                     # flattened (group, expert)
        gi, ni = j // NP, j % NP
        router_ok = (gi < G_MAX) & (ni < N_MAX)
        h = tl.zeros((BT, RP), dtype=tl.float32)
        logits = tl.zeros((BT, GP * NP), dtype=tl.float32)
        k_lo = ks * K_PER
        k_hi = tl.where(live, tl.minimum(k_lo + K_PER, D_IN), k_lo)                 # zero trips when not live
        for k0 in range(k_lo, k_hi, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < D_IN
            xb = tl.load(x_ptr + rows[:, None] * x_stride + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)                                                   # [BT, BK]
            ab = tl.load(a_ptr + (s * R_MAX + rr[:, None]) * D_IN + k[None, :],
                         mask=(rr[:, None] < R_MAX) & k_ok[None, :], other=0.0)       # [RP, BK]
            rb = tl.load(r_ptr + (s * G_MAX * N_MAX + gi[:, None] * N_MAX + ni[:, None]) * D_IN + k[None, :],
                         mask=router_ok[:, None] & k_ok[None, :], other=0.0)          # [GP*NP, BK]
            if UPCAST:                                                               # fp32 / interpreter: ieee fp32
                xb, ab, rb = xb.to(tl.float32), ab.to(tl.float32), rb.to(tl.float32)
                h += tl.dot(xb, tl.trans(ab), input_precision="ieee")
                logits += tl.dot(xb, tl.trans(rb), input_precision="ieee")
            else:                                                                    # bf16 / fp16 tensor cores
                xb = xb.to(ab.dtype)
                h += tl.dot(xb, tl.trans(ab))
                logits += tl.dot(xb, tl.trans(rb))
        base = i * KSPLIT + ks
        tl.store(hp_ptr + (base * BT + t[:, None]) * RP + rr[None, :], h)
        tl.store(lp_ptr + (base * BT + t[:, None]) * (GP * NP) + j[None, :], logits)

    @triton.jit(do_not_specialize=["T"])      # T changes every step: one compile serves them all
    def _expand_kernel(hp_ptr, lp_ptr, meta_ptr, b_ptr, nexp_ptr, groups_ptr, scaling_ptr, out_ptr, out_stride,
                       T, D_OUT, R_MAX: tl.constexpr, N_MAX: tl.constexpr, BT: tl.constexpr, BKO: tl.constexpr,
                       RP: tl.constexpr, NP: tl.constexpr, GP: tl.constexpr, KSPLIT: tl.constexpr,
                       UPCAST: tl.constexpr):
        i = tl.program_id(0)
        k0 = tl.program_id(1) * BKO
        ko = k0 + tl.arange(0, BKO)                                                  # output channels
        k_ok = ko < D_OUT
        s_raw = tl.load(meta_ptr + i * (BT + 1))
        s = tl.maximum(s_raw, 0).to(tl.int64)
        n_s = tl.load(nexp_ptr + s)                                                  # real experts of the slot
        live = (s_raw >= 0) & (n_s > 0)
        t = tl.arange(0, BT)
        rows = tl.load(meta_ptr + i * (BT + 1) + 1 + t).to(tl.int64)
        rr = tl.arange(0, RP)
        j = tl.arange(0, GP * NP)
        h = tl.zeros((BT, RP), dtype=tl.float32)
        logits = tl.zeros((BT, GP * NP), dtype=tl.float32)
        for ks in tl.static_range(KSPLIT):                                           # fixed order: deterministic
            base = i * KSPLIT + ks
            h += tl.load(hp_ptr + (base * BT + t[:, None]) * RP + rr[None, :])
            logits += tl.load(lp_ptr + (base * BT + t[:, None]) * (GP * NP) + j[None, :])
        n_ok = (j % NP) < n_s
        logits = tl.where(n_ok[None, :], logits, -1.0e30)                            # padded experts: weight 0
        l3 = tl.reshape(logits, (BT, GP, NP))
        e = tl.exp(l3 - tl.max(l3, axis=2)[:, :, None])
        w = e / tl.sum(e, axis=2)[:, :, None]                                        # [BT, GP, NP] fp32
        g = tl.load(groups_ptr + s).to(tl.int32)
        width = D_OUT // g
        group_of = tl.minimum(ko // width, g - 1)                                    # [BKO] channel -> group
        g_lo = tl.minimum(k0 // width, g - 1)
        g_hi = tl.where(live, tl.minimum((k0 + BKO - 1) // width, g - 1) + 1, g_lo)  # zero trips when not live
        # B_s rows (n, r) for all experts at once: [NP*RP, BKO]; experts beyond the slot's N are masked (no reads).
        e_idx = tl.arange(0, NP * RP)
        en, er = e_idx // RP, e_idx % RP
        acc = tl.zeros((BT, BKO), dtype=tl.float32)
        gsel = tl.arange(0, GP)
        for jg in range(g_lo, g_hi):                                                 # usually exactly one group
            wj = tl.sum(tl.where((gsel == jg)[None, :, None], w, 0.0), axis=1)       # [BT, NP]
            u = tl.reshape(wj[:, :, None] * h[:, None, :], (BT, NP * RP))            # [BT, NP*RP]
            bmask = ((en < n_s) & (er < R_MAX))[:, None] & k_ok[None, :]
            bb = tl.load(b_ptr + ((s * N_MAX + en[:, None]) * R_MAX + er[:, None]) * D_OUT + ko[None, :],
                         mask=bmask, other=0.0)                                      # [NP*RP, BKO]
            if UPCAST:
                part = tl.dot(u, bb.to(tl.float32), input_precision="ieee")        # [BT, BKO]
            else:
                part = tl.dot(u.to(bb.dtype), bb)
            acc += tl.where((group_of == jg)[None, :], part, 0.0)
        delta = acc * tl.load(scaling_ptr + s).to(tl.float32)
        rows = tl.where(live, rows, T)                                               # not live: store nothing
        mask = (rows[:, None] < T) & k_ok[None, :]
        ptrs = out_ptr + rows[:, None] * out_stride + ko[None, :]
        cur = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, (cur.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=mask)


# -- host wrappers ------------------------------------------------------------------------------------------------
def molora_add_(x: torch.Tensor, tiles: TileMeta, A, B, R, nexp, groups, scaling, out: torch.Tensor,
                cfg: TileConfig | None = None, stats=None, expert_mask=None) -> None:
    """out[t] += delta[t] for every adapter token t (base rows and slots not adapting the site: untouched).

    x: [T, d_in] (row stride free, unit column stride); out: [T, d_out] (e.g. a column view of a fused output);
    A, B, R, groups, scaling: the stacked site tensors (lora_ops layout); nexp: [S] int32 real experts per slot
    (0: the slot does not adapt this site). `stats` (RoutingStats) also needs `expert_mask`. No host sync."""
    if triton is None:
        raise RuntimeError("triton is not installed; the CPU path is mtlora.grouped")
    cfg = cfg or tile_config(tiles.T, A.dtype)
    if cfg.bt != tiles.bt:
        raise ValueError(f"tile metadata built for bt={tiles.bt}, config wants bt={cfg.bt}")
    T, d_in = x.shape
    S, N_MAX, R_MAX, d_out = B.shape
    G_MAX = R.shape[1]
    if x.stride(1) != 1 or out.stride(1) != 1 or tuple(out.shape) != (T, d_out):
        raise ValueError(f"molora_add_: x {tuple(x.shape)} / out {tuple(out.shape)} must be row-major views "
                         f"of [T, d_in] / [T, {d_out}]")
    nt = tiles.n_tiles
    if nt == 0:
        return
    NP, RP = _pow2(N_MAX), _pow2(R_MAX, 16)
    GP = _pow2(G_MAX, max(1, 16 // NP))                                          # router dot needs GP*NP >= 16
    ks = max(1, min(cfg.ksplit, -(-d_in // cfg.bk)))
    k_per = -(-(-(-d_in // ks)) // cfg.bk) * cfg.bk                              # each split: whole BK chunks
    ks = -(-d_in // k_per)
    hp = torch.empty(nt * ks, tiles.bt, RP, dtype=torch.float32, device=x.device)        # [NT*KS, BT, r]
    lp = torch.empty(nt * ks, tiles.bt, GP * NP, dtype=torch.float32, device=x.device)   # [NT*KS, BT, G*N]
    # fp32: ieee fp32 dots. The interpreter's bf16 / fp16 dot is wrong (numpy has no bf16), so it upcasts too.
    upcast = A.dtype == torch.float32 or interpreter_enabled()
    _shrink_kernel[(nt, ks)](x, x.stride(0), tiles.meta, A, R, nexp, hp, lp, T, d_in, k_per,
                             R_MAX=R_MAX, N_MAX=N_MAX, G_MAX=G_MAX, BT=tiles.bt, BK=cfg.bk, RP=RP, NP=NP, GP=GP,
                             KSPLIT=ks, UPCAST=upcast, num_warps=cfg.num_warps)
    bko = min(cfg.bko, _pow2(d_out, 16))
    _expand_kernel[(nt, triton.cdiv(d_out, bko))](hp, lp, tiles.meta, B, nexp, groups, scaling, out, out.stride(0),
                                                  T, d_out, R_MAX=R_MAX, N_MAX=N_MAX, BT=tiles.bt, BKO=bko,
                                                  RP=RP, NP=NP, GP=GP, KSPLIT=ks, UPCAST=upcast,
                                                  num_warps=cfg.num_warps)
    if stats is not None:
        _record_stats(stats, tiles, lp.view(nt, ks, tiles.bt, GP, NP).sum(1)[:, :, :G_MAX, :N_MAX], nexp, groups,
                      expert_mask)


def _record_stats(stats, tiles: TileMeta, logits: torch.Tensor, nexp, groups, expert_mask) -> None:
    """Routing statistics from the summed router logits [NT, BT, G_MAX, N_MAX], with no host sync (masks, not
    boolean indexing: padding rows, dead tiles and slots not adapting the site count with weight 0)."""
    g_max, N_MAX = logits.shape[2], logits.shape[3]
    slot = tiles.tile_slot.long().clamp_min(0)                                   # [NT]
    live = (tiles.tile_slot >= 0) & (nexp[slot] > 0)                             # [NT]
    valid = (tiles.tile_rows < tiles.T) & live[:, None]                          # [NT, BT]
    lg = logits.masked_fill(~expert_mask[slot][:, None, None, :], float("-inf"))
    w = torch.softmax(lg, dim=-1).nan_to_num(0.0)                                # [NT, BT, GP, N_MAX]
    slots = slot[:, None].expand_as(valid).reshape(-1)
    stats.record(slots, w.reshape(-1, g_max, N_MAX), groups, expert_mask, valid=valid.reshape(-1))


def site_nexp(expert_mask: torch.Tensor) -> torch.Tensor:
    """[S] int32 real experts per slot (0 where the slot does not adapt the site): the kernels' liveness input."""
    return expert_mask.sum(1).to(torch.int32)


def molora_triton(x, slot_idx, A, B, R, expert_mask, groups, scaling, stats=None,
                  cfg: TileConfig | None = None) -> torch.Tensor:
    """delta [T, d_out] in x.dtype over the stacked site tensors (the lora_ops layout; tests compare it with
    tests/unit/molora_stacked.molora_reference). x on CUDA, or CPU under TRITON_INTERPRET=1.

    Convenience entry point for tests and benchmarks: it builds the tile metadata from `slot_idx` itself (one
    device-to-host copy). The engine goes through `molora_add_` with the step's `SlotPlan.tiles`."""
    T, d_out = x.shape[0], B.shape[3]
    cfg = cfg or tile_config(T, A.dtype)
    tiles = build_tiles(slot_idx.cpu(), cfg.bt, B.shape[0], x.device)
    out = torch.zeros(T, d_out, dtype=x.dtype, device=x.device)                 # base rows stay zero
    molora_add_(x.contiguous(), tiles, A.contiguous(), B.contiguous(), R.contiguous(), site_nexp(expert_mask),
                groups.contiguous(), scaling.contiguous(), out, cfg, stats=stats, expert_mask=expert_mask)
    return out
