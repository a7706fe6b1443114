"""The API edge against hostile input, in-process over the fake engine (fast; the same table runs against a real
mtlora-serve process in tests/integration/test_hostile_inputs.py), plus the issue-13 fixes that need no model:
encodable errors, adapter-root symlinks and paths, 409 on a busy unload, 429s kept out of the abort count, the
key on the tokenizer routes, strict booleans and `null` as the default."""

from __future__ import annotations

import json

import httpx
import pytest

from fakes import FakeEngine, api_client
from hostile_cases import CASES, SURVIVABLE, Case, adapter_cases, check_error, leaked_paths
from mtlora.errors import AdapterBusyError


async def _send(client: httpx.AsyncClient, case: Case) -> httpx.Response:
    return await client.post(case.path, content=case.content(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_hostile_input_is_a_4xx_in_the_error_schema(case):
    engine = FakeEngine()
    async with api_client(engine) as client:
        r = await _send(client, case)
        reached = list(engine.seen)
        ok = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
    assert check_error(r.status_code, r.headers, r.text, case) == [], r.text[:300]
    assert reached == [] and engine.active == {}               # nothing reached the engine
    assert ok.status_code == 200


@pytest.mark.parametrize("path,body", SURVIVABLE, ids=[f"{p}-{i}" for i, (p, _) in enumerate(SURVIVABLE)])
async def test_requests_that_once_killed_the_engine_are_served(path, body):
    async with api_client(FakeEngine()) as client:
        r = await client.post(path, json=body)
    assert r.status_code == 200, r.text


async def test_every_adapter_route_case(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    cases = adapter_cases(root, outside)
    engine = FakeEngine()
    failures = {}
    async with api_client(engine, enable_adapter_loading=True, adapter_root=str(root)) as client:
        for case in cases:
            r = await _send(client, case)
            problems = check_error(r.status_code, r.headers, r.text, case)
            problems += [f"shows {p}" for p in leaked_paths(r.text, root, outside, tmp_path)]
            if problems:
                failures[case.id] = problems
    assert failures == {}
    assert engine.adapters == {}                               # nothing from outside the root was loaded


async def test_symlinked_adapter_file_is_named_relative_to_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    adapter_cases(root, tmp_path / "outside")
    async with api_client(FakeEngine(), enable_adapter_loading=True, adapter_root=str(root)) as client:
        r = await client.post("/v1/load_lora_adapter",
                              json={"lora_name": "x", "lora_path": str(root / "link-adapter_config")})
        garbage = await client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "garbage"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "lora_path"
    assert "link-adapter_config/adapter_config.json links outside the adapter root" in err["message"]
    assert garbage.status_code == 400 and "garbage/adapter_config.json" in garbage.json()["error"]["message"]
    assert leaked_paths(r.text + garbage.text, root, tmp_path) == []


async def test_unloading_a_busy_adapter_is_409():
    engine = FakeEngine(adapters={"math": "/m"})

    async def busy(name):
        raise AdapterBusyError(f"adapter {name!r} is in use by 1 running sequence(s); retry later")
    engine.unload_adapter = busy
    async with api_client(engine, enable_adapter_loading=True, adapter_root="/") as client:
        r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "math"})
    assert r.status_code == 409
    assert r.json()["error"] == {"message": "adapter 'math' is in use by 1 running sequence(s); retry later",
                                 "type": "ConflictError", "param": "lora_name", "code": 409}


async def test_queue_full_counts_as_rejected_not_as_abort():
    engine = FakeEngine(max_running=0, max_waiting=0)
    async with api_client(engine) as client:
        r = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "n": 3})
        metrics = (await client.get("/metrics")).text
    assert r.status_code == 429
    assert 'mtlora:requests_rejected_total{adapter="tiny-base",reason="queue_full"} 1.0' in metrics
    assert 'finish_reason="abort"' not in metrics


async def test_refused_bad_input_is_not_an_abort_either():
    async with api_client(FakeEngine()) as client:
        r = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 500})
        metrics = (await client.get("/metrics")).text
    assert r.status_code == 400 and 'finish_reason="abort"' not in metrics


@pytest.mark.parametrize("path,body", [("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [5]}),
                                       ("/tokenize", {"prompt": "a", "model": "secret-adapter"})])
async def test_tokenizer_routes_need_the_key_when_one_is_set(path, body):
    async with api_client(FakeEngine(), api_key="k") as client:
        anonymous = await client.post(path, json=body)
        keyed = await client.post(path, json=body, headers={"Authorization": "Bearer k"})
        info = await client.get("/tokenizer_info")
        health = await client.get("/health")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "AuthenticationError"
    assert keyed.status_code == (404 if "model" in body else 200)
    assert info.status_code == 200 and health.status_code == 200


async def test_tokenizer_routes_stay_open_without_a_key():
    async with api_client(FakeEngine()) as client:
        r = await client.post("/tokenize", json={"prompt": "a"})
    assert r.status_code == 200


async def test_lone_surrogate_is_escaped_in_the_message():
    async with api_client(FakeEngine()) as client:
        r = await client.post("/v1/chat/completions", content=b'{"model": "x\\ud800", "messages": []}',
                              headers={"content-type": "application/json"})
    assert r.status_code in (400, 404)
    r = await _post_raw('{"model": "x\\ud800", "prompt": "a"}')
    assert r.status_code == 404 and r.json()["error"]["message"] == "The model `x\\ud800` does not exist."


async def _post_raw(text: str) -> httpx.Response:
    async with api_client(FakeEngine()) as client:
        return await client.post("/v1/completions", content=text.encode(), headers={"content-type": "application/json"})


async def test_huge_error_messages_are_cut():
    r = await _post_raw(json.dumps({"model": "m" * 100_000, "prompt": "a"}))
    message = r.json()["error"]["message"]
    assert r.status_code == 404 and len(message) < 2100 and message.endswith("more characters)")


async def test_null_means_the_default_and_tiny_temperatures_are_greedy():
    engine = FakeEngine()
    async with api_client(engine) as client:
        r = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "stream": None, "n": None,
                                                       "temperature": 1e-40})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1
    assert engine.seen[0].sampling.temperature == 0.0 and engine.seen[0].sampling.greedy


@pytest.mark.parametrize("body", [{"stream": "yes"}, {"stream": 1}, {"echo": "true"}])
async def test_booleans_must_be_json_booleans(body):
    r = await _post_raw(json.dumps({"prompt": "a", "max_tokens": 2, **body}))
    assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(body))
