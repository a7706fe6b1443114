"""Fault isolation in the engine, shown with injected faults (engine/faults.py): a request whose sampling or
detokenising raises fails alone (500 over HTTP, an in-band error event in a stream) while its batch-mates finish
with the tokens of a fault-free run; a failed forward fails that step's requests only; repeated failed steps (and
only repeated ones) kill the engine; the failed requests' KV blocks are freed."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import threading

import httpx
import pytest

from mtlora.errors import EngineDeadError, RequestFailedError
from mtlora.testing import make_tiny_model_dir
from mtlora_server.api import ServerArgs, build_app
from mtlora_server.engine import faults
from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.engine import MAX_CONSECUTIVE_FAILED_STEPS, Engine
from mtlora_server.engine.testing import TINY_ADAPTERS, Finished, run_to_completion, tiny_engine_args
from mtlora_server.engine.testing import write_random_adapter
from mtlora_server.engine.types import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-faults")
    model_dir = make_tiny_model_dir(root / "model", seed=3)
    hf_config = EngineCore(tiny_engine_args(model_dir)).hf_config
    adapter = str(write_random_adapter(root / "mt_ffn", hf_config, seed=1, **TINY_ADAPTERS["mt_ffn"]))
    return model_dir, adapter


@pytest.fixture(autouse=True)
def no_faults():
    faults.clear()
    yield
    faults.clear()


@pytest.fixture
async def engine(env):
    model_dir, adapter = env
    eng = Engine.from_args(tiny_engine_args(model_dir, adapters={"mt_ffn": adapter}, max_num_seqs=8,
                                            max_num_batched_tokens=128))
    await eng.start()
    yield eng
    await eng.shutdown()


def _req(rid, prompt_seed=0, n_prompt=12, max_tokens=8, adapter=None, **kw):
    rng = random.Random(prompt_seed)
    kw.setdefault("temperature", 0.0)
    kw.setdefault("ignore_eos", True)
    return GenerationRequest(rid, [rng.randrange(3, 259) for _ in range(n_prompt)],
                             SamplingParams(max_tokens=max_tokens, **kw), adapter=adapter)


def _batch(tag: str) -> list[GenerationRequest]:
    """Greedy, seeded random (drawn from per-request generators) and n=2 requests, with and without an adapter."""
    return [_req(f"{tag}-greedy", prompt_seed=1), _req(f"{tag}-adapter", prompt_seed=2, adapter="mt_ffn"),
            _req(f"{tag}-seeded", prompt_seed=3, temperature=1.0, top_k=50, seed=11),
            _req(f"{tag}-n2", prompt_seed=4, n=2, temperature=0.8, logprobs=2, seed=12)]


async def _collect(engine, req) -> Finished:
    res = Finished()
    async for out in engine.generate(req):
        res.add(out)
    return res


async def _run_in_one_step(engine, reqs, return_exceptions=True):
    """Run `reqs` concurrently, all admitted before the engine's next step (the step thread is held meanwhile)."""
    gate = threading.Event()
    engine._submit(gate.wait, want_result=False)       # the step thread blocks in this command
    tasks = [asyncio.create_task(_collect(engine, r)) for r in reqs]
    try:
        while len(engine._inbox) < len(reqs):
            await asyncio.sleep(0.001)
    finally:
        gate.set()
    return await asyncio.gather(*tasks, return_exceptions=return_exceptions)


async def _until_idle(engine, timeout=60.0):
    for _ in range(int(timeout / 0.01)):
        if not engine.core.has_work() and not engine._inbox:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine did not go idle (a failed request left sequences behind?)")


def _same(got: Finished, want: Finished) -> None:
    assert isinstance(got, Finished), got
    assert (got.tokens, got.finish_reason, got.text) == (want.tokens, want.finish_reason, want.text)


@pytest.mark.parametrize("site", ["sample", "detokenize"])
async def test_a_request_failing_in_sampling_fails_alone(engine, site, caplog):
    reference = await _run_in_one_step(engine, _batch("ref"))
    fault = faults.inject(site, when=lambda r: r.request_id == "bad")
    bad = _req("bad", prompt_seed=9, temperature=1.0, seed=13)
    with caplog.at_level(logging.WARNING, logger="mtlora_server.engine.core"):
        results = await _run_in_one_step(engine, [bad] + _batch("run"))
    assert isinstance(results[0], RequestFailedError), results[0]
    assert "InjectedFault" in str(results[0])
    for got, want in zip(results[1:], reference):
        _same(got, want)
    if site == "sample":       # the batch raised once, then only the bad row raised again on its own
        assert fault.fired == 2
        assert any("batched sampling of 6 rows failed" in r.getMessage() for r in caplog.records)
    await _until_idle(engine)
    assert engine.core.pool.num_used == 0 and not engine.core.requests and engine.is_healthy()


async def test_a_request_failing_mid_stream_gets_its_tokens_then_the_error(engine):
    reference = await _run_in_one_step(engine, [_req("ref", prompt_seed=5)])
    calls = itertools.count()
    faults.inject("detokenize", when=lambda r: r.request_id == "bad" and next(calls) == 3)
    seen: list = []

    async def consume():
        async for out in engine.generate(_req("bad", prompt_seed=6, max_tokens=50)):
            seen.append(out)

    task = asyncio.create_task(consume())
    ok = await _collect(engine, _req("ok", prompt_seed=5))
    with pytest.raises(RequestFailedError, match="detokenising"):
        await task
    assert sum(len(d.token_ids) for out in seen for d in out.deltas) == 3 and not seen[-1].finished
    _same(ok, reference[0])
    await _until_idle(engine)
    assert engine.core.pool.num_used == 0


def test_a_failed_forward_fails_only_the_request_that_fails_alone(env):
    """The batched forward raises because of one request: each request's chunks are re-run alone, so only that
    request fails; its batch-mate and the waiting request get exactly the tokens of a fault-free run."""
    model_dir, _ = env
    core = EngineCore(tiny_engine_args(model_dir, max_num_seqs=2))
    want = run_to_completion(core, [_req("ref-mate", prompt_seed=9), _req("ref-later", prompt_seed=7)])
    fault = faults.inject("forward", when=lambda r: r.request_id == "bad")
    for r in [_req("bad", prompt_seed=8), _req("mate", prompt_seed=9), _req("later", prompt_seed=7)]:
        core.add_request(r)
    got = {"mate": Finished(), "later": Finished()}
    for out in core.step():                                      # no raise: the engine is not at fault
        got[out.request_id].add(out)
    failures = core.take_failures()
    assert list(failures) == ["bad"] and "model forward" in str(failures["bad"])
    assert fault.fired == 2                                      # the batch, then "bad" alone ("mate" ran: no probe)
    assert list(core.requests) == ["mate", "later"]
    while core.has_work():
        for out in core.step():
            got[out.request_id].add(out)
    assert core.take_failures() == {} and core.pool.num_used == 0
    for rid in ("mate", "later"):
        assert (got[rid].tokens, got[rid].finish_reason) == (want[f"ref-{rid}"].tokens,
                                                             want[f"ref-{rid}"].finish_reason)


async def test_a_request_that_always_breaks_the_forward_cannot_kill_the_engine(engine):
    """Sent alone on an idle engine, many more times than the failed-step limit: each attempt fails with its own
    error, the probe forward shows the engine healthy, and a good request is served afterwards."""
    faults.inject("forward", when=lambda r: r.request_id.startswith("poison"))
    for i in range(MAX_CONSECUTIVE_FAILED_STEPS + 2):
        with pytest.raises(RequestFailedError, match="model forward"):
            await _collect(engine, _req(f"poison{i}"))
        assert engine.is_healthy()
    assert (await _collect(engine, _req("fine"))).finished


async def test_only_repeated_failed_steps_kill_the_engine(engine):
    async def fail_once(rid):
        with pytest.raises(RequestFailedError):
            await _collect(engine, _req(rid))

    faults.inject("forward")
    for i in range(MAX_CONSECUTIVE_FAILED_STEPS - 1):
        await fail_once(f"a{i}")
    assert engine.is_healthy()
    faults.clear()
    assert (await _collect(engine, _req("fine"))).finished       # a good step resets the count
    faults.inject("forward")
    for i in range(MAX_CONSECUTIVE_FAILED_STEPS - 1):
        await fail_once(f"b{i}")
    assert engine.is_healthy()
    await fail_once("last")                                      # its own error first, then the engine is dead
    await asyncio.sleep(0.05)
    assert engine.dead and not engine.is_healthy()
    assert f"{MAX_CONSECUTIVE_FAILED_STEPS} engine steps failed in a row" in engine.health_problem()
    with pytest.raises(EngineDeadError):
        await _collect(engine, _req("after"))


@contextlib.asynccontextmanager
async def _api(engine):
    app = build_app(engine, ServerArgs(served_model_name="tiny"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                 timeout=60) as client:
        yield client


POISON = [7, 7, 7, 7, 7]


async def test_http_a_failing_request_is_500_or_an_error_event_and_its_neighbour_is_served(engine):
    body = {"model": "tiny", "prompt": [40, 41, 42, 43], "max_tokens": 6, "temperature": 0}
    async with _api(engine) as client:
        want = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
        calls = itertools.count()
        faults.inject("detokenize", when=lambda r: r.prompt_token_ids == POISON and next(calls) % 3 == 2)
        poison = {"model": "tiny", "prompt": POISON, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
        whole, streamed, neighbour = await asyncio.gather(
            client.post("/v1/completions", json=poison),
            client.post("/v1/completions", json={**poison, "stream": True}),
            client.post("/v1/completions", json=body))
        health = await client.get("/health")
    assert whole.status_code == 500, whole.text
    error = whole.json()["error"]
    assert error["type"] == "InternalServerError" and "detokenising" in error["message"]
    assert streamed.status_code == 200
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == 500
    assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])
    assert neighbour.status_code == 200 and neighbour.json()["choices"][0]["text"] == want
    assert health.status_code == 200
    await _until_idle(engine)
    assert engine.core.pool.num_used == 0


async def test_http_health_and_new_requests_are_503_while_draining(engine):
    async with _api(engine) as client:
        assert await engine.drain(1.0) == 0
        r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        health = await client.get("/health")
    assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
    assert "shutting down" in r.json()["error"]["message"]
    assert health.status_code == 503 and "shutting down" in health.json()["error"]["message"]


async def test_drain_lets_running_requests_finish_then_aborts_the_rest(engine):
    gate = threading.Event()
    engine._submit(gate.wait, want_result=False)       # hold the step thread: nothing runs before the drain
    short = asyncio.create_task(_collect(engine, _req("short", max_tokens=4)))
    long_ = asyncio.create_task(_collect(engine, _req("long", max_tokens=230, n_prompt=20)))
    while len(engine._inbox) < 2:
        await asyncio.sleep(0.001)
    drain = asyncio.create_task(engine.drain(600.0, give_up=short.done))   # "the deadline": once short is done
    await asyncio.sleep(0.01)
    with pytest.raises(EngineDeadError, match="shutting down"):           # EngineDrainingError: new requests
        await _collect(engine, _req("new"))
    assert not engine.is_healthy()
    gate.set()
    assert await drain == 1
    done_short, done_long = await short, await long_
    assert done_short.finish_reason == {0: "length"} and len(done_short.tokens[0]) == 4
    assert done_long.finish_reason == {0: "abort"} and done_long.finished and len(done_long.tokens[0]) < 230
    assert engine.core.pool.num_used == 0 and not engine.core.requests
