"""Decode attention read straight from the paged KV pool on CPU: a small C++ kernel, built once per machine.

Why: the torch decode path (`LlamaDecoder._decode_attention`) first gathers every sequence's keys and values into a
dense `[kv, B, Kmax, hd]` copy (one `index_select` each per layer), then runs two batched matmuls and a softmax over
it. At decode the data is read three times and written once, and the profile of a SmolLM2 decode step at batch 64
puts the gather at ~17 % and the attention matmuls at ~17 % of the step (docs/benchmarks.md). The kernel
(`csrc/paged_decode_attention.cpp`) reads each key and value row once, in place, through the sequence's slot
table, in fp32 (scores, softmax, weighted sum), and writes one output row per query head.

Contract:
- `kernel() -> module | None`: the compiled extension, built on first call with `torch.utils.cpp_extension.load`
  (`-O3 -march=native`; the build directory's name carries a hash of the source, the flags, torch's version and
  this CPU's flags, so machines or venvs sharing a home directory never load each other's builds). ~40 s the first time on a machine, cached
  after; needs a C++ compiler and ninja (the `ninja` wheel is a serve dependency and is found even when the venv is
  not activated). None, with one warning naming the reason, when it cannot be built (no compiler, a build error) or
  when `MTLORA_CPU_ATTENTION=torch` is set: callers then use the torch path. Never raises.
- `decode_attention(ext, q [B, H, hd], k, v [KV, S, hd] (one layer of the pool), kv_slots [B, Kmax] long,
  mask [B, Kmax] bool, scale) -> [B, H*hd]` in q's dtype: the same function as gather + `_decode_attention` (query
  head h reads KV head h // (H / KV)); float32 or bfloat16; an unmasked slot outside the pool raises; a row with no
  unmasked key gives zeros (the torch path gives NaN; decode rows always see their own token).
- Parity with the torch path: tests/unit/test_cpu_attention.py (fp32 to 1e-5, bf16 to bf16 rounding, GQA and
  MHA, head dims 64 / 128 / other, masks with holes, out-of-pool slots refused).
- OpenMP: `at::parallel_for` inside the kernel uses the calling thread's pool (torch's libgomp; the extension does
  not link its own), so the engine's step thread keeps one pool.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode_attention.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
ENV = "MTLORA_CPU_ATTENTION"          # "torch": never build or use the kernel

_lock = threading.Lock()
_state: dict[str, object] = {}       # "ext": the module or None once tried


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _ninja_on_path() -> None:
    """torch's JIT build runs `ninja` from PATH; a venv used without activation has the `ninja` wheel's binary
    off PATH, so add its directory (only when no ninja is on PATH already)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_name() -> str:
    """Extension name: a hash of the source, the flags, torch's version and this CPU's feature flags."""
    h = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + torch.__version__.encode()
                       + _cpu_flags().encode())
    return f"mtlora_paged_attention_{h.hexdigest()[:12]}"


def kernel():
    """The compiled extension, or None (module doc). Thread-safe; built at most once per process."""
    with _lock:
        if "ext" in _state:
            return _state["ext"]
        ext = None
        if os.environ.get(ENV, "").lower() == "torch":
            log.info("CPU decode attention: the torch path (%s=torch)", ENV)
        else:
            try:
                from torch.utils.cpp_extension import load
                _ninja_on_path()
                log.info("CPU decode attention: loading the paged kernel (compiled on first use on a machine, ~40 s)")
                ext = load(build_name(), [str(SOURCE)], extra_cflags=CFLAGS, verbose=False)
            except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
                log.warning("CPU decode attention: the paged kernel could not be built (%s: %s); using the torch "
                            "path", type(e).__name__, str(e).strip().splitlines()[-1][:300] if str(e).strip() else "")
        _state["ext"] = ext
        return ext


def decode_attention(ext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_slots: torch.Tensor,
                     mask: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, H*hd] attention of one query per sequence over its unmasked slots (module doc)."""
    B, K = kv_slots.shape
    return ext.paged_decode_attention(q.contiguous(), k, v, kv_slots.contiguous(), mask.reshape(B, K).contiguous(),
                                      float(scale))
