"""Models, tokenizer endpoints, adapter (un)loading, /metrics, /health and client disconnects over the fake engine."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from fakes import FakeEngine, api_client, disconnect_after_first_body
from mtlora_server.api import ServerArgs, build_app


async def test_models_lists_base_and_adapters_with_parent():
    engine = FakeEngine(adapters={"math": "/m", "code": "/c"})
    async with api_client(engine) as client:
        data = (await client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in data] == ["tiny-base", "math", "code"]
    assert data[0]["parent"] is None and data[0]["max_model_len"] == 128
    assert {m["parent"] for m in data[1:]} == {"tiny-base"}


async def test_tokenize_detokenize_and_tokenizer_info():
    engine = FakeEngine()
    async with api_client(engine) as client:
        tok = (await client.post("/tokenize", json={"prompt": "hé", "add_special_tokens": False,
                                                    "return_token_strs": True})).json()
        with_bos = (await client.post("/tokenize", json={"prompt": "hé"})).json()
        chat = (await client.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}]})).json()
        detok = (await client.post("/detokenize", json={"tokens": tok["tokens"]})).json()
        info = (await client.get("/tokenizer_info")).json()
    assert tok["tokens"] == engine.tokenizer.encode("hé", add_special_tokens=False) and tok["count"] == 3
    assert tok["max_model_len"] == 128 and len(tok["token_strs"]) == 3
    assert with_bos["tokens"][0] == 1 and with_bos["token_strs"] is None
    assert chat["tokens"] == engine.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True)
    assert detok == {"prompt": "hé"}
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>"
    assert info["chat_template"] == engine.tokenizer.chat_template


def _write_adapter_dir(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"method": "mtlora", "num_experts": 2, "rank": 4}))
    return path


async def test_load_and_unload_adapter(tmp_path):
    root = tmp_path / "root"
    _write_adapter_dir(root / "new")
    engine = FakeEngine()
    async with api_client(engine, enable_adapter_loading=True, adapter_root=str(root)) as client:
        r = await client.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": str(root / "new")})
        assert r.status_code == 200, r.text
        again = await client.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "new"})
        ids = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        gen = await client.post("/v1/completions", json={"model": "new", "prompt": "a", "max_tokens": 2})
        gone = await client.post("/v1/unload_lora_adapter", json={"lora_name": "new"})
        after = await client.post("/v1/completions", json={"model": "new", "prompt": "a"})
        twice = await client.post("/v1/unload_lora_adapter", json={"lora_name": "new"})
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    assert ids == ["tiny-base", "new"] and gen.status_code == 200
    assert gone.status_code == 200 and after.status_code == 404 and twice.status_code == 404


@pytest.mark.parametrize("case", ["outside", "symlink_escape", "dotdot", "missing", "broken", "base_name",
                                  "too_long", "nul"])
async def test_bad_adapter_loads_are_400_and_leave_the_server_serving(tmp_path, case):
    root = tmp_path / "root"
    root.mkdir()
    outside = _write_adapter_dir(tmp_path / "outside")
    (root / "broken").mkdir()                                  # no adapter_config.json
    os.symlink(outside, root / "link")
    name, path = {"outside": ("x", str(outside)), "symlink_escape": ("x", str(root / "link")),
                  "dotdot": ("x", "../outside"), "missing": ("x", "nothing-here"),
                  "broken": ("x", "broken"), "base_name": ("tiny-base", "broken"),
                  "too_long": ("x", "0" * 4000), "nul": ("x", "a\x00b")}[case]
    engine = FakeEngine()
    async with api_client(engine, enable_adapter_loading=True, adapter_root=str(root)) as client:
        r = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        ok = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in ({"lora_name"} if case == "base_name" else {"lora_path", None})
    assert engine.adapters == {} and ok.status_code == 200


async def test_metrics_count_requests_tokens_and_routing():
    engine = FakeEngine(adapters={"math": "/m"})
    async with api_client(engine) as client:
        await client.post("/v1/completions", json={"model": "math", "prompt": "ab", "max_tokens": 3, "n": 2})
        await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
        await client.post("/v1/completions", json={"model": "nope", "prompt": "a"})
        text = (await client.get("/metrics")).text
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line and not line.startswith("#")}
    assert lines['mtlora:requests_total{adapter="math",finish_reason="length"}'] == 2
    assert lines['mtlora:requests_total{adapter="tiny-base",finish_reason="length"}'] == 1
    assert lines['mtlora:prompt_tokens_total{adapter="math"}'] == 3
    assert lines['mtlora:generation_tokens_total{adapter="math"}'] == 6
    assert lines['mtlora:generation_tokens_total{adapter="tiny-base"}'] == 2
    assert lines['mtlora:request_errors_total{code="404"}'] == 1
    assert lines['mtlora:time_to_first_token_seconds_count{adapter="math"}'] == 1
    assert lines['mtlora:inter_token_latency_seconds_count{adapter="math"}'] == 2
    assert lines["mtlora:kv_blocks_used"] == 0 and lines["mtlora:kv_blocks_total"] == 512
    assert lines['mtlora:adapter_expert_routing_weight{adapter="math",expert="3"}'] == 0.25
    assert 'mtlora:adapter_routing_entropy_nats{adapter="math"}' in lines
    assert "mtlora:num_requests_running" in lines and "mtlora:num_requests_waiting" in lines


async def test_stream_disconnect_aborts_and_frees_kv():
    engine = FakeEngine(token_delay=0.01)
    app = build_app(engine, ServerArgs())
    await disconnect_after_first_body(app, "/v1/completions", {"prompt": "a", "max_tokens": 100, "stream": True})
    assert engine.active == {} and engine.stats().kv_blocks_used == 0
    assert engine.generation_tokens < 100                      # it stopped early, not at max_tokens
    metrics = app.state.ctx.metrics.render().decode()
    assert 'mtlora:requests_total{adapter="tiny-base",finish_reason="abort"} 1.0' in metrics


async def test_non_stream_disconnect_aborts_and_frees_kv():
    engine = FakeEngine(token_delay=0.01)
    app = build_app(engine, ServerArgs())
    seen_disconnect = asyncio.Event()

    async def receive_disconnect_soon():
        await asyncio.sleep(0.1)
        seen_disconnect.set()
        return {"type": "http.disconnect"}
    body = json.dumps({"prompt": ["a", "b"], "max_tokens": 100}).encode()
    first = True

    async def receive():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive_disconnect_soon()

    async def send(message):
        pass
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
             "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    assert seen_disconnect.is_set()
    assert engine.active == {} and len(engine.seen) == 2 and engine.generation_tokens < 200


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "a", "max_tokens": 0, "echo": True, "logprobs": 1}),   # the harness request
    ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 5}),
    ("/v1/completions", {"prompt": "a", "max_tokens": 5, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 5, "stream": True}),
])
async def test_disconnect_while_queued_aborts_before_the_first_output(path, body):
    engine = FakeEngine(queue_delay=30.0)           # still waiting for a batch slot when the client gives up
    app = build_app(engine, ServerArgs())
    t0 = time.monotonic()
    await disconnect_after_first_body(app, path, body, timeout=10, after_s=0.1)
    assert time.monotonic() - t0 < 5                # not held until the request would have run
    assert engine.seen and engine.active == {} and engine.generation_tokens == 0
    metrics = app.state.ctx.metrics.render().decode()
    assert f'finish_reason="abort"}} {float(len(engine.seen))}' in metrics


async def test_lifespan_starts_and_stops_the_engine():
    from fastapi.testclient import TestClient

    engine = FakeEngine()
    with TestClient(build_app(engine, ServerArgs(), manage_engine=True)) as client:
        assert engine.started and client.get("/health").status_code == 200
    assert not engine.started
