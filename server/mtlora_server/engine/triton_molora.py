"""Triton kernels for the batched heterogeneous MoLoRA op (same contract as `lora_ops.molora_reference`).

Tokens are grouped into tiles of BT rows that share one slot (`lora_ops.segment_tiles`), then two launches run:

1. `_shrink_route_kernel`, grid (tiles,): for its tile, one pass over d_in computes h = A_s x [BT, r] and the
   router logits R_s x [BT, G*N] (sharing every load of x), masks padded experts to -inf, takes the softmax per
   group in fp32 and writes h ([BT, r]) and w ([BT, G, N], also read by the statistics), both fp32.
2. `_expand_kernel`, grid (tiles, d_out / BKO): out[t, k] = s * sum_n sum_r w[t, group(k), n] h[t, r] B_s[n, r, k]
   as a K loop over the slot's N experts, each step one `tl.dot` of u_n = w[:, :, n] * h ([BT*G, r]) with the
   expert's [r, BKO] block of B; then each channel keeps the row of its own group k // (d_out // g_s).

Why two launches and not one: a single program per tile would have to walk all of d_out serially (a decode step
has only a handful of tiles, so most SMs would idle), while one program per (tile, output block) would redo the
whole shrink over d_in for every output block. The intermediates h and w are tiny (T x (r + G*N) floats), so the
second launch costs one small round trip through memory and lets the expand spread over (tiles x output blocks).
Kernel constexprs depend only on the preallocated maxima, so loading adapters never triggers a recompile.

All arithmetic is fp32 (`input_precision="ieee"`), the result is cast to x.dtype. On CPU the kernels run under
`TRITON_INTERPRET=1` (tests only).
"""

from __future__ import annotations

import os

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


def _pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, 1 << max(0, (int(n) - 1).bit_length()))


if triton is not None:

    @triton.jit
    def _shrink_route_kernel(x_ptr, rows_ptr, tslot_ptr, a_ptr, r_ptr, mask_ptr, h_ptr, w_ptr, T, D_IN,
                             R_MAX: tl.constexpr, N_MAX: tl.constexpr, G_MAX: tl.constexpr,
                             BT: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr,
                             GP: tl.constexpr):
        i = tl.program_id(0)
        s = tl.load(tslot_ptr + i).to(tl.int64)
        t = tl.arange(0, BT)
        rows = tl.load(rows_ptr + i * BT + t)                                   # [BT]; T marks padding
        row_ok = rows < T
        rr = tl.arange(0, RP)                                                   # rank index
        j = tl.arange(0, GP * NP)                                               # flattened (group, expert)
        gi, ni = j // NP, j % NP
        router_row = gi * N_MAX + ni                                            # R_s is [G_MAX, N_MAX, d_in]
        router_ok = (gi < G_MAX) & (ni < N_MAX)
        h = tl.zeros((BT, RP), dtype=tl.float32)
        logits = tl.zeros((BT, GP * NP), dtype=tl.float32)
        for k0 in range(0, D_IN, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < D_IN
            xb = tl.load(x_ptr + rows[:, None] * D_IN + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)                              # [BT, BK]
            ab = tl.load(a_ptr + (s * R_MAX + rr[:, None]) * D_IN + k[None, :],
                         mask=(rr[:, None] < R_MAX) & k_ok[None, :], other=0.0).to(tl.float32)   # [RP, BK]
            rb = tl.load(r_ptr + (s * G_MAX * N_MAX + router_row[:, None]) * D_IN + k[None, :],
                         mask=router_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)     # [GP*NP, BK]
            h += tl.dot(xb, tl.trans(ab), input_precision="ieee")
            logits += tl.dot(xb, tl.trans(rb), input_precision="ieee")
        n_ok = tl.load(mask_ptr + s * N_MAX + ni, mask=ni < N_MAX, other=0) != 0   # [GP*NP] real experts
        logits = tl.where(n_ok[None, :], logits, float("-inf"))
        l3 = tl.reshape(logits, (BT, GP, NP))
        e = tl.exp(l3 - tl.max(l3, axis=2)[:, :, None])
        w = e / tl.sum(e, axis=2)[:, :, None]                                   # [BT, GP, NP] fp32
        w2 = tl.reshape(w, (BT, GP * NP))
        tl.store(w_ptr + (i * BT + t[:, None]) * (GP * NP) + j[None, :], w2)
        tl.store(h_ptr + (i * BT + t[:, None]) * RP + rr[None, :], h)

    @triton.jit
    def _expand_kernel(h_ptr, w_ptr, rows_ptr, tslot_ptr, b_ptr, nexp_ptr, groups_ptr, scaling_ptr, out_ptr, T,
                       D_OUT, R_MAX: tl.constexpr, N_MAX: tl.constexpr, BT: tl.constexpr, BKO: tl.constexpr,
                       RP: tl.constexpr, NP: tl.constexpr, GP: tl.constexpr):
        i = tl.program_id(0)
        ko = tl.program_id(1) * BKO + tl.arange(0, BKO)                         # output channels
        k_ok = ko < D_OUT
        s = tl.load(tslot_ptr + i).to(tl.int64)
        n_s = tl.load(nexp_ptr + s)                                             # experts of this slot
        t = tl.arange(0, BT)
        j = tl.arange(0, GP)
        rr = tl.arange(0, RP)
        h = tl.load(h_ptr + (i * BT + t[:, None]) * RP + rr[None, :])           # [BT, RP]
        acc = tl.zeros((BT * GP, BKO), dtype=tl.float32)
        # K loop over the slot's experts: acc[(t, j), k] += sum_r w[t, j, n] h[t, r] B_s[n, r, k]
        for n in range(0, n_s):
            wn = tl.load(w_ptr + ((i * BT + t[:, None]) * GP + j[None, :]) * NP + n)   # [BT, GP]
            un = tl.reshape(wn[:, :, None] * h[:, None, :], (BT * GP, RP))     # [BT*GP, RP]
            # B_s[n, r, k] (stacked layout [S, N_MAX, R_MAX, D_OUT]) at ((s*N_MAX + n)*R_MAX + r)*D_OUT + k
            bn = tl.load(b_ptr + ((s * N_MAX + n) * R_MAX + rr[:, None]) * D_OUT + ko[None, :],
                         mask=(rr[:, None] < R_MAX) & k_ok[None, :], other=0.0)    # [RP, BKO]
            acc += tl.dot(un, bn.to(tl.float32), input_precision="ieee")
        g = tl.load(groups_ptr + s).to(tl.int32)
        full3 = tl.reshape(acc, (BT, GP, BKO))
        group_of = ko // (D_OUT // g)                                           # [BKO]
        gsel = j[None, :, None] == group_of[None, None, :]                      # [1, GP, BKO]
        delta = tl.sum(tl.where(gsel, full3, 0.0), axis=1) * tl.load(scaling_ptr + s).to(tl.float32)
        rows = tl.load(rows_ptr + i * BT + t)                                   # [BT]
        out_mask = (rows[:, None] < T) & k_ok[None, :]
        tl.store(out_ptr + rows[:, None] * D_OUT + ko[None, :], delta.to(out_ptr.dtype.element_ty), mask=out_mask)


def molora_triton(x, slot_idx, A, B, R, expert_mask, groups, scaling, stats=None) -> torch.Tensor:
    """Same arguments and result as `lora_ops.molora_reference`; x on CUDA (or CPU under TRITON_INTERPRET=1)."""
    from .lora_ops import segment_tiles

    if triton is None:
        raise RuntimeError("triton is not installed; use lora_ops.molora_torch")
    T, d_in = x.shape
    S, N_MAX, R_MAX, d_out = B.shape
    G_MAX = R.shape[1]
    out = torch.zeros(T, d_out, dtype=x.dtype, device=x.device)                 # base rows stay zero
    # BT >= 16 for tl.dot; <= 32 keeps the expand accumulator [BT*G, BKO] within registers at G = 4.
    tile_slot, tile_rows, BT = segment_tiles(slot_idx, pad_row=T, min_tile=16, max_tile=32)
    nt = tile_slot.numel()
    if nt == 0:
        return out
    NP = _pow2(N_MAX)
    RP = _pow2(R_MAX, 16)
    GP = _pow2(G_MAX, max(1, 16 // NP))                                         # router dot needs GP*NP >= 16
    h = torch.empty(nt, BT, RP, dtype=torch.float32, device=x.device)          # [tiles, BT, r]
    w = torch.empty(nt, BT, GP, NP, dtype=torch.float32, device=x.device)      # [tiles, BT, G, N]
    x = x.contiguous()
    mask_i8 = expert_mask.to(torch.int8).contiguous()
    rows = tile_rows.contiguous()
    _shrink_route_kernel[(nt,)](x, rows, tile_slot, A.contiguous(), R.contiguous(), mask_i8, h, w, T, d_in,
                                R_MAX=R_MAX, N_MAX=N_MAX, G_MAX=G_MAX, BT=BT, BK=32, RP=RP, NP=NP, GP=GP)
    BKO = 64 if d_out >= 64 else _pow2(d_out, 16)
    nexp = expert_mask.sum(1).to(torch.int32)                                   # [S] experts per slot
    _expand_kernel[(nt, triton.cdiv(d_out, BKO))](h, w, rows, tile_slot, B.contiguous(), nexp, groups.contiguous(),
                                                   scaling.contiguous(), out, T, d_out, R_MAX=R_MAX, N_MAX=N_MAX,
                                                   BT=BT, BKO=BKO, RP=RP, NP=NP, GP=GP)
    if stats is not None:
        real = rows.reshape(-1) < T                                              # drop padding rows
        slots = tile_slot[:, None].expand_as(rows).reshape(-1)[real]
        stats.record(slots, w[:, :, :G_MAX, :N_MAX].reshape(-1, G_MAX, N_MAX)[real], groups, expert_mask)
    return out


def interpreter_enabled() -> bool:
    """True when the Triton interpreter is switched on for this process (CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
