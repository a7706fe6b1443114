"""The real `mtlora-serve` process: SIGTERM drains gracefully (every open stream ends with a finish_reason chunk and
`data: [DONE]`, non-streaming requests get their JSON, new requests get 503, exit status 0), and a process whose
engine fails every forward exits with status 3 so that its supervisor restarts it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from mtlora.testing import make_tiny_model_dir
from mtlora_server.server import EXIT_ENGINE_DIED
from serve_helpers import free_port, serve_command

SHUTDOWN_TIMEOUT = 20.0         # --shutdown-timeout of the drain test
SHORT, LONG = 16, 8000          # max_tokens: SHORT finish within the deadline (even at 1 step a second), LONG cannot


@contextlib.contextmanager
def _serving(args: list[str], env: dict | None = None, startup_timeout: float = 120.0):
    """(process, base URL, log path) of mtlora-serve on a free port, once /health answers; killed afterwards."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen(serve_command() + args + ["--host", "127.0.0.1", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            assert proc.poll() is None, f"mtlora-serve exited with {proc.returncode}:\n{Path(log.name).read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"mtlora-serve did not come up:\n{Path(log.name).read_text()}"
            time.sleep(0.2)
        yield proc, url, Path(log.name)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
        os.unlink(log.name)


def _common(model_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--served-model-name", "tiny", "--device", "cpu", "--dtype", "float32",
            "--kv-cache-memory", "64MiB", "--log-level", "info"]


def test_engine_failing_every_forward_exits_with_status_3(tiny_model_dir):
    with _serving(_common(tiny_model_dir), env={"MTLORA_TEST_FAULTS": "forward"}) as (proc, url, log):
        for _ in range(3):             # engine.MAX_CONSECUTIVE_FAILED_STEPS: each request fails alone first
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
            assert r.status_code == 500, r.text
            assert "model forward" in r.json()["error"]["message"]
        assert proc.wait(timeout=60) == EXIT_ENGINE_DIED, log.read_text()[-3000:]
        assert "the engine is dead" in log.read_text()


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """The tiny model with an 8k context, so that LONG requests cannot finish within the drain deadline."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-8k"), max_position_embeddings=8192)


async def _stream(client, url, body, started: asyncio.Event) -> tuple[int, list[str]]:
    """(status, every `data:` payload) of one streamed completion; `started` is set at its first payload."""
    events: list[str] = []
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()
    return r.status_code, events


async def _metric(client, url, name) -> float:
    text = (await client.get(url + "/metrics")).text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


async def _until(predicate, what: str, timeout: float = 120.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _drain_probe(client, url) -> tuple[httpx.Response, httpx.Response]:
    """New requests after SIGTERM: the first answered 503 (earlier ones may still have been admitted), and /health
    right after it."""
    async def refused():
        r = await client.post(url + "/v1/completions", json={"prompt": "new", "max_tokens": 1})
        return r if r.status_code == 503 else None

    for _ in range(200):
        r = await refused()
        if r is not None:
            return r, await client.get(url + "/health")
        await asyncio.sleep(0.05)
    raise AssertionError("no new request was refused with 503 during the drain")


async def _sigterm_with_32_streams(proc, url):
    base = {"prompt": "tell me a long story", "temperature": 0.8, "ignore_eos": True}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=180, limits=limits) as client:
        whole = asyncio.create_task(client.post(url + "/v1/completions", json={**base, "max_tokens": LONG}))
        await _until(lambda: _metric_at_least(client, url, 1), "the non-streaming request to run")
        kinds = [SHORT if i % 2 else LONG for i in range(32)]
        started = [asyncio.Event() for _ in kinds]
        streams = [asyncio.create_task(_stream(client, url, {**base, "max_tokens": n}, ev))
                   for n, ev in zip(kinds, started)]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 120)
        proc.send_signal(signal.SIGTERM)
        refused, health = await _drain_probe(client, url)
        results = await asyncio.gather(*streams)
        whole = await whole
    return kinds, results, whole, refused, health


async def _metric_at_least(client, url, n) -> bool:
    return await _metric(client, url, "mtlora:num_requests_running") >= n


async def test_sigterm_drains_32_streams_then_exits_0(long_model_dir):
    args = _common(long_model_dir) + ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]
    with _serving(args) as (proc, url, log):
        kinds, results, whole, refused, health = await _sigterm_with_32_streams(proc, url)
        code = await asyncio.to_thread(proc.wait, SHUTDOWN_TIMEOUT + 60)
        text = log.read_text()
    assert code == 0, text[-3000:]
    for n, (status, events) in zip(kinds, results):
        assert status == 200 and events[-1] == "[DONE]", events[-3:]
        final = json.loads(events[-2])["choices"][0]
        assert final["finish_reason"] == ("length" if n == SHORT else "abort"), (n, final)
        assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])
    assert whole.status_code == 200 and whole.json()["choices"][0]["finish_reason"] == "abort", whole.text
    assert refused.json()["error"]["type"] == "ServiceUnavailableError", refused.text
    assert "shutting down" in refused.json()["error"]["message"]
    assert health.status_code == 503 and "shutting down" in health.json()["error"]["message"]
    assert "aborted 17 request(s) still running" in text                 # 16 LONG streams + the JSON one
