"""Torch CPU work beside the step thread without a second OpenMP team, and without touching the step thread's.

Contract: inside `serial_torch()` the calling thread's torch CPU ops run on that thread alone (no OpenMP team); on
exit its previous count is back. No other thread is affected, at any time: the step thread keeps its team, and so
does every thread started meanwhile or afterwards (tests/unit/test_torch_threads.py checks all three, including a
C++ extension's first parallel op in the step thread while a block is open).

Why single-threaded: the step thread's OpenMP team already has a worker on every core. A helper thread (an
adapter-load worker, `engine.run_in_fresh_thread`) that runs a parallel op starts a second team, and on a small CPU
the two teams then fight for the cores: each team's workers wait at barriers for a worker that is descheduled. A
py-spy profile of `mtlora-bench adapters` (32 slots, 2 cores) had the load workers at 988 samples against the step
thread's 3,695 for 67 loads that take ~25 ms each alone. File reads and validation are not worth a team.

Why not `torch.set_num_threads(1)`: besides the calling thread's OpenMP and MKL counts it sets torch's process-wide
default, which a thread adopts whenever it (re)initialises its count -- and a thread does that once per library
that inlines ATen's `lazy_init_num_threads` (each C++ extension carries its own copy of the per-thread flag). So
the step thread's first call into one of our kernels while a load worker's block was open set the step thread to
1 thread for good: in `mtlora-bench adapters` (32 slots) 129 of 130 steps ran on one core, the "base GEMMs 2x
slower" of docs/benchmarks.md (found 2026-12-03 with a per-step `torch.get_num_threads()` probe and gdb on
`omp_set_num_threads`). Resetting the default afterwards cannot undo a count another thread already adopted.

How: the calling thread's own counts only, through the runtimes' per-thread calls: `omp_set_num_threads` of the
OpenMP runtime torch loaded (an OpenMP ICV is per thread) and MKL's `MKL_Set_Num_Threads_Local` (the C entry
point; the lower-case symbol is the Fortran one, taking a pointer). The runtime is the `libgomp` / `libiomp5` /
`libomp` mapped into the process (/proc/self/maps; torch's own copy first), so the call reaches the copy torch
uses. torch's own count is initialised first (`torch.get_num_threads()`), so its lazy initialisation cannot undo
the 1 inside the block. Where torch does not run on OpenMP, or no runtime is found (not Linux), the block is a
no-op: torch's native thread pool is one pool per process, so no second team arises there.
"""

from __future__ import annotations

import ctypes
import logging
import os
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import torch

log = logging.getLogger(__name__)

OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")      # GNU, Intel, LLVM: all keep the count per thread


class _Runtime:
    """The per-thread thread-count setters of the loaded OpenMP runtime (and MKL, where torch exports it)."""

    def __init__(self, omp: ctypes.CDLL, mkl_local):
        self._omp, self._mkl_local = omp, mkl_local

    def get(self) -> int:
        return int(self._omp.omp_get_max_threads())

    def set(self, n: int) -> int:
        """This thread's OpenMP count to `n`; returns MKL's previous per-thread setting (0: none) for `restore`."""
        self._omp.omp_set_num_threads(ctypes.c_int(n))
        return int(self._mkl_local(ctypes.c_int(n))) if self._mkl_local is not None else 0

    def restore(self, n: int, mkl_previous: int) -> None:
        self._omp.omp_set_num_threads(ctypes.c_int(n))
        if self._mkl_local is not None:
            self._mkl_local(ctypes.c_int(mkl_previous))     # 0 drops the thread's setting: MKL's global applies


def _mapped(prefixes: tuple[str, ...]) -> str | None:
    """The loaded library whose file name starts with one of `prefixes` (torch's own copy first), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {parts[5].strip() for parts in (line.split(None, 5) for line in f)
                     if len(parts) == 6 and parts[5].startswith("/")}
    except OSError:
        return None
    found = sorted(p for p in paths if os.path.basename(p).startswith(prefixes))
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__))
    ours = [p for p in found if os.path.realpath(p).startswith(torch_dir + os.sep)]
    return (ours or found or [None])[0]


@lru_cache(maxsize=1)
def _runtime() -> _Runtime | None:
    if "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
        log.debug("torch does not run on OpenMP: serial_torch() is a no-op")
        return None
    path = _mapped(OPENMP_RUNTIMES)
    if path is None:
        log.info("no OpenMP runtime found among the loaded libraries: helper threads keep torch's thread count")
        return None
    omp = ctypes.CDLL(path)                                  # already loaded: the same copy torch calls
    mkl_local = None
    torch_cpu = _mapped(("libtorch_cpu",))
    if torch_cpu is not None:
        mkl_local = getattr(ctypes.CDLL(torch_cpu), "MKL_Set_Num_Threads_Local", None)   # C API (by value)
        if mkl_local is not None:
            mkl_local.restype = ctypes.c_int
    return _Runtime(omp, mkl_local)


@contextmanager
def serial_torch() -> Iterator[None]:
    """Run this thread's torch CPU ops single-threaded for the block's duration (see the module docstring)."""
    torch.get_num_threads()                                   # torch's lazy per-thread initialisation, done now
    rt = _runtime()
    if rt is None:
        yield
        return
    before = rt.get()
    mkl_previous = rt.set(1)
    try:
        yield
    finally:
        rt.restore(before, mkl_previous)


class KeepThreadCount:
    """The step thread's safety net: `check()` (after each step) puts this thread's torch thread count back to
    what it was when the guard was made, with a warning, if anything changed it -- any code that calls
    `torch.set_num_threads` in any thread can (module docstring), and a step thread on one core halves the
    engine's speed without another symptom. Costs one `torch.get_num_threads()` per step."""

    def __init__(self) -> None:
        self.count = torch.get_num_threads()
        self.restored = 0

    def check(self) -> bool:
        """True when the count had changed and was set back."""
        now = torch.get_num_threads()
        if now == self.count:
            return False
        self.restored += 1
        log.warning("the step thread's torch thread count changed from %d to %d (torch.set_num_threads called "
                    "in some thread?); set back to %d", self.count, now, self.count)
        torch.set_num_threads(self.count)
        return True
