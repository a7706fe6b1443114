"""Host memory settings every mtlora-serve / mtlora-bench process gets when it imports the package (before torch).

Contract:
- `configure()` (the package's `__init__` calls it): `THP_MEM_ALLOC_ENABLE=1` unless set (the package docstring
  says why), then `keep_freed_memory()`.
- `keep_freed_memory(environ=os.environ) -> bool`: on glibc, `mallopt` so that malloc keeps memory it got for
  blocks under 32 MiB instead of handing it back to the kernel: a fixed `M_MMAP_THRESHOLD` of 32 MiB (glibc's
  largest; blocks below it come from malloc's heaps, not from a fresh `mmap` each time) and an `M_TRIM_THRESHOLD`
  of 2 GiB (heaps are not trimmed). Returns whether it applied them: not when the process tunes malloc itself
  (`GLIBC_TUNABLES` naming `glibc.malloc`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `LD_PRELOAD` of
  another allocator such as tcmalloc or jemalloc), when `MTLORA_MALLOC=default`, or off glibc. Never raises.
Why: every engine step allocates a few large temporaries (the logits of a batch-64 decode step are 12.6 MB in fp32,
6.3 MB in bf16) and frees them again. glibc's adaptive thresholds handed some of that memory back to the kernel
between steps, so the next step touched fresh pages: a batch-64 decode step with 4 LoRA adapters took 520 page
faults (~3 ms of a ~95 ms step, visible as a slow `aten::copy_`), the bare model's 0.5. With these settings: 2.
vLLM's CPU backend gets the same effect by preloading tcmalloc; this needs nothing installed. The cost: the process
keeps its peak heap (what it freed is reused, not returned), which a server that preallocates its KV pool and
adapter slots does anyway.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3        # glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20                         # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 2**31 - 1                          # mallopt takes an int
OPT_OUT = "MTLORA_MALLOC"                           # "default": leave malloc as it is


def _tunes_malloc_itself(environ) -> bool:
    return ("glibc.malloc" in environ.get("GLIBC_TUNABLES", "")
            or any(k in environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
            or any(name in environ.get("LD_PRELOAD", "") for name in ("tcmalloc", "jemalloc", "mimalloc")))


def keep_freed_memory(environ=os.environ) -> bool:
    """Apply the malloc settings (module doc); False where they do not apply or the process chose otherwise."""
    if environ.get(OPT_OUT, "") == "default" or _tunes_malloc_itself(environ):
        return False
    try:
        libc = ctypes.CDLL(None)            # the process's own symbols (libc's among them); no ldconfig subprocess
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):              # musl and others: no glibc mallopt semantics
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def configure() -> None:
    """What importing the package does (module doc)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    keep_freed_memory()
