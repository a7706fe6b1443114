"""A real `mtlora-serve` keeps answering /health while a ~10 MB request is handled; the body limit answers 413.

No timing assertions here: the latencies are measured by health_latency.py and reported in docs/benchmarks.md.
"""

from __future__ import annotations

import httpx
import pytest

from health_latency import big_request, poll_health_during, random_words
from serve_helpers import serve_process

COMMON = ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "1MiB", "--log-level", "warning"]
TEN_MB = 10 * 10**6


@pytest.mark.parametrize("size", [pytest.param(10**6, id="1MB"),        # the large tokenizer lane, in seconds
                                  pytest.param(TEN_MB, id="10MB", marks=pytest.mark.slow)])   # ~2 min on 2 cores
def test_health_keeps_answering_while_a_huge_prompt_is_handled(tiny_model_dir, size):
    text = random_words(size)
    answers: dict[str, httpx.Response] = {}
    with serve_process(["--model", str(tiny_model_dir), "--max-request-body-size", "16MiB", *COMMON]) as url:
        for route in ("/v1/completions", "/tokenize"):
            send = big_request(url, route, text)

            def keep(route=route, send=send):
                answers[route] = send()
                return answers[route]
            result = poll_health_during(url, route, keep)
            assert result.health_failures == 0, route
            assert result.health_ms, "the poller never got an answer"
        small = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert small.status_code == 200, small.text
    error = answers["/v1/completions"].json()["error"]
    assert answers["/v1/completions"].status_code == 400
    assert error["param"] == "prompt" and "maximum context length" in error["message"]
    tokenized = answers["/tokenize"].json()
    assert answers["/tokenize"].status_code == 200
    assert tokenized["count"] == len(tokenized["tokens"]) == len(text.encode())   # one token per byte


def test_the_default_limit_refuses_a_10mb_body_with_413(tiny_model_dir):
    payload = b'{"prompt": "' + b"x" * TEN_MB + b'", "max_tokens": 1}'
    with serve_process(["--model", str(tiny_model_dir), "--api-key", "k", *COMMON]) as url:
        for route in ("/v1/completions", "/tokenize"):
            r = httpx.post(url + route, content=payload, timeout=60,
                           headers={"content-type": "application/json", "authorization": "Bearer k"})
            assert r.status_code == 413, r.text
            assert r.json()["error"]["type"] == "RequestTooLargeError"
        assert httpx.get(url + "/health").status_code == 200
        ok = httpx.post(url + "/tokenize", json={"prompt": "ab", "add_special_tokens": False},
                        headers={"authorization": "Bearer k"})      # with --api-key the tokenizer routes need it
        assert ok.json()["tokens"] == [100, 101]            # byte tokens: 3 + byte value
