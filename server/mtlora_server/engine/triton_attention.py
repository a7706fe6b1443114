"""Decode attention on CUDA read in place from the paged KV pool (Triton): no dense copy of K/V per layer.

Why: the torch decode path (`LlamaDecoder._decode_attention`) first gathers every sequence's K and V into a dense
`[KV, B, Kmax, hd]` copy (`KVCachePool.gather`), then runs two batched matmuls over it: per layer it writes and
reads the whole context of the batch once more than the math needs, and the gather itself is a slow strided
index_select. On the first H200 run (docs/gpu.md) a LLaMA-2-7B-shaped decode step at batch 64 with 512 cached
tokens took 42 ms against a 7 ms bandwidth bound, growing linearly with the batch: the gather was the step.

Contract:
- `decode_attention(q [B, H, hd], k_pool [KV, S, hd], v_pool [KV, S, hd], kv_slots [B, Kmax] long,
  mask [B, 1, 1, Kmax] bool, scale) -> [B, H*hd]` in q's dtype: softmax(scale q K^T) V over each row's unmasked
  slots, the same contract as the gather path (`LlamaDecoder._decode_attention`), which is its parity reference
  (tests/unit/test_triton_attention.py). q may be a strided view (a slice of the fused qkv output); the pools are
  one layer of `KVCachePool.k` / `.v`, contiguous in (slot, hd).
- Grid (B, KV heads, splits): one program per sequence, KV head and context split serves the H / KV query heads
  that share the KV head (GQA: head h reads KV head h // (H / KV), as `enable_gqa` and the gather path). It walks
  its slots in blocks of BN, loads K / V rows by slot (masked slots are not read), and keeps an online softmax in
  fp32 (running max, sum and output), so nothing of size Kmax is materialised. The query rows are padded to 16
  for `tl.dot`. Small batches split the context (flash-decoding): with fewer (sequence, KV head) programs than
  multiprocessors, `num_splits` cuts each row's context into splits of >= SPLIT_MIN slots so the device has about
  two programs per multiprocessor; each split writes its unnormalised output with its (max, sum) to an fp32
  workspace and `_combine_kernel` merges them. The second H200 run measured the unsplit kernel at 20 us per layer
  at batch 1 (32 programs on 132 multiprocessors).
- Precision: bf16 / fp16 dots on tensor cores with fp32 accumulation (probabilities rounded to the input dtype
  before the P V dot, as flash attention does); fp32 inputs use IEEE fp32 dots. Under the Triton interpreter
  (`TRITON_INTERPRET=1`, CPU tests) the dots always upcast to fp32: the interpreter's bf16 dot is wrong.
- Graph-capturable: no host synchronisation, shapes depend only on (B, Kmax), which decode_graphs.py fixes per
  captured bucket. A row with every slot masked (none occurs in decode: the row's own new token is always
  visible) returns zeros rather than NaN.
- `available(device)`: triton imports and the device is CUDA (or the interpreter is on, for tests).
"""

from __future__ import annotations

import functools

import torch

from .triton_molora import _pow2, interpreter_enabled

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional; the torch gather path is used instead
    triton = None
    tl = None

BLOCK_N = 64            # slots per inner step
MIN_ROWS = 16           # tl.dot needs >= 16 rows: the GQA group's query heads are padded to this
SPLIT_MIN = 128         # fewest slots per context split
MAX_SPLITS = 32


def available(device: torch.device | str) -> bool:
    """True when this module can run on `device`: triton imports and the device is CUDA (or the interpreter is on,
    which runs the kernel on CPU tensors)."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or interpreter_enabled()


if triton is not None:
    @triton.jit
    def _paged_decode_kernel(q_ptr, q_sb, q_sh, k_ptr, v_ptr, kv_sh, kv_ss, slots_ptr, slots_sb, mask_ptr, mask_sb,
                             out_ptr, out_sb, ws_ptr, ml_ptr, scale, KMAX, SPLIT_LEN, G: tl.constexpr,
                             GP: tl.constexpr, HD: tl.constexpr, HDP: tl.constexpr, BN: tl.constexpr,
                             PARTIAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)                                                     # context split (PARTIAL)
        g = tl.arange(0, GP)                                                      # query heads of this KV head
        d = tl.arange(0, HDP)
        gmask = g < G
        dmask = d < HD
        heads = kvh * G + g
        q = tl.load(q_ptr + b * q_sb + heads[:, None] * q_sh + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)              # [GP, HDP]
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, HDP], tl.float32)
        kv_base = kvh.to(tl.int64) * kv_sh
        lo = sp * SPLIT_LEN
        hi = tl.minimum(lo + SPLIT_LEN, KMAX)
        for n0 in range(lo, hi, BN):
            n = n0 + tl.arange(0, BN)
            inside = n < hi
            slot = tl.load(slots_ptr + b * slots_sb + n, mask=inside, other=0)                 # [BN] int64
            live = tl.load(mask_ptr + b * mask_sb + n, mask=inside, other=0) != 0             # [BN]
            rows = kv_base + slot.to(tl.int64) * kv_ss
            kv_mask = live[:, None] & dmask[None, :]
            k = tl.load(k_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)           # [BN, HDP]
            v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")                            # [GP, BN] fp32
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(live[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                # a block with nothing live yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if PARTIAL:       # this split's unnormalised output and its (max, sum) per head, for _combine_kernel
            nsp = tl.num_programs(2)
            H = tl.num_programs(1) * G
            row = (b * nsp + sp) * H + heads                                      # [GP] rows of [B, S, H]
            tl.store(ws_ptr + row[:, None] * HD + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])
            tl.store(ml_ptr + row * 2, m_i, mask=gmask)
            tl.store(ml_ptr + row * 2 + 1, l_i, mask=gmask)
        else:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + b * out_sb + heads[:, None] * HD + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=gmask[:, None] & dmask[None, :])

    @triton.jit
    def _combine_kernel(ws_ptr, ml_ptr, out_ptr, out_sb, NSP, H, HD: tl.constexpr, HDP: tl.constexpr,
                        SP: tl.constexpr):
        """out[b, h] = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s over the row's splits (M = max m_s)."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, SP)
        d = tl.arange(0, HDP)
        smask = s < NSP
        row = (b * NSP + s) * H + h                                               # [SP]
        m = tl.load(ml_ptr + row * 2, mask=smask, other=float("-inf"))
        ls = tl.load(ml_ptr + row * 2 + 1, mask=smask, other=0.0)
        mx = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.where(mx == float("-inf"), 0.0, mx)))   # [SP]
        acc = tl.load(ws_ptr + row[:, None] * HD + d[None, :], mask=smask[:, None] & (d[None, :] < HD), other=0.0)
        num = tl.sum(acc * w[:, None], 0)                                         # [HDP]
        den = tl.sum(ls * w, 0)
        out = num / tl.where(den > 0, den, 1.0)
        tl.store(out_ptr + b * out_sb + h * HD + d, out.to(out_ptr.dtype.element_ty), mask=d < HD)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(B: int, kv_heads: int, kmax: int, device: torch.device | str) -> int:
    """Context splits per (sequence, KV head): enough programs for about two per multiprocessor when the batch
    alone does not give them, each split at least SPLIT_MIN slots (module doc). 1 off CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 1
    sms = _sm_count(dev)
    programs = B * kv_heads
    if programs >= sms:
        return 1
    return max(1, min(MAX_SPLITS, -(-2 * sms // programs), kmax // SPLIT_MIN))


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, kv_slots: torch.Tensor,
                     mask: torch.Tensor, scale: float, splits: int | None = None) -> torch.Tensor:
    """[B, H*hd] attention of one query per sequence over its unmasked slots of the paged pool (module doc).
    `splits`: context splits per (sequence, KV head); None picks `num_splits` for the device."""
    B, H, hd = q.shape
    KV = k_pool.shape[0]
    if H % KV:
        raise ValueError(f"{H} query heads do not group over {KV} KV heads")
    if q.stride(2) != 1 or k_pool.stride(2) != 1 or v_pool.stride() != k_pool.stride():
        raise ValueError("decode_attention needs unit-stride head dims and K / V pools of one layout")
    kmax = kv_slots.shape[1]
    mask2 = mask.reshape(B, kmax)
    if mask2.stride(1) != 1 or kv_slots.stride(1) != 1:
        raise ValueError("kv_slots and mask must be contiguous along the context")
    out = torch.empty(B, H * hd, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    G = H // KV
    interp = interpreter_enabled()
    S = num_splits(B, KV, kmax, q.device) if splits is None else max(1, min(int(splits), -(-kmax // BLOCK_N)))
    split_len = -(-kmax // (S * BLOCK_N)) * BLOCK_N                      # slots per split, a multiple of BLOCK_N
    S = -(-kmax // split_len)
    ws = torch.empty(B * S * H, hd, dtype=torch.float32, device=q.device) if S > 1 else out   # [B, S, H, hd]
    ml = torch.empty(B * S * H, 2, dtype=torch.float32, device=q.device) if S > 1 else out    # (max, sum)
    _paged_decode_kernel[(B, KV, S)](
        q, q.stride(0), q.stride(1), k_pool, v_pool, k_pool.stride(0), k_pool.stride(1), kv_slots,
        kv_slots.stride(0), mask2.view(torch.uint8) if mask2.dtype == torch.bool else mask2, mask2.stride(0),
        out, out.stride(0), ws, ml, float(scale), kmax, split_len, G=G, GP=_pow2(G, MIN_ROWS), HD=hd,
        HDP=_pow2(hd, 16), BN=BLOCK_N, PARTIAL=S > 1, UPCAST=interp, IEEE=q.dtype == torch.float32 or interp,
        num_warps=4)
    if S > 1:
        _combine_kernel[(B, H)](ws, ml, out, out.stride(0), S, H, HD=hd, HDP=_pow2(hd, 16), SP=_pow2(S, 2),
                                num_warps=4)
    return out
