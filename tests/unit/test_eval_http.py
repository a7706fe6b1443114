"""The HTTP client: retry policy, Retry-After, give-up, non-retryable errors, and log-likelihood extraction."""

from __future__ import annotations

import email.utils
import json
import time

import httpx
import pytest

from mtlora_clients.http import (CompletionClient, RetryPolicy, ServerReplyError, continuation_logprob,
                                 parse_retry_after)

OK = {"choices": [{"text": " yes", "index": 0}]}


def _client(handler, **kw):
    delays: list[float] = []

    async def sleep(d):
        delays.append(d)

    c = CompletionClient("http://x", transport=httpx.MockTransport(handler), sleep=sleep,
                         retry=RetryPolicy(**kw) if kw else RetryPolicy())
    return c, delays


def _sequence(*responses):
    it = iter(responses)

    def handler(request):
        r = next(it)
        if isinstance(r, Exception):
            raise r
        return r

    return handler


async def test_retry_after_is_honoured_and_backoff_doubles():
    handler = _sequence(httpx.Response(429, headers={"Retry-After": "3"}), httpx.Response(500),
                        httpx.Response(503), httpx.Response(200, json=OK))
    c, delays = _client(handler, base_s=0.5)
    async with c:
        assert await c.complete("m", "p", 4) == " yes"
    assert delays == [3.0, 1.0, 2.0]  # server's 3 s, then 0.5*2**1, 0.5*2**2
    assert c.n_requests == 4 and c.n_retries == 3


async def test_timeouts_are_retried_and_each_retry_says_why(caplog):
    handler = _sequence(httpx.ReadTimeout("slow"), httpx.ConnectError("refused"), httpx.Response(200, json=OK))
    c, delays = _client(handler, base_s=0.1)
    async with c:
        assert await c.complete("m", "p", 4) == " yes"
    assert delays == [0.1, 0.2]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "ReadTimeout: slow" in warnings[0] and "ConnectError: refused" in warnings[1]


async def test_gives_up_after_max_retries_with_last_error():
    c, delays = _client(lambda r: httpx.Response(502, json={"error": {"message": "bad gateway"}}), max_retries=2)
    async with c:
        with pytest.raises(ServerReplyError, match="3 attempts.*HTTP 502: bad gateway"):
            await c.complete("m", "p", 4)
    assert len(delays) == 2


async def test_client_errors_are_not_retried():
    c, delays = _client(lambda r: httpx.Response(400, json={"error": {"message": "prompt too long"}}))
    async with c:
        with pytest.raises(ServerReplyError, match="HTTP 400: prompt too long") as e:
            await c.complete("m", "p", 4)
    assert e.value.status == 400 and delays == []


@pytest.mark.parametrize("body,match", [
    ({"choices": []}, "choices"), ({"choices": [{"text": 3}]}, "text"), ([1, 2], "JSON object"),
])
async def test_malformed_completion_replies(body, match):
    c, _ = _client(lambda r: httpx.Response(200, json=body))
    async with c:
        with pytest.raises(ServerReplyError, match=match):
            await c.complete("m", "p", 4)


async def test_sends_auth_and_greedy_fields():
    seen = {}

    def handler(request):
        seen["auth"] = request.headers.get("authorization")
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, json=OK)

    c = CompletionClient("http://x/", api_key="k", transport=httpx.MockTransport(handler))
    async with c:
        await c.complete("m", "p", 7, stop=["Q:"])
    assert seen["auth"] == "Bearer k"
    assert seen["body"] == {"model": "m", "prompt": "p", "max_tokens": 7, "temperature": 0.0, "stop": ["Q:"]}


def test_parse_retry_after_seconds_date_and_garbage():
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after(future) <= 31


def _echo(tokens, lps):
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"choices": [{"text": "".join(tokens), "logprobs": {"tokens": tokens, "token_logprobs": lps,
                                                                "text_offset": offsets}}]}


def test_continuation_logprob_sums_only_continuation_tokens():
    body = _echo(["Answer", ":", " Par", "is"], [None, -1.0, -0.5, -0.25])
    ctx = "Answer:"
    assert continuation_logprob(body, len(ctx), len(ctx + " Paris")) == pytest.approx(-0.75)


def test_continuation_logprob_counts_a_token_straddling_the_boundary():
    body = _echo(["Answer", ": A"], [None, -2.0])  # the tokenizer merged ':' with ' A'
    assert continuation_logprob(body, len("Answer:"), len("Answer: A")) == pytest.approx(-2.0)


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b["choices"][0].pop("logprobs"), "logprobs missing"),
    (lambda b: b["choices"][0]["logprobs"]["text_offset"].pop(), "different lengths"),
    (lambda b: b["choices"][0]["logprobs"]["token_logprobs"].__setitem__(2, None), "token_logprobs"),
])
def test_continuation_logprob_malformed(mutate, match):
    body = _echo(["Answer:", " A", " B"], [None, -1.0, -2.0])
    mutate(body)
    with pytest.raises(ServerReplyError, match=match):
        continuation_logprob(body, len("Answer: A"), len("Answer: A B"))


def test_continuation_logprob_without_covering_token():
    body = _echo(["Answer:"], [None])  # the server did not echo the continuation
    with pytest.raises(ServerReplyError, match="no echoed token"):
        continuation_logprob(body, len("Answer:"), len("Answer: A"))


@pytest.mark.parametrize("response,want", [
    (httpx.Response(200, json={"object": "list", "data": [{"id": "base"}, {"id": "mt"}]}), ["base", "mt"]),
    (httpx.Response(404, json={"error": {"message": "no such route"}}), None),
    (httpx.Response(200, content=b"not json"), None),
    (httpx.Response(200, json=[1, 2]), None),
])
async def test_served_models(response, want):
    c, _ = _client(lambda request: response)
    async with c:
        assert await c.served_models() == want


async def test_unknown_model_fails_fast_naming_the_flag():
    from argparse import Namespace

    from mtlora.errors import ConfigError
    from mtlora_clients.eval.runner import evaluate_model

    def handler(request):
        assert request.url.path == "/v1/models", "no completion may be sent for a model the server lacks"
        return httpx.Response(200, json={"data": [{"id": "base"}]})

    args = Namespace(output="unused", max_retries=0, base_url="http://x", api_key=None, timeout=5.0, concurrency=1)
    with pytest.raises(ConfigError, match="'typo' is not served") as err:
        await evaluate_model(args, "typo", [], transport=httpx.MockTransport(handler))
    assert err.value.field == "--model"


def test_idle_connections_expire_before_the_servers_keepalive_timeout():
    # Equal times let the server close a connection just as the client reuses it (a ReadError, then a retry).
    import uvicorn

    server_keepalive = uvicorn.Config(app=None).timeout_keep_alive   # mtlora-serve keeps uvicorn's default
    client = CompletionClient("http://x")
    assert client.keepalive_expiry_s < server_keepalive
    assert httpx.Limits().keepalive_expiry >= server_keepalive   # why httpx's default is not enough
