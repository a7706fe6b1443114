"""Which Triton kernels a CUDA engine uses (the CUDA counterpart of cpu_ext.enable_kernels).

Contract:
- `enable(model, kv_dtype) -> dict` switches the model to the Triton decode attention (triton_attention.py: the
  paged KV pool read in place) and the Triton row kernels (triton_fused.py: RMSNorm after the residual add,
  silu * up, rope), each when triton imports; returns what it chose, as {"attention": bool, "row_ops": bool},
  and logs it. The adapters' Triton kernels are chosen per call by lora_ops (triton_molora.py).
- `MTLORA_CUDA_KERNELS=torch` in the environment keeps torch's attention and row ops (for comparison, or should a
  kernel misbehave on some GPU); the core does not call this in batch-invariant mode, which has its own numerics.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV = "MTLORA_CUDA_KERNELS"


def enable(model, kv_dtype) -> dict:
    """Switch `model` (a CUDA LlamaDecoder) to the Triton kernels it can use (module doc)."""
    if os.environ.get(ENV) == "torch":
        log.info("CUDA kernels: torch attention and row ops (%s=torch)", ENV)
        return {"attention": False, "row_ops": False}
    chosen = {"attention": model.enable_paged_kernel(kv_dtype), "row_ops": model.enable_fused_ops()}
    log.info("CUDA kernels: decode attention %s; norms / silu * up / rope %s",
             "Triton (paged KV read in place)" if chosen["attention"] else "torch (K/V gathered per layer)",
             "Triton (one kernel each)" if chosen["row_ops"] else "torch")
    return chosen
