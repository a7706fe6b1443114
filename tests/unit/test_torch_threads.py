"""serial_torch: the calling thread runs single-threaded; no other thread's count moves, ever -- not the step
thread's (also at its first call into a C++ extension while a block is open, the bug torch_threads' docstring
describes), not a thread started during a block, not one started after; overlapping blocks and errors included.
And end to end: a bf16 engine's step thread keeps its team while adapter-load workers run."""

import asyncio
import collections
import ctypes
import threading

import pytest
import torch

from mtlora.testing import make_tiny_model_dir
from mtlora_server.engine import cpu_fused, torch_threads
from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.engine import Engine
from mtlora_server.engine.testing import TINY_ADAPTERS, tiny_engine_args, write_random_adapter
from mtlora_server.engine.torch_threads import serial_torch
from mtlora_server.engine.types import GenerationRequest, SamplingParams

needs_openmp = pytest.mark.skipif(torch_threads._runtime() is None,
                                  reason="torch does not run on a loaded OpenMP runtime here: serial_torch is a no-op")


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


@needs_openmp
def test_serial_torch_is_per_thread_and_restored():
    seen, release = {}, threading.Event()
    t = _holder(threading.Event(), release, seen, "a")
    try:
        assert seen["a"] == 1 and seen["a_sum"] == 600_000.0
        assert torch.get_num_threads() == 2                 # this (the "step") thread keeps its team
        assert _in_thread(torch.get_num_threads) == 2       # a thread started during the block gets the count
    finally:
        release.set()
        t.join()
    assert _in_thread(torch.get_num_threads) == 2           # and after the block, any new thread does


@needs_openmp
def test_mkl_count_is_per_thread_inside_the_block():
    lib = ctypes.CDLL(torch_threads._mapped(("libtorch_cpu",)) or pytest.skip("libtorch_cpu not mapped"))
    get = getattr(lib, "MKL_Get_Max_Threads", None) or pytest.skip("torch was built without MKL")
    outside = get()

    def inside():
        with serial_torch():
            return get()

    assert _in_thread(inside) == 1 and get() == outside


@needs_openmp
def test_a_kernels_first_parallel_op_in_the_step_thread_during_a_block_keeps_its_team():
    """The step thread has run torch ops; a load worker's block opens; the step thread then calls a C++ extension
    for the first time (the extension's own lazy thread-count initialisation). Its count must stay 2: with
    `torch.set_num_threads(1)` in the block it became 1 for good."""
    ext = cpu_fused.kernel()
    if ext is None:
        pytest.skip("the fused-rows C++ extension cannot be built here (no compiler?)")
    ready, go, seen = threading.Event(), threading.Event(), {}

    def step_thread():
        seen["before"] = torch.get_num_threads()
        ready.set()
        go.wait(10)
        ext.rms_norm(torch.randn(256, 64), torch.ones(64), 1e-6)    # its first parallel_for in this thread
        seen["after"] = torch.get_num_threads()

    t = threading.Thread(target=step_thread)
    t.start()
    assert ready.wait(10)
    release, block = threading.Event(), {}
    holder = _holder(threading.Event(), release, block, "load")
    try:
        go.set()
        t.join(10)
    finally:
        release.set()
        holder.join()
    assert block["load"] == 1 and seen == {"before": 2, "after": 2}


@needs_openmp
def test_overlapping_blocks_leave_every_count_in_place():
    """Block A opens, B opens inside A's window, A closes, B closes: nothing may be left at 1."""
    seen, ra, rb = {}, threading.Event(), threading.Event()
    a = _holder(threading.Event(), ra, seen, "a")
    b = _holder(threading.Event(), rb, seen, "b")
    ra.set()
    a.join()
    assert seen["b"] == 1 and _in_thread(torch.get_num_threads) == 2
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


@needs_openmp
def test_bf16_engine_step_thread_keeps_its_team_while_adapters_load(tmp_path, monkeypatch):
    """7 adapters through 2 slots, no host cache: ~every request waits for a load worker (serial_torch) while the
    step thread runs the bf16 CPU path and its kernels. Every step must run at the process count (before the fix:
    the first step at 2, every later one at 1)."""
    if cpu_fused.kernel() is None:
        pytest.skip("the CPU kernels cannot be built here: the step thread never inits a kernel's count")
    model_dir = make_tiny_model_dir(tmp_path / "model", seed=7)
    hf_config = EngineCore(tiny_engine_args(model_dir)).hf_config
    kinds = list(TINY_ADAPTERS)
    paths = {f"a{i}": str(write_random_adapter(tmp_path / f"a{i}", hf_config, seed=100 + i,
                                               **TINY_ADAPTERS[kinds[i % len(kinds)]])) for i in range(7)}
    counts: collections.Counter = collections.Counter()
    step = EngineCore.step

    def counted(self):
        counts[torch.get_num_threads()] += 1
        return step(self)

    monkeypatch.setattr(EngineCore, "step", counted)

    async def run():
        engine = Engine.from_args(tiny_engine_args(model_dir, adapters=paths, max_adapters=2, adapter_cache_size=0,
                                                   dtype="bfloat16"))
        await engine.start()
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

        async def one(i: int) -> None:
            async for _ in engine.generate(GenerationRequest(f"r{i}", list(range(3, 40)), params,
                                                             adapter=f"a{i % 7}")):
                pass

        try:
            await asyncio.gather(*[one(i) for i in range(28)])
            return engine.stats().adapter_counters.disk_loads_total
        finally:
            await engine.shutdown()

    disk_loads = asyncio.run(run())
    assert disk_loads >= 5            # 2 installed at start; the workers read the other 5 beside the steps
    assert set(counts) == {2}, dict(counts)


def test_keep_thread_count_sets_a_changed_count_back(caplog):
    def run():
        guard = torch_threads.KeepThreadCount()
        first = guard.check()
        torch.set_num_threads(1)                          # what a library could do from any thread
        with caplog.at_level("WARNING", logger="mtlora_server.engine.torch_threads"):
            second = guard.check()
        return guard.count, first, second, torch.get_num_threads(), guard.restored

    assert _in_thread(run) == (2, False, True, 2, 1)
    assert "changed from 2 to 1" in caplog.text


def test_engine_step_thread_recovers_a_count_changed_under_it(tmp_path, monkeypatch):
    """Something sets the step thread to 1 thread during a step: the next steps run at 2 again."""
    model_dir = make_tiny_model_dir(tmp_path / "model", seed=7)
    counts: list[int] = []
    step = EngineCore.step

    def meddling(self):
        counts.append(torch.get_num_threads())
        if len(counts) == 2:
            torch.set_num_threads(1)
        return step(self)

    monkeypatch.setattr(EngineCore, "step", meddling)

    async def run():
        engine = Engine.from_args(tiny_engine_args(model_dir))
        await engine.start()
        try:
            params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            async for _ in engine.generate(GenerationRequest("r", list(range(3, 20)), params)):
                pass
        finally:
            await engine.shutdown()

    asyncio.run(run())
    assert len(counts) >= 4 and counts[:2] == [2, 2] and set(counts[2:]) == {2}, counts
