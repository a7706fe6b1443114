"""Test-only MoLoRA variants over the engine's stacked slot layout (`AdapterSlots.buffers(layer, site)`).

- `molora_reference(x, slot_idx, A, B, R, expert_mask, groups, scaling)`: a per-token loop straight from the
  formula, obviously correct and slow; the stacked-layout oracle the Triton kernel is checked against.
- `molora_torch(...)`: the same op batched (segment by slot into tiles, one bmm over all tiles), with routing
  statistics; the Triton kernel's stats are compared with it.
Both are checked against `mtlora.adapters.MoLoRA` (the oracle) in tests/unit/test_lora_ops.py. The engine itself
runs `mtlora.grouped` (CPU) or the Triton kernel (CUDA).
"""

from __future__ import annotations

import torch

from mtlora_server.engine.lora_ops import RoutingStats, segment_tiles

# Upper bound (elements) on the largest per-chunk intermediate of the torch path (gathered B: ~128 MiB in fp32).
_CHUNK_ELEMS = 1 << 25


def molora_reference(x, slot_idx, A, B, R, expert_mask, groups, scaling) -> torch.Tensor:
    """Per-token loop, straight from the formula. x: [T, d_in], slot_idx: [T] -> delta [T, d_out] in x.dtype."""
    T, d_out = x.shape[0], B.shape[3]
    out = torch.zeros(T, d_out, dtype=x.dtype, device=x.device)
    for t in range(T):
        s = int(slot_idx[t])
        if s < 0:
            continue
        z = x[t].to(A.dtype)                                                        # [d_in]
        h = A[s] @ z                                                                # [r]
        y = torch.einsum("nro,r->no", B[s], h)                                      # [N, d_out]
        g = int(groups[s])
        logits = (R[s, :g] @ z).float()                                             # [g, N]
        logits = logits.masked_fill(~expert_mask[s], float("-inf"))
        w = torch.softmax(logits, dim=-1)                                           # [g, N]
        group_of = torch.arange(d_out, device=x.device) // (d_out // g)             # [d_out]
        w_ch = w[group_of].T.to(y.dtype)                                            # [N, d_out]
        out[t] = ((w_ch * y).sum(0) * float(scaling[s])).to(x.dtype)
    return out


def molora_torch(x, slot_idx, A, B, R, expert_mask, groups, scaling, stats: RoutingStats | None = None,
                 dims: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Batched torch path (CPU). Same arguments and result as `molora_reference`.

    Segment by slot: tokens are sorted by slot and cut into tiles that each belong to one slot; every step is then
    one `bmm` over all tiles with each tile's slot weights gathered (`A[tile_slot]`, ...). There is no Python loop
    over tokens, requests or slots; the only loop is over chunks of tiles, so the gathered B ([tiles, N*r, d_out])
    never exceeds ~_CHUNK_ELEMS elements (a 2048-token prefill stays within memory). Router weights are folded
    into h per group (u = w_j * h, [N*r]) so the weighted expand is one matmul per tile.
    `dims` = (r, N, g) upper bounds over the slots that can occur (AdapterSlots passes the loaded maxima), so the
    work is sized for the adapters actually loaded rather than for the preallocated maxima.
    """
    T, d_out = x.shape[0], B.shape[3]
    if dims is not None:   # trim the zero padding nobody uses (views, no copies)
        r, N, G = dims
        A, B, R, expert_mask = A[:, :r], B[:, :N, :r], R[:, :G, :N], expert_mask[:, :N]
    out = torch.zeros(T + 1, d_out, dtype=x.dtype, device=x.device)               # row T absorbs tile padding
    tile_slot, tile_rows, tile = segment_tiles(slot_idx, pad_row=T)
    if tile_slot.numel() == 0:
        return out[:T]
    x_pad = torch.cat([x, x.new_zeros(1, x.shape[1])]).to(A.dtype)                # [T+1, d_in]
    g_eff = int(groups[tile_slot].max())                                            # groups actually present
    N, r = B.shape[1], B.shape[2]
    per_tile = max(N * r * d_out, tile * g_eff * d_out, tile * N * x.shape[1])
    step = max(1, _CHUNK_ELEMS // per_tile)
    for c in range(0, tile_slot.numel(), step):
        ts, tr = tile_slot[c:c + step], tile_rows[c:c + step]                       # [nt], [nt, tile]
        delta, w = _tiles_delta(x_pad[tr], ts, A, B, R, expert_mask, groups, scaling, g_eff)
        out[tr.reshape(-1)] = delta.reshape(-1, d_out).to(x.dtype)                 # padding rows all land on T
        if stats is not None:
            real = tr.reshape(-1) < T                                               # drop padding rows
            slots = ts[:, None].expand_as(tr).reshape(-1)[real]
            stats.record(slots, w.reshape(-1, *w.shape[2:])[real], groups, expert_mask)
    return out[:T]


def _tiles_delta(xt, ts, A, B, R, expert_mask, groups, scaling, g_eff):
    """xt: [nt, tile, d_in] tokens of tiles whose slots are ts [nt]. Returns delta [nt, tile, d_out] and the
    routing weights [nt, tile, G, N] (fp32)."""
    nt, tile, d_in = xt.shape
    N, r, d_out = B.shape[1], B.shape[2], B.shape[3]
    G = R.shape[1]
    h = torch.bmm(xt, A[ts].transpose(1, 2))                                        # [nt, tile, r]
    if N == 1:   # no loaded adapter has a router here: every weight is 1
        w = torch.ones(nt, tile, G, 1, device=xt.device)
    else:
        logits = torch.bmm(xt, R[ts].reshape(nt, G * N, d_in).transpose(1, 2))     # [nt, tile, G*N]
        logits = logits.view(nt, tile, G, N).float()
        logits = logits.masked_fill(~expert_mask[ts][:, None, None, :], float("-inf"))
        w = torch.softmax(logits, dim=-1)                                           # [nt, tile, G, N] fp32
    # u[t, j, n, :] = w[t, j, n] * h[t]: folding the router into h makes the expand a single matmul per tile.
    u = w[:, :, :g_eff, :, None].to(h.dtype) * h[:, :, None, None, :]              # [nt, tile, g_eff, N, r]
    Bt = B[ts].reshape(nt, N * r, d_out)                                            # [nt, N*r, d_out] (gather)
    full = torch.bmm(u.reshape(nt, tile * g_eff, N * r), Bt)                        # [nt, tile*g_eff, d_out]
    if g_eff == 1:
        delta = full
    else:   # each output channel k keeps the row of its own routing group k // (d_out // g_slot)
        full = full.view(nt, tile, g_eff, d_out)
        group_of = torch.arange(d_out, device=xt.device)[None, :] // (d_out // groups[ts])[:, None]  # [nt, d_out]
        delta = full.gather(2, group_of[:, None, None, :].expand(nt, tile, 1, d_out)).squeeze(2)
    return delta * scaling[ts].to(delta.dtype)[:, None, None], w                   # [nt, tile, d_out]
