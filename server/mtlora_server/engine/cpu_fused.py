"""A decoder layer's row-wise elementwise work on CPU in one pass each: RMSNorm (after the residual add),
SiLU(gate) * up, rotary embedding in place.

Why: in torch each of these is 4-8 ops over the whole activation (bf16 widened to fp32 and back per op); at prefill
they were ~25 % of a SmolLM2 step on CPU (docs/benchmarks.md), at decode a few ms of ~90. The kernel
(`csrc/fused_rows.cpp`) reads and writes each row once per function.

Contract:
- `kernel() -> module | None`: the compiled extension (`cpu_ext.CpuExtension`, built on first use, ~40 s once
  per machine), or None when it cannot be built or `MTLORA_CPU_FUSED_OPS=torch` is set. Never raises.
- The extension's functions, float32 or bfloat16 (one dtype per call), each the same function as the torch
  expression in engine/model.py it replaces, rounding included (the products and sums are rounded to the dtype
  where torch rounds them): `rms_norm(x, w, eps)` == `model.rms_norm`; `add_rms_norm(h, delta, w, eps)` does
  `h += delta` in place then returns `rms_norm(h)`; `silu_mul(gu [T, 2F])` == `F.silu(gate) * up`; `rope_(x [T,
  heads, hd], cos, sin)` == `model.apply_rope` written into x. Parity: tests/unit/test_cpu_fused.py (fp32 to 1e-6,
  bf16 to one rounding step; whole decoder steps).
- `LlamaDecoder.enable_fused_ops` (model.py) switches the model to them: the engine does on CPU in eager mode
  unless `cpu_fused_ops=torch` or batch-invariant mode.
"""

from __future__ import annotations

from .cpu_ext import CSRC, CpuExtension

ENV = "MTLORA_CPU_FUSED_OPS"          # "torch": never build or use the kernel
EXTENSION = CpuExtension(CSRC / "fused_rows.cpp", "mtlora_fused_rows", ENV, "CPU fused row ops")


def kernel():
    """The compiled extension, or None (module doc)."""
    return EXTENSION.load()
