"""Triton kernels for the batched heterogeneous MoLoRA op (same contract as `lora_ops.molora_reference`).

Tokens are grouped into tiles of BT rows that share one slot (`lora_ops.segment_tiles`), then two launches run:

1. `_shrink_route_kernel`, grid (tiles,): for its tile, one pass over d_in computes h = A_s x [BT, r] and the
   router logits R_s x [BT, G*N] (sharing every load of x), masks padded experts to -inf, takes the softmax per
   group in fp32 and writes u[t, j, n, :] = w[t, j, n] * h[t] ([BT, G, N, r], fp32) plus w for the statistics.
2. `_expand_kernel`, grid (tiles, d_out / BKO): out[t, k] = s * sum_{n,r} u[t, group(k), n, r] * B_s[n, r, k] as one
   `tl.dot` of [BT*G, N*r] x [N*r, BKO], then each channel keeps the row of its own group k // (d_out // g_s).

Why two launches and not one: a single program per tile would have to walk all of d_out serially (a decode step
has only a handful of tiles, so most SMs would idle), while one program per (tile, output block) would redo the
whole shrink over d_in for every output block. The intermediate u is tiny (T x G*N*r floats), so the second launch
costs one small round trip through memory and lets the expand spread over (tiles x output blocks).

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
    def _shrink_route_kernel(x_ptr, rows_ptr, tslot_ptr, a_ptr, r_ptr, mask_ptr, u_ptr, w_ptr, T, D_IN,
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
        u = w[:, :, :, None] * h[:, None, None, :]                              # [BT, GP, NP, RP]
        u2 = tl.reshape(u, (BT * GP, NP * RP))
        m = tl.arange(0, BT * GP)
        c = tl.arange(0, NP * RP)
        tl.store(u_ptr + (i * BT * GP + m[:, None]) * (NP * RP) + c[None, :], u2)

    @triton.jit
    def _expand_kernel(u_ptr, rows_ptr, tslot_ptr, b_ptr, groups_ptr, scaling_ptr, out_ptr, T, D_OUT,
                       R_MAX: tl.constexpr, N_MAX: tl.constexpr, BT: tl.constexpr, BKO: tl.constexpr,
                       RP: tl.constexpr, NP: tl.constexpr, GP: tl.constexpr):
        i = tl.program_id(0)
        ko = tl.program_id(1) * BKO + tl.arange(0, BKO)                         # output channels
        s = tl.load(tslot_ptr + i).to(tl.int64)
        g = tl.load(groups_ptr + s).to(tl.int32)
        scale = tl.load(scaling_ptr + s).to(tl.float32)
        m = tl.arange(0, BT * GP)
        c = tl.arange(0, NP * RP)
        u = tl.load(u_ptr + (i * BT * GP + m[:, None]) * (NP * RP) + c[None, :])   # [BT*GP, NP*RP]
        n, r = c // RP, c % RP
        k_ok = ko < D_OUT
        # B_s[n, r, k] (stacked layout [S, N_MAX, R_MAX, D_OUT]) at ((s*N_MAX + n)*R_MAX + r)*D_OUT + k
        bb = tl.load(b_ptr + ((s * N_MAX + n[:, None]) * R_MAX + r[:, None]) * D_OUT + ko[None, :],
                     mask=(n[:, None] < N_MAX) & (r[:, None] < R_MAX) & k_ok[None, :], other=0.0)
        full = tl.dot(u, bb.to(tl.float32), input_precision="ieee")            # [BT*GP, BKO]
        full3 = tl.reshape(full, (BT, GP, BKO))
        group_of = ko // (D_OUT // g)                                           # [BKO]
        gsel = tl.arange(0, GP)[None, :, None] == group_of[None, None, :]       # [1, GP, BKO]
        delta = tl.sum(tl.where(gsel, full3, 0.0), axis=1) * scale             # [BT, BKO]
        t = tl.arange(0, BT)
        rows = tl.load(rows_ptr + i * BT + t)
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
    tile_slot, tile_rows, BT = segment_tiles(slot_idx, pad_row=T, min_tile=16)  # BT >= 16 for tl.dot
    nt = tile_slot.numel()
    if nt == 0:
        return out
    NP = _pow2(N_MAX)
    RP = _pow2(R_MAX, 16)
    GP = _pow2(G_MAX, max(1, 16 // NP))                                         # router dot needs GP*NP >= 16
    u = torch.empty(nt, BT, GP, NP, RP, dtype=torch.float32, device=x.device)  # [tiles, BT, G, N, r]
    w = torch.empty(nt, BT, GP, NP, dtype=torch.float32, device=x.device)      # [tiles, BT, G, N]
    x = x.contiguous()
    mask_i8 = expert_mask.to(torch.int8).contiguous()
    rows = tile_rows.contiguous()
    _shrink_route_kernel[(nt,)](x, rows, tile_slot, A.contiguous(), R.contiguous(), mask_i8, u, w, T, d_in,
                                R_MAX=R_MAX, N_MAX=N_MAX, G_MAX=G_MAX, BT=BT, BK=32, RP=RP, NP=NP, GP=GP)
    BKO = 64 if d_out >= 64 else _pow2(d_out, 16)
    _expand_kernel[(nt, triton.cdiv(d_out, BKO))](u, rows, tile_slot, B.contiguous(), groups.contiguous(),
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
