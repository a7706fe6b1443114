"""The request-body limit (api.limits.BodySizeLimit), alone over raw ASGI and wired into the app."""

from __future__ import annotations

import json

import pytest
from fakes import FakeEngine, api_client

from mtlora_server.api.limits import BodySizeLimit

LIMIT = 100


class _Recorder:
    """An ASGI app that reads the whole body and answers 200 with its length; remembers whether it ran."""

    def __init__(self):
        self.called = False
        self.body = None

    async def __call__(self, scope, receive, send):
        self.called = True
        chunks = []
        while True:
            message = await receive()
            assert message["type"] == "http.request"
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        self.body = b"".join(chunks)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(self.body)).encode()})


async def _drive(app, chunks: list[bytes], content_length: int | None):
    """Run one POST through `app`; returns (status, headers, body, how many body messages were read)."""
    headers = [(b"content-type", b"application/json")]
    if content_length is None:
        headers.append((b"transfer-encoding", b"chunked"))
    else:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    read = 0
    sent = []

    async def receive():
        nonlocal read
        if read < len(pending):
            read += 1
            return pending[read - 1]
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body, read


def _assert_413(status, headers, body):
    assert status == 413
    assert headers[b"connection"] == b"close"
    error = json.loads(body)["error"]
    assert error["code"] == 413 and error["type"] == "RequestTooLargeError"
    assert str(LIMIT) in error["message"] and "--max-request-body-size" in error["message"]


async def test_content_length_over_the_limit_is_refused_without_reading_the_body():
    inner = _Recorder()
    status, headers, body, read = await _drive(BodySizeLimit(inner, LIMIT), [b"x" * (LIMIT + 1)], LIMIT + 1)
    _assert_413(status, headers, body)
    assert read == 0 and not inner.called


async def test_chunked_body_over_the_limit_is_refused_once_it_passes_it():
    inner = _Recorder()
    chunks = [b"x" * 40] * 5                      # 200 bytes; passes 100 in the third chunk
    status, headers, body, read = await _drive(BodySizeLimit(inner, LIMIT), chunks, None)
    _assert_413(status, headers, body)
    assert read == 3 and not inner.called


@pytest.mark.parametrize("size", [LIMIT, LIMIT - 1, 0])
@pytest.mark.parametrize("chunked", [False, True])
async def test_bodies_up_to_exactly_the_limit_reach_the_app_unchanged(size, chunked):
    inner = _Recorder()
    payload = bytes(range(256))[:size] if size <= 256 else b"y" * size
    chunks = [payload[:30], payload[30:]] if chunked else [payload]
    status, _, body, _ = await _drive(BodySizeLimit(inner, LIMIT), chunks, None if chunked else size)
    assert status == 200 and inner.called
    assert inner.body == payload and body == str(size).encode()


async def test_a_client_that_leaves_mid_body_is_passed_on_as_a_disconnect():
    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": [(b"transfer-encoding", b"chunked")]}
    messages = iter([{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    async def send(message):
        raise AssertionError("nothing may be sent to a client that left")

    await BodySizeLimit(app, LIMIT)(scope, receive, send)
    assert seen == [{"type": "http.disconnect"}]


async def test_non_http_scopes_pass_through():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    await BodySizeLimit(app, LIMIT)({"type": "lifespan"}, None, None)
    assert seen == ["lifespan"]


def test_a_limit_below_one_byte_is_refused():
    with pytest.raises(ValueError, match="max_bytes"):
        BodySizeLimit(_Recorder(), 0)


async def test_the_app_answers_413_in_the_error_schema_and_counts_it():
    engine = FakeEngine()
    async with api_client(engine, max_request_body_size=200) as client:
        big = {"prompt": "x" * 300, "max_tokens": 1}
        r = await client.post("/v1/completions", json=big)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["type"] == "RequestTooLargeError"
        r = await client.post("/tokenize", json={"prompt": "y" * 300})
        assert r.status_code == 413
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200, r.text
        metrics = (await client.get("/metrics")).text
    assert 'mtlora:request_errors_total{code="413"} 2.0' in metrics
    assert len(engine.seen) == 1                 # only the small request reached the engine
