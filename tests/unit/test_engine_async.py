"""The async Engine (EngineClient contract): streaming, cancellation and abort free KV blocks, no leaks over
hundreds of mixed requests, overload, dead loop, async adapter (un)loading, stats."""

from __future__ import annotations

import asyncio
import random

import pytest

from mtlora.errors import (AdapterLoadError, AdapterNotFoundError, ContextLengthError, EngineDeadError,
                           EngineOverloadedError)
from mtlora.testing import make_tiny_model_dir
from mtlora_server.engine.args import EngineArgs
from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.engine import Engine
from mtlora_server.engine.testing import TINY_ADAPTERS, Finished, tiny_engine_args, write_random_adapter
from mtlora_server.engine.types import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-async")
    model_dir = make_tiny_model_dir(root / "model", seed=2)
    hf_config = EngineCore(tiny_engine_args(model_dir)).hf_config
    paths = {name: str(write_random_adapter(root / name, hf_config, seed=i, **TINY_ADAPTERS[name]))
             for i, name in enumerate(["mt_ffn", "hydra", "lora"])}
    return model_dir, paths


@pytest.fixture
async def engine(env):
    model_dir, paths = env
    eng = Engine.from_args(tiny_engine_args(model_dir, adapters={"mt_ffn": paths["mt_ffn"], "hydra": paths["hydra"]},
                                            max_num_seqs=8, max_num_batched_tokens=64))
    await eng.start()
    yield eng
    await eng.shutdown()


def _req(rid, n_prompt=12, max_tokens=8, adapter=None, seed=0, **kw):
    rng = random.Random(seed)
    ids = [rng.randrange(3, 259) for _ in range(n_prompt)]
    kw.setdefault("temperature", 0.0)
    kw.setdefault("ignore_eos", True)
    return GenerationRequest(rid, ids, SamplingParams(max_tokens=max_tokens, **kw), adapter=adapter)


async def _collect(engine, req) -> Finished:
    res = Finished()
    first = True
    async for out in engine.generate(req):
        if first:
            assert out.prompt_token_ids == req.prompt_token_ids
            first = False
        else:
            assert out.prompt_token_ids is None
        res.add(out)
    return res


async def _until_idle(engine, timeout=30.0):
    core = engine.core
    for _ in range(int(timeout / 0.01)):
        if not core.has_work() and not engine._inbox:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("engine did not go idle")


def test_engine_args_validation_and_defaults():
    args = EngineArgs()
    assert (args.max_num_seqs, args.block_size, args.max_waiting, args.dtype) == (64, 16, 1024, "auto")
    with pytest.raises(Exception, match="max_num_seqs"):
        EngineArgs(max_num_seqs=0)
    with pytest.raises(Exception, match="dtype"):
        EngineArgs(dtype="int8")


async def test_streams_concurrent_requests(engine):
    reqs = [_req(f"r{i}", n_prompt=5 + 9 * i, max_tokens=4 + i, adapter=[None, "mt_ffn", "hydra"][i % 3], seed=i)
            for i in range(6)]
    results = await asyncio.gather(*[_collect(engine, r) for r in reqs])
    for r, res in zip(reqs, results):
        assert res.finished and res.finish_reason == {0: "length"}
        assert len(res.tokens[0]) == r.sampling.max_tokens
    # The same requests one at a time give the same tokens (batch invariance through the async path).
    for r, res in zip(reqs[:3], results):
        r.request_id += "-solo"
        assert (await _collect(engine, r)).tokens == res.tokens
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.generation_tokens_total >= sum(r.sampling.max_tokens for r in reqs)
    assert stats.prompt_tokens_total >= sum(len(r.prompt_token_ids) for r in reqs)


async def test_errors_before_first_item(engine):
    with pytest.raises(AdapterNotFoundError):
        await _collect(engine, _req("x", adapter="missing"))
    with pytest.raises(ContextLengthError):
        await _collect(engine, _req("y", n_prompt=250, max_tokens=10))
    assert engine.is_healthy()


async def test_consumer_cancel_frees_blocks(engine):
    total = engine.core.pool.num_free
    gen = engine.generate(_req("c", n_prompt=40, max_tokens=200))
    await gen.__anext__()
    assert engine.core.pool.num_free < total
    await gen.aclose()
    await _until_idle(engine)
    assert engine.core.pool.num_free == total and not engine.core.requests


async def test_abort_reports_abort(engine):
    seen = []

    async def consume():
        async for out in engine.generate(_req("a", max_tokens=200)):
            seen.append(out)

    task = asyncio.create_task(consume())
    while not seen:
        await asyncio.sleep(0.005)
    await engine.abort("a")
    await asyncio.wait_for(task, 10)
    assert seen[-1].finished and seen[-1].deltas[-1].finish_reason == "abort"
    await _until_idle(engine)
    assert engine.core.pool.num_used == 0


async def test_no_leaks_over_hundreds_of_requests(engine):
    """300 small requests, mixed adapters, n up to 2, with random task cancels, early closes and aborts."""
    rng = random.Random(0)
    total = engine.core.pool.num_total
    outcomes = {"done": 0, "cancelled": 0, "closed": 0, "aborted": 0}

    async def one(i):
        req = _req(f"L{i}", n_prompt=rng.randrange(1, 40), max_tokens=rng.randrange(1, 6),
                   adapter=rng.choice([None, "mt_ffn", "hydra"]), seed=i, n=rng.choice([1, 1, 2]),
                   temperature=rng.choice([0.0, 1.0]))
        mode = rng.random()
        gen = engine.generate(req)
        try:
            async for out in gen:
                if mode < 0.15:
                    await gen.aclose()
                    outcomes["closed"] += 1
                    return
                if mode < 0.25:
                    await engine.abort(req.request_id)
                    outcomes["aborted"] += 1
            outcomes["done"] += 1
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
            raise

    for batch in range(6):
        tasks = [asyncio.create_task(one(batch * 50 + i)) for i in range(50)]
        await asyncio.sleep(0.01)
        for t in rng.sample(tasks, 5):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await _until_idle(engine)
    assert engine.core.pool.num_free == total and engine.core.pool.num_used == 0
    assert not engine.core.requests and not engine.core.scheduler.running and not engine.core.scheduler.waiting
    assert not engine._queues
    assert outcomes["done"] > 100 and outcomes["closed"] + outcomes["aborted"] > 20


async def test_overloaded(env):
    model_dir, _ = env
    eng = Engine.from_args(tiny_engine_args(model_dir, max_waiting=1))
    try:
        with pytest.raises(EngineOverloadedError):
            await _collect(eng, _req("o", n=2))
        assert (await _collect(eng, _req("ok"))).finished
    finally:
        await eng.shutdown()


async def test_dead_loop_fails_consumers(env):
    model_dir, _ = env
    eng = Engine.from_args(tiny_engine_args(model_dir))

    def boom():
        raise RuntimeError("simulated kernel failure")

    eng.core.step = boom                     # the engine's own object: simulate a crash inside a step
    with pytest.raises(EngineDeadError):
        await _collect(eng, _req("d"))
    assert not eng.is_healthy()
    with pytest.raises(EngineDeadError):
        await _collect(eng, _req("d2"))
    await eng.shutdown()


async def test_async_adapter_load_unload(engine, env):
    _, paths = env
    with pytest.raises(AdapterLoadError):
        await engine.load_adapter("broken", "/nonexistent/adapter")
    info = await engine.load_adapter("lora", paths["lora"])
    assert info.method == "lora" and info.num_parameters > 0
    assert {a.name for a in engine.list_adapters()} == {"mt_ffn", "hydra", "lora"}
    res = await _collect(engine, _req("with-lora", adapter="lora"))
    assert res.finish_reason == {0: "length"}
    await engine.unload_adapter("lora")
    with pytest.raises(AdapterNotFoundError):
        await _collect(engine, _req("after", adapter="lora"))
    with pytest.raises(AdapterNotFoundError):
        await engine.unload_adapter("lora")
    assert engine.is_healthy()


async def test_loop_stays_responsive_during_steps(engine):
    """The forward runs off the event loop: a ticker keeps ticking while long generations run."""
    ticks = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.create_task(ticker())
    await asyncio.gather(*[_collect(engine, _req(f"t{i}", n_prompt=60, max_tokens=30, seed=i)) for i in range(4)])
    done.set()
    await t
    assert ticks > engine.core.step_count           # the loop ran between (and during) engine steps


# -- one thread for every torch op of the engine (engine.py: libgomp keeps an OpenMP pool per thread) --------------
async def test_the_core_is_built_in_the_thread_that_steps_it(env, monkeypatch):
    import threading

    from mtlora_server.engine import engine as engine_mod

    seen: dict[str, set[int]] = {"init": set(), "step": set()}

    class Recording(EngineCore):
        def __init__(self, args):
            seen["init"].add(threading.get_ident())
            super().__init__(args)

        def step(self):
            seen["step"].add(threading.get_ident())
            return super().step()

    monkeypatch.setattr(engine_mod, "EngineCore", Recording)
    eng = Engine.from_args(tiny_engine_args(env[0]))
    try:
        await eng.start()
        assert len((await _collect(eng, _req("t"))).tokens[0]) == 8
    finally:
        await eng.shutdown()
    assert len(seen["init"]) == 1 and seen["init"] == seen["step"]
    assert threading.get_ident() not in seen["init"]
    assert not eng._thread.is_alive()


async def test_a_load_error_reaches_the_caller_and_an_unstarted_engine_shuts_down(env, tmp_path):
    from mtlora.errors import MtloraError

    with pytest.raises(MtloraError):
        Engine.from_args(tiny_engine_args(tmp_path / "no-model-here"))
    eng = Engine.from_args(tiny_engine_args(env[0]))
    await asyncio.wait_for(eng.shutdown(), timeout=30)           # never started: its thread must not hang
    assert not eng._thread.is_alive()


async def test_run_in_fresh_thread_returns_raises_and_never_reuses_a_thread():
    import threading

    from mtlora_server.engine.engine import run_in_fresh_thread

    threads = []

    def work(x):
        threads.append(threading.current_thread())
        if x < 0:
            raise ValueError("negative")
        return 2 * x

    assert await run_in_fresh_thread(work, 21) == 42
    with pytest.raises(ValueError, match="negative"):
        await run_in_fresh_thread(work, -1)
    assert threads[0] is not threads[1] and threading.current_thread() not in threads
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive()
