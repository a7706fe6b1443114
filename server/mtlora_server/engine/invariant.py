"""Batch-invariant numerics (`--batch-invariant`): a token's results depend on its own sequence only, never on what
else shares the step, how its prompt was chunked, or whether its prefix came from the prefix cache.

Why results move with the batch in the default mode (measured on CPU):
- The BLAS picks its kernel by the number of rows: fp32 takes a GEMV path for one row and another path for two or
  three rows, so the same row's dot products round differently when the step has 1, 3 or 40 tokens.
- Prefill attention (SDPA) splits the keys by the chunk's query length, and the decode path reduces over its
  group's padded key length, so a query's softmax sum and weighted value sum are added in an order set by the
  other sequences and by the chunking. In bf16 such differences grow over a few tokens into different choices.

What this mode does instead:
- `probe_row_tile` measures, at start-up and for the model's own shapes, the smallest row tile (1, 2, 4, ...)
  such that this machine's matmuls give each row the same bits whatever the number of rows (a multiple of the
  tile) and wherever the row stands (fp32 BLAS here: one row takes a GEMV path, 2-3 rows another, and the 1-3 rows
  past a multiple of 8 another again); `pad_rows` then pads every token-row matmul (projections, lm_head, adapter
  shrink/expand, attention) to a multiple of the tile. A machine where no tile works is refused with a
  ConfigError naming the op: the mode never runs silently non-invariant.
- `invariant_attention` is one computation for every query (decode, prefill, any chunk or group): the scores of
  all keys (one hd-long dot product each), the exact row maximum, then the exp-weights summed and applied to the
  values in blocks of KEY_BLOCK keys, added block after block in key order. Blocks wholly after a query's position
  add exact zeros, so its output depends on its position and its keys only.
- The rest is row-wise already: RMSNorm, RoPE, SiLU, softmax / log_softmax of one row, argmax, and seeded
  sampling (each request draws from its own generator).
Not invariant: unseeded sampling at temperature > 0 (those rows share torch's default generator).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from mtlora.errors import ConfigError

log = logging.getLogger(__name__)

KEY_BLOCK = 64                              # keys per block of the attention's fixed-order reductions
TILE_CANDIDATES = (1, 2, 4, 8, 16, 32)
# Row counts each probe compares: every count up to 40 (where BLAS kernels switch), then larger steps.
PROBE_ROWS = (*range(1, 41), 48, 63, 64, 100, 128, 255, 256, 512, 1024)
PROBE_OFFSETS = (0, 1, 3, 7, 13, 29, 40)    # where the probed rows start in the reference input
PROBE_DENSE_ROWS = 256                      # rows probed one by one (in groups of M) for M <= 8
PROBE_MAX_ELEMS = 1 << 31                   # skip probe row counts whose GEMM would exceed this (M * N * K)


def pad_rows(x: torch.Tensor, tile: int) -> torch.Tensor:
    """x [M, ...] with zero rows appended up to a multiple of `tile` (x itself when it is one; tile 0: x)."""
    extra = -x.shape[0] % tile if tile > 1 else 0
    if not extra:
        return x
    return torch.cat([x, x.new_zeros(extra, *x.shape[1:])])


def linear(x: torch.Tensor, weight: torch.Tensor, tile: int) -> torch.Tensor:
    """F.linear over rows padded to a multiple of `tile`. x: [M, K], weight: [N, K] -> [M, N]."""
    return torch.nn.functional.linear(pad_rows(x, tile), weight)[:x.shape[0]]


# -- attention ---------------------------------------------------------------------------------------------------
def invariant_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                        scale: float, tile: int) -> torch.Tensor:
    """Attention whose per-query result does not depend on the other queries, sequences or key padding.

    q: [G, Q, H, hd]; keys/values: [KV, G, K, hd] (the pool's gather layout); mask: [G, 1, Q, K] bool (True: may
    attend; every query row needs one True). Returns [G, Q, H, hd] in q's dtype. Heads sharing a KV head are rows
    of one matmul ([Q * H/KV, hd] per (sequence, KV head)); the softmax runs in fp32.
    """
    G, Q, H, hd = q.shape
    KV, _, K, _ = keys.shape
    gh = H // KV
    q_unit = tile // math.gcd(tile, gh) if tile > 1 else 1     # queries per whole row tile
    q_pad = -Q % q_unit
    if q_pad:                                                   # rows in whole tiles of this machine's matmuls
        q = torch.cat([q, q.new_zeros(G, q_pad, H, hd)], dim=1)
        mask = torch.cat([mask, mask[:, :, :1].expand(G, 1, q_pad, K)], dim=2)
    Qp = Q + q_pad
    k_pad = -K % KEY_BLOCK
    if k_pad:                                                   # whole key blocks; padded keys are masked out
        keys = torch.cat([keys, keys.new_zeros(KV, G, k_pad, hd)], dim=2)
        values = torch.cat([values, values.new_zeros(KV, G, k_pad, hd)], dim=2)
        mask = torch.cat([mask, mask.new_zeros(G, 1, Qp, k_pad)], dim=3)
    nb = (K + k_pad) // KEY_BLOCK
    R = Qp * gh
    rows = q.view(G, Qp, KV, gh, hd).permute(0, 2, 1, 3, 4).reshape(G, KV, 1, R, hd)      # [G, KV, 1, R, hd]
    kb = keys.permute(1, 0, 2, 3).reshape(G, KV, nb, KEY_BLOCK, hd)
    vb = values.permute(1, 0, 2, 3).reshape(G, KV, nb, KEY_BLOCK, hd)
    scores = torch.matmul(rows, kb.transpose(-1, -2)).float() * scale                     # [G, KV, nb, R, KB]
    allowed = (mask.view(G, 1, Qp, 1, nb, KEY_BLOCK).expand(G, 1, Qp, gh, nb, KEY_BLOCK)
               .reshape(G, 1, R, nb, KEY_BLOCK).transpose(2, 3))                            # [G, 1, nb, R, KB]
    scores = scores.masked_fill(~allowed, float("-inf"))
    top = scores.amax(dim=(2, 4), keepdim=True)                                             # exact, any order
    weights = torch.exp(scores - top)                                                       # [G, KV, nb, R, KB]
    sums = weights.sum(-1)                                                                  # [G, KV, nb, R]
    parts = torch.matmul(weights.to(values.dtype), vb).float()                              # [G, KV, nb, R, hd]
    total, acc = sums[:, :, 0], parts[:, :, 0]
    for j in range(1, nb):                                                                  # fixed key order
        total = total + sums[:, :, j]
        acc = acc + parts[:, :, j]
    out = (acc / total[..., None]).to(q.dtype)                                              # [G, KV, R, hd]
    out = out.view(G, KV, Qp, gh, hd).permute(0, 2, 1, 3, 4).reshape(G, Qp, H, hd)
    return out[:, :Q]


# -- the start-up probe ------------------------------------------------------------------------------------------
def _row_invariant(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, counts: list[int]) -> bool:
    """Whether op ([M, K] -> [M, N]) gives every row the same bits for every probed M (multiples of `tile`) and
    wherever the row stands: op(x[o:o + M]) must equal rows o..o+M of one large reference, for several offsets o
    (rows of bf16 outputs often round alike even when the kernels differ, so many rows are compared)."""
    ref = op(x[:-(-(max(counts) + PROBE_DENSE_ROWS) // tile) * tile])
    for m in counts:
        # small row counts are where kernels switch (and differ in few elements): every row of the first
        # PROBE_DENSE_ROWS is probed there; larger counts at a few offsets
        offsets = range(0, PROBE_DENSE_ROWS, m) if m <= 8 else PROBE_OFFSETS if m <= 64 else PROBE_OFFSETS[:2]
        for o in offsets:
            if not torch.equal(op(x[o:o + m]), ref[o:o + m]):
                return False
    return True


def _probe_counts(tile: int, max_rows: int, cost_per_row: int) -> list[int]:
    counts = {tile * k for k in (1, 2, 3, 5, 8, 16, 33, 64)} | {-(-m // tile) * tile for m in PROBE_ROWS}
    return sorted(m for m in counts if m <= max_rows and m * cost_per_row <= PROBE_MAX_ELEMS) or [tile]


def probe_row_tile(weights: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype, device: torch.device,
                   max_rows: int) -> int:
    """The smallest row tile for which this machine's matmuls are row-invariant, for these weights ([N, K] each,
    by name) and for the attention matmuls; raises ConfigError naming the op where no candidate works."""
    gen = torch.Generator().manual_seed(0)
    widest = max([w.shape[1] for w in weights.values()] + [KEY_BLOCK, head_dim])
    x = torch.randn(max(PROBE_ROWS) + 2 * TILE_CANDIDATES[-1] + PROBE_DENSE_ROWS, widest, generator=gen).to(device, dtype)
    kv = torch.randn(2 * KEY_BLOCK, head_dim, generator=gen).to(device, dtype)
    ops: dict[str, tuple[Callable, int, int]] = {
        name: ((lambda a, w=w: torch.nn.functional.linear(a, w)), w.shape[1], w.shape[0])
        for name, w in weights.items()}
    for name, w in weights.items():            # wide weights (lm_head): more row counts over a slice of them
        if w.shape[0] > 8192:
            ops[f"{name} (first 4096 rows)"] = ((lambda a, w=w[:4096]: torch.nn.functional.linear(a, w)),
                                                w.shape[1], 4096)
    # attention: one key block per matmul, batched over (sequence, KV head, block); the batch size must not matter
    kt, vals = kv[:KEY_BLOCK].t().contiguous(), kv[KEY_BLOCK:].contiguous()
    ops["attention scores"] = (lambda a: torch.matmul(a[None, None], kt[None, None])[0, 0], head_dim, KEY_BLOCK)
    ops["attention scores, batched"] = (
        lambda a: torch.matmul(torch.stack([a, a.flip(0), 0.5 * a])[None], kt[None, None])[0, 0], head_dim, KEY_BLOCK)
    ops["attention values"] = (lambda a: torch.matmul(a[None, None], vals[None, None])[0, 0], KEY_BLOCK, head_dim)
    ops["attention values, batched"] = (
        lambda a: torch.matmul(torch.stack([a, a.flip(0), 0.5 * a])[None], vals[None, None])[0, 0], KEY_BLOCK,
        head_dim)
    tile = 1
    with torch.inference_mode():
        for name, (op, k, n) in ops.items():
            xk = x[:, :k].contiguous()
            while not _row_invariant(op, xk, tile, _probe_counts(tile, max_rows, n * k)):
                if tile == TILE_CANDIDATES[-1]:
                    raise ConfigError(f"--batch-invariant: this machine's {dtype} matmul for {name} ({n}x{k}) gives "
                                      "a row different bits depending on the other rows for every row tile up to "
                                      f"{tile}; batch-invariant mode is not available here", field="batch_invariant")
                tile = TILE_CANDIDATES[TILE_CANDIDATES.index(tile) + 1]
    log.info("batch-invariant mode: token-row matmuls padded to multiples of %d rows (%s)", tile, dtype)
    return tile
