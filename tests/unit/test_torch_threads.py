"""serial_torch: the calling thread runs single-threaded; the step thread, threads started meanwhile (after
init_this_thread) and threads started afterwards keep the process count, also with overlapping blocks."""

import threading

import pytest
import torch

from mtlora_server.engine.torch_threads import init_this_thread, serial_torch


def _in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def _holder(started: threading.Event, release: threading.Event, seen: dict, key: str):
    def run():
        with serial_torch():
            seen[key] = torch.get_num_threads()
            seen[key + "_sum"] = float((torch.ones(300_000) * 2).sum())   # a parallel-sized op, run serially
            started.set()
            release.wait(10)
    t = threading.Thread(target=run)
    t.start()
    assert started.wait(10)
    return t


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)        # a count, not a speed: fine on a 1-core runner
    yield
    torch.set_num_threads(before)


def test_serial_torch_is_per_thread_and_restored():
    seen, release = {}, threading.Event()
    t = _holder(threading.Event(), release, seen, "a")
    try:
        assert seen["a"] == 1 and seen["a_sum"] == 600_000.0
        assert torch.get_num_threads() == 2                 # this (the "step") thread keeps its team
        assert _in_thread(init_this_thread) == 2            # a new thread that initialises first gets the count
    finally:
        release.set()
        t.join()
    assert _in_thread(torch.get_num_threads) == 2           # and after the block, any new thread does


def test_overlapping_blocks_leave_the_process_count_in_place():
    """Block A opens, B opens inside A's window, A closes, B closes: nothing may be left at 1 (restoring a count
    read inside another block would leave every later thread single-threaded)."""
    seen, ra, rb = {}, threading.Event(), threading.Event()
    a = _holder(threading.Event(), ra, seen, "a")
    b = _holder(threading.Event(), rb, seen, "b")
    ra.set()
    a.join()
    assert seen["b"] == 1 and _in_thread(init_this_thread) == 2
    rb.set()
    b.join()
    assert _in_thread(torch.get_num_threads) == 2 and torch.get_num_threads() == 2


def test_serial_torch_restores_after_an_error():
    def worker():
        try:
            with serial_torch():
                raise ValueError("boom")
        except ValueError:
            return torch.get_num_threads()

    assert _in_thread(worker) == 2
    assert _in_thread(torch.get_num_threads) == 2
