"""Decode attention read straight from the paged KV pool on CPU: a small C++ kernel, built once per machine.

Why: the torch decode path (`LlamaDecoder._decode_attention`) first gathers every sequence's keys and values into a
dense `[kv, B, Kmax, hd]` copy (one `index_select` each per layer), then runs two batched matmuls and a softmax over
it. At decode the data is read three times and written once, and the profile of a SmolLM2 decode step at batch 64
puts the gather at ~17 % and the attention matmuls at ~17 % of the step (docs/benchmarks.md). The kernel
(`csrc/paged_decode_attention.cpp`) reads each key and value row once, in place, through the sequence's slot
table, in fp32 (scores, softmax, weighted sum), and writes one output row per query head. Keys and values go
eight at a time (eight independent dot products per query head, one pass over the accumulators per eight value
rows) and the softmax uses a vectorised exp (`csrc/exp_poly.h`): 30 layers of 64 sequences x 192 keys take ~20 ms
on 2 avx512 cores, against ~37 ms for one key at a time with std::exp.

Contract:
- `kernel() -> module | None`: the compiled extension (`cpu_ext.CpuExtension`: built on first use, ~40 s once per
  machine, cached under a name hashing source, flags, torch version and CPU flags), or None when it cannot be
  built or when `MTLORA_CPU_ATTENTION=torch` is set: callers then use the torch path. Never raises.
- `decode_attention(ext, q [B, H, hd], k, v [KV, S, hd] (one layer of the pool), kv_slots [B, Kmax] long,
  mask [B, Kmax] bool, scale) -> [B, H*hd]` in q's dtype: the same function as gather + `_decode_attention` (query
  head h reads KV head h // (H / KV)); float32 or bfloat16; an unmasked slot outside the pool raises; a row with no
  unmasked key gives zeros (the torch path gives NaN; decode rows always see their own token).
- Parity with the torch path: tests/unit/test_cpu_attention.py (fp32 to 1e-5, bf16 to bf16 rounding, GQA and
  MHA, head dims 64 / 128 / other, masks with holes, out-of-pool slots refused).
"""

from __future__ import annotations

import torch

from .cpu_ext import CSRC, CpuExtension

ENV = "MTLORA_CPU_ATTENTION"          # "torch": never build or use the kernel
EXTENSION = CpuExtension(CSRC / "paged_decode_attention.cpp", "mtlora_paged_attention", ENV, "CPU decode attention")


def kernel():
    """The compiled extension, or None (module doc)."""
    return EXTENSION.load()


def decode_attention(ext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_slots: torch.Tensor,
                     mask: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, H*hd] attention of one query per sequence over its unmasked slots (module doc)."""
    B, K = kv_slots.shape
    return ext.paged_decode_attention(q.contiguous(), k, v, kv_slots.contiguous(), mask.reshape(B, K).contiguous(),
                                      float(scale))
