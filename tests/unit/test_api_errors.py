"""Table-driven error cases: every bad input gets OpenAI's error JSON with the right status and `param`."""

from __future__ import annotations

import pytest

from fakes import FakeEngine, api_client

CHAT = {"model": "tiny-base", "messages": [{"role": "user", "content": "hi"}]}
CMPL = {"model": "tiny-base", "prompt": "hi", "max_tokens": 4}

CASES = [
    # (path, body, status, param)
    ("/v1/completions", {**CMPL, "model": "nope"}, 404, "model"),
    ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model"),
    ("/v1/completions", {**CMPL, "max_tokens": 1000}, 400, "max_tokens"),
    ("/v1/completions", {**CMPL, "prompt": "x" * 200, "max_tokens": 1}, 400, "prompt"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 1000}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 200}]}, 400, "messages"),
    ("/v1/completions", {**CMPL, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {**CMPL, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {**CMPL, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**CMPL, "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {**CMPL, "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {**CMPL, "n": 0}, 400, "n"),
    ("/v1/completions", {**CMPL, "n": 10_000}, 400, "n"),
    ("/v1/completions", {**CMPL, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {**CMPL, "max_tokens": 0}, 400, "max_tokens"),          # 0 only with echo
    ("/v1/completions", {**CMPL, "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {**CMPL, "stop": [""]}, 400, "stop"),
    ("/v1/completions", {**CMPL, "stop": ["a"] * 17}, 400, "stop"),
    ("/v1/completions", {**CMPL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {**CMPL, "prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {**CMPL, "prompt": [5, 99999]}, 400, "prompt"),
    ("/v1/completions", {**CMPL, "prompt": [[5], [-1]]}, 400, "prompt.1"),
    ("/v1/completions", {**CMPL, "prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-base"}, 400, "prompt"),
    ("/v1/completions", {**CMPL, "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {**CMPL, "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {**CMPL, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {**CMPL, "seed": 2**70}, 400, "seed"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 100000]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}, 404, None),   # loading disabled
]


@pytest.mark.parametrize("path,body,status,param", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
async def test_bad_input_is_a_client_error_naming_the_param(path, body, status, param):
    engine = FakeEngine()
    async with api_client(engine) as client:
        r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["message"]
    assert err["param"] == param
    assert engine.active == {}          # nothing was left running


async def test_invalid_json_body_is_400_not_422():
    async with api_client(FakeEngine()) as client:
        r = await client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "BadRequestError"


async def test_nan_is_rejected():
    async with api_client(FakeEngine()) as client:
        r = await client.post("/v1/completions", content=b'{"prompt": "a", "temperature": NaN}',
                              headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


async def test_unknown_route_and_method_use_the_error_schema():
    async with api_client(FakeEngine()) as client:
        r404 = await client.get("/v1/nothing")
        r405 = await client.get("/v1/completions")
    assert r404.status_code == 404 and r404.json()["error"]["code"] == 404
    assert r405.status_code == 405 and r405.json()["error"]["code"] == 405


async def test_queue_full_is_429_with_retry_after():
    engine = FakeEngine(max_running=0, max_waiting=0)
    async with api_client(engine) as client:
        r = await client.post("/v1/completions", json=CMPL)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    assert r.json()["error"]["type"] == "RateLimitError"


async def test_dead_engine_is_503_and_health_says_so():
    engine = FakeEngine()
    engine.healthy = False
    async with api_client(engine) as client:
        r = await client.post("/v1/completions", json=CMPL)
        health = await client.get("/health")
    assert r.status_code == 503 and health.status_code == 503


async def test_engine_dying_mid_stream_ends_the_stream_with_an_error_event():
    engine = FakeEngine()
    engine.fail_after = 2
    async with api_client(engine) as client:
        r = await client.post("/v1/completions", json={**CMPL, "max_tokens": 8, "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert '"code": 503' in events[-2]
    assert engine.active == {}


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic secret", "Bearer "])
async def test_api_key_required_on_v1(header):
    headers = {"Authorization": header} if header else {}
    async with api_client(FakeEngine(), api_key="secret") as client:
        r = await client.post("/v1/completions", json=CMPL, headers=headers)
        models = await client.get("/v1/models", headers=headers)
        health = await client.get("/health")
    assert r.status_code == 401 and models.status_code == 401
    assert r.json()["error"]["type"] == "AuthenticationError"
    assert health.status_code == 200


async def test_api_key_accepted():
    async with api_client(FakeEngine(), api_key="secret") as client:
        r = await client.post("/v1/completions", json=CMPL, headers={"Authorization": "Bearer secret"})
    assert r.status_code == 200
