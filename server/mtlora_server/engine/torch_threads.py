"""Torch CPU work beside the step thread without a second OpenMP team.

Contract: inside `serial_torch()` the calling thread's torch CPU ops run on that thread alone (no OpenMP team);
on exit its previous thread count is back. Other threads are not affected: the step thread keeps its team, and
threads started meanwhile get the usual count (tests/unit/test_torch_threads.py checks both).

Why: the step thread's OpenMP team already has a worker on every core. A helper thread (an adapter-load worker,
`engine.run_in_fresh_thread`) that runs a parallel op starts a second team, and on a small CPU the two teams then
fight for the cores: each team's workers wait at barriers for a worker that is descheduled. A py-spy profile of
`mtlora-bench adapters` (32 slots, 2 cores) had the load workers at 988 samples against the step thread's 3,695,
for 67 loads that take ~25 ms each alone (~1.7 s in all, i.e. ~85 samples): their ops ran ~10x slower beside the
step, and slowed it. File reads and validation are not worth a team; one thread does them at full speed.

How: `torch.set_num_threads` sets the calling thread's OpenMP and MKL thread counts (libgomp keeps the count per
thread once set) but also torch's process-wide default, which a thread adopts at its first parallel op (torch's
lazy per-thread initialisation). So the process count is read once, when no `serial_torch` block is open (under a
lock), and put back when the last open block closes; never a count read inside another thread's block (that would
be 1, and every later thread would then run single-threaded). Threads that already ran a torch op keep their
count; a thread whose first torch op falls inside a block starts with 1, unless it calls `init_this_thread`
first (the engine's step thread does). Meant for short-lived threads: one that leaves its block while another
thread's is open keeps the count 1 until it enters a block again.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

_lock = threading.Lock()
_open = 0                                   # serial_torch blocks open now, in all threads
_process_count = 0                          # torch's thread count outside any block, read when none was open
_local = threading.local()                  # .stale: this thread left a block while another was open (count 1)


def init_this_thread() -> int:
    """Fix this thread's torch thread count now, at the process count even while another thread's `serial_torch`
    block is open (its first parallel op would otherwise adopt that block's 1); returns the count. The engine's
    step thread calls it first thing."""
    with _lock:
        count = torch.get_num_threads()     # torch's lazy per-thread initialisation
        if _open and count != _process_count:
            torch.set_num_threads(_process_count)
            count = _process_count
        return count


@contextmanager
def serial_torch() -> Iterator[None]:
    """Run this thread's torch CPU ops single-threaded for the block's duration (see the module docstring)."""
    global _open, _process_count
    with _lock:
        count = torch.get_num_threads()     # this thread's lazy initialisation, before its count becomes 1
        if _open == 0 and not getattr(_local, "stale", False):
            _process_count = count
        _open += 1
        torch.set_num_threads(1)
    try:
        yield
    finally:
        with _lock:
            _open -= 1
            if _open == 0:
                torch.set_num_threads(_process_count)
            _local.stale = _open > 0
