"""Hostile input against a real `mtlora-serve` process on the tiny model (default flags, plus adapter loading under
a temporary --adapter-root): every case of tests/hostile_cases.py answers its 4xx in OpenAI's error schema naming
the field, /health answers 200 after every case (no engine death), the requests that once killed the engine are
served, nothing outside the adapter root is loaded, and a normal request is still served at the end. Each test
loops over its cases and reports every failing one at once; /metrics must never count a 5xx."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hostile_cases import CASES, SURVIVABLE, Case, adapter_cases, check_error, leaked_paths
from serve_helpers import MTLORA_CFG, serve_process, write_adapter

FLAGS = ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "8MiB", "--log-level", "warning"]


@dataclass
class Server:
    client: httpx.Client
    adapter_cases: list[Case]
    root: Path
    outside: Path


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-root")
    outside = tmp_path_factory.mktemp("outside")
    adapter = write_adapter(tmp_path_factory.mktemp("src") / "moe", tiny_model_dir, **MTLORA_CFG)
    cases = adapter_cases(root, outside / "moe", adapter_src=adapter)   # the links point at a loadable adapter
    (root / "inside").mkdir()
    for f in adapter.iterdir():
        (root / "inside" / f.name).write_bytes(f.read_bytes())
    args = ["--model", str(tiny_model_dir), "--enable-adapter-loading", "--adapter-root", str(root), *FLAGS]
    with serve_process(args) as url, httpx.Client(base_url=url, timeout=300.0) as client:
        yield Server(client, cases, root, outside)


def _send(client: httpx.Client, case: Case) -> httpx.Response:
    return client.post(case.path, content=case.content(), headers={"content-type": "application/json"})


def _after_case(client: httpx.Client) -> list[str]:
    health = client.get("/health")
    return [] if health.status_code == 200 else [f"/health answered {health.status_code}: {health.text[:200]}"]


def _still_serving(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 3})
    assert chat.status_code == 200, chat.text
    errors = re.findall(r'mtlora:request_errors_total\{code="(5\d\d)"\} ([0-9.]+)', client.get("/metrics").text)
    assert errors == [], f"the server answered 5xx: {errors}"


def test_every_hostile_request_is_a_client_error(server):
    failures = {}
    for case in CASES:
        r = _send(server.client, case)
        problems = check_error(r.status_code, r.headers, r.text, case) + _after_case(server.client)
        if problems:
            failures[case.id] = problems
    _still_serving(server.client)
    assert failures == {}, f"{len(failures)} of {len(CASES)} cases failed"


def test_requests_that_once_killed_the_engine_are_served(server):
    failures = {}
    for i, (path, body) in enumerate(SURVIVABLE):
        r = server.client.post(path, json=body)
        problems = ([] if r.status_code == 200 else [f"{r.status_code}: {r.text[:200]}"]) + _after_case(server.client)
        if problems:
            failures[f"{i}: {body}"] = problems
    _still_serving(server.client)
    assert failures == {}


def test_adapter_routes_refuse_escapes_and_keep_paths_private(server):
    failures = {}
    for case in server.adapter_cases:
        r = _send(server.client, case)
        problems = check_error(r.status_code, r.headers, r.text, case) + _after_case(server.client)
        problems += [f"shows {p}" for p in leaked_paths(r.text, server.root, server.outside)]
        if problems:
            failures[case.id] = problems
    models = [m["id"] for m in server.client.get("/v1/models").json()["data"]]
    assert len(models) == 1, f"an adapter from outside the root was loaded: {models}"
    load = server.client.post("/v1/load_lora_adapter", json={"lora_name": "inside", "lora_path": "inside"})
    assert load.status_code == 200, load.text          # a real adapter inside the root still loads
    served = server.client.post("/v1/completions", json={"model": "inside", "prompt": "hi", "max_tokens": 2})
    assert served.status_code == 200, served.text
    assert server.client.post("/v1/unload_lora_adapter", json={"lora_name": "inside"}).status_code == 200
    _still_serving(server.client)
    assert failures == {}


def test_symlinked_config_is_named_relative_to_the_root(server):
    r = server.client.post("/v1/load_lora_adapter", json={"lora_name": "sneaky",
                                                          "lora_path": "link-adapter_config"})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("link-adapter_config/adapter_config.json links outside")
    garbage = server.client.post("/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": "garbage"})
    assert garbage.status_code == 400 and "garbage/adapter_config.json" in garbage.text
    assert leaked_paths(r.text + garbage.text, server.root, server.outside) == []
