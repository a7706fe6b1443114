"""X-Request-Id (echoed, generated, used for response ids, engine ids and logs), /version, CORS, the e2e-latency
histogram, over the fake engine (issue 14 item 6)."""

from __future__ import annotations

import logging
import re

import pytest

import mtlora
from fakes import FakeEngine, api_client
from mtlora_server.api.app import RequestIdLogFilter, request_id_var

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class _RecordingEngine(FakeEngine):
    """Remembers the request id the logging context had while each request was handed to the engine."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.log_ids: list[str | None] = []

    def generate(self, req):
        self.log_ids.append(request_id_var.get())
        return super().generate(req)


@pytest.mark.parametrize("path,body,prefix", [("/v1/completions", {"prompt": "hi", "max_tokens": 2}, "cmpl"),
                                              ("/v1/chat/completions", CHAT, "chatcmpl")])
async def test_client_request_id_is_echoed_and_names_the_request(path, body, prefix):
    engine = _RecordingEngine()
    async with api_client(engine) as client:
        r = await client.post(path, json=body, headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "trace-42"
    assert r.json()["id"] == f"{prefix}-trace-42"
    assert engine.seen[0].request_id.startswith(f"{prefix}-trace-42.")     # plus a random part: ids stay unique
    assert engine.log_ids == ["trace-42"]


async def test_same_client_request_id_twice_gives_distinct_engine_ids():
    engine = FakeEngine()
    async with api_client(engine) as client:
        for _ in range(2):
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                                  headers={"X-Request-Id": "dup"})
            assert r.status_code == 200
    assert len({req.request_id for req in engine.seen}) == 2


@pytest.mark.parametrize("given", [None, "has space", "x" * 129, "caf\u00e9"])
async def test_request_id_is_generated_when_absent_or_unusable(given):
    headers = {} if given is None else {"X-Request-Id": given.encode("utf-8")}
    engine = FakeEngine()
    async with api_client(engine) as client:
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=headers)
    rid = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert r.json()["id"] == f"cmpl-{rid}" and engine.seen[0].request_id == f"cmpl-{rid}-0"


async def test_errors_and_other_routes_carry_the_request_id():
    async with api_client(FakeEngine(), api_key="k") as client:
        denied = await client.post("/v1/completions", json={"prompt": "hi"}, headers={"X-Request-Id": "a1"})
        bad = await client.post("/v1/completions", json={"prompt": "hi", "nope": 1},
                                headers={"X-Request-Id": "a2", "Authorization": "Bearer k"})
        health = await client.get("/health")
    assert (denied.status_code, denied.headers["x-request-id"]) == (401, "a1")
    assert (bad.status_code, bad.headers["x-request-id"]) == (400, "a2")
    assert re.fullmatch(r"[0-9a-f]{32}", health.headers["x-request-id"])


def test_log_filter_tags_records_inside_a_request_only():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    RequestIdLogFilter().filter(record)
    assert record.request_tag == ""
    token = request_id_var.set("abc")
    try:
        RequestIdLogFilter().filter(record)
    finally:
        request_id_var.reset(token)
    assert record.request_tag == "[abc] "


async def test_version_is_open_even_with_an_api_key():
    async with api_client(FakeEngine(), api_key="k") as client:
        r = await client.get("/version")
    assert r.status_code == 200 and r.json() == {"version": mtlora.__version__}


PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


async def test_cors_preflight_needs_no_key_and_responses_carry_cors_headers():
    async with api_client(FakeEngine(), api_key="k", allowed_origins=["https://app.example"]) as client:
        pre = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        r = await client.post("/v1/chat/completions", json=CHAT,
                              headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
        denied = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"})
        other = await client.options("/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://app.example"
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


async def test_no_cors_unless_asked():
    async with api_client(FakeEngine()) as client:
        pre = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"})
    assert pre.status_code == 405
    assert "access-control-allow-origin" not in r.headers


async def test_e2e_latency_histogram_counts_finished_requests():
    async with api_client(FakeEngine()) as client:
        for _ in range(3):
            assert (await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})).status_code == 200
        text = (await client.get("/metrics")).text
    assert 'mtlora:e2e_request_latency_seconds_count{adapter="tiny-base"} 3.0' in text
    assert "# TYPE mtlora:request_queue_time_seconds histogram" in text
