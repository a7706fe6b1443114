"""`mtlora-bench`: percentiles, the http load generator against a mock server (plain, stream, errors), and the
lazy `engine` slot."""

from __future__ import annotations

import json
from argparse import Namespace

import httpx
import pytest

from mtlora_clients import bench


def test_percentile_interpolates():
    assert bench.percentile([], 50) is None
    assert bench.percentile([3.0], 99) == 3.0
    assert bench.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert bench.percentile(list(map(float, range(101))), 90) == pytest.approx(90.0)


def _args(**kw):
    base = dict(base_url="http://x", model="a,b", api_key=None, requests=10, concurrency=3, prompt_len=5,
                max_tokens=4, stream=False, timeout=5.0, output=None, quiet=True, extra_body=None)
    return Namespace(**{**base, **kw})


def _handler(seen, fail_every=0):
    def handler(request):
        body = json.loads(request.content)
        seen.append(body)
        n = int(body["prompt"].split()[0])  # make_prompt puts the request number first
        if fail_every and n % fail_every == 0:
            return httpx.Response(500, json={"error": {"message": "boom"}})
        usage = {"prompt_tokens": 5, "completion_tokens": body["max_tokens"], "total_tokens": 9}
        if not body.get("stream"):
            return httpx.Response(200, json={"choices": [{"text": "x" * body["max_tokens"]}], "usage": usage})
        events = [{"choices": [{"text": "x", "index": 0}]} for _ in range(body["max_tokens"])]
        events.append({"choices": [], "usage": usage})
        sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})

    return handler


async def test_http_plain_counts_and_round_robin():
    seen: list[dict] = []
    out = await bench.run_http(_args(), transport=httpx.MockTransport(_handler(seen)))
    assert out["completed"] == 10 and out["errors"] == 0 and out["output_tokens"] == 40
    assert [b["model"] for b in sorted(seen, key=lambda b: int(b["prompt"].split()[0]))][:4] == ["a", "b", "a", "b"]
    assert len(seen[0]["prompt"].split()) == 5 and seen[0]["max_tokens"] == 4
    assert out["per_model"] == {"a": {"completed": 5, "errors": 0}, "b": {"completed": 5, "errors": 0}}
    lat = out["latency_s"]
    assert lat["p50"] <= lat["p90"] <= lat["p99"] and out["requests_per_s"] > 0
    assert "ttft_s" not in out


async def test_http_stream_measures_ttft_and_itl():
    seen: list[dict] = []
    out = await bench.run_http(_args(stream=True, requests=4), transport=httpx.MockTransport(_handler(seen)))
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in seen)
    assert out["completed"] == 4 and out["output_tokens"] == 16
    assert out["ttft_s"]["p50"] is not None and out["itl_s"]["mean"] is not None


async def test_http_errors_are_counted_not_hidden():
    seen: list[dict] = []
    out = await bench.run_http(_args(requests=9), transport=httpx.MockTransport(_handler(seen, fail_every=3)))
    assert out["errors"] == 3 and out["completed"] == 6 and len(seen) == 9  # no retries in a load test
    assert any("HTTP 500" in e for e in out["error_examples"])


def _sse_handler(body_text: str):
    def handler(request):
        return httpx.Response(200, content=body_text.encode(), headers={"content-type": "text/event-stream"})
    return handler


@pytest.mark.parametrize("body_text,needle", [
    # the server died mid-stream and said so in-band (mtlora-serve's error event), then ended the stream
    ('data: {"choices": [{"text": "x", "index": 0}]}\n\n'
     'data: {"error": {"message": "engine died", "type": "server_error"}}\n\ndata: [DONE]\n\n', "engine died"),
    # the connection ended before [DONE]: a truncated answer, not a completed request
    ('data: {"choices": [{"text": "x", "index": 0}]}\n\n', "[DONE]"),
])
async def test_http_stream_failures_are_errors(body_text, needle):
    out = await bench.run_http(_args(stream=True, requests=2), transport=httpx.MockTransport(_sse_handler(body_text)))
    assert out["errors"] == 2 and out["completed"] == 0
    assert any(needle in e for e in out["error_examples"])


async def test_http_extra_body_is_merged_into_every_request():
    seen: list[dict] = []
    body = '{"guided_choice": ["yes", "no"], "temperature": 0.5}'
    await bench.run_http(_args(requests=3, extra_body=body), transport=httpx.MockTransport(_handler(seen)))
    assert all(b["guided_choice"] == ["yes", "no"] and b["temperature"] == 0.5 and "ignore_eos" not in b
               for b in seen) and len(seen) == 3


@pytest.mark.parametrize("value", ["[1]", "{not json"])
def test_http_extra_body_must_be_a_json_object(capsys, value):
    assert bench.main(["http", "--base-url", "http://x", "--model", "m", "--extra-body", value]) == 2
    assert "--extra-body" in capsys.readouterr().err


def test_http_needs_a_model_name(capsys):
    assert bench.main(["http", "--base-url", "http://x", "--model", ","]) == 2
    assert "--model" in capsys.readouterr().err


def test_http_timeout_must_be_positive(capsys):
    assert bench.main(["http", "--base-url", "http://x", "--model", "m", "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().err


def test_engine_slot_without_server_bench_exits_clearly(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "mtlora_server.bench_engine", None)  # as if not written yet
    assert bench.main(["engine", "--whatever"]) == 2
    assert "cannot import mtlora_server.bench_engine:main" in capsys.readouterr().err


def test_bench_help_lists_both_subcommands():
    text = bench.build_parser().format_help()
    assert "http" in text and "engine" in text


def test_engine_slot_delegates_remaining_argv(monkeypatch):
    import sys
    import types

    got = {}
    fake = types.ModuleType("mtlora_server.bench_engine")
    fake.main = lambda argv: got.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "mtlora_server.bench_engine", fake)
    assert bench.main(["engine", "--steps", "3"]) == 0
    assert got["argv"] == ["--steps", "3"]


def test_engine_bench_runs_every_row_on_a_tiny_model(tmp_path, capsys):
    """`mtlora-bench engine` end to end on a tiny model (hidden 96, so g=3 routing groups divide it): every row
    generates every token, `auto` resolves to one dtype for all rows, and the JSON holds the ratios."""
    import json

    import torch

    from mtlora.testing import make_tiny_model_dir
    from mtlora_server import bench_engine
    from mtlora_server.engine.core import resolve_dtype

    model_dir = make_tiny_model_dir(tmp_path / "m", hidden_size=96, head_dim=24, intermediate_size=160)
    out = tmp_path / "bench.json"
    assert bench_engine.main(["--model", str(model_dir), "--dtype", "auto", "--num-prompts", "4",
                              "--input-len", "20", "--output-len", "3", "--repeats", "2", "--output", str(out),
                              "--vllm-python", str(tmp_path / "no-vllm"),   # vLLM rows: test_bench_peers.py
                              "--no-interleave"]) == 0       # interleaved engine rows: test_bench_peers.py too
    report = json.loads(out.read_text())
    assert report["interleaved"] is False
    want = "bfloat16" if resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16 else "float32"
    assert report["dtype"] == want
    assert set(report["results"]) == set(bench_engine.ROWS)
    ran = {name: r for name, r in report["results"].items() if not name.startswith("vllm_")}
    assert all("not_run" in r for name, r in report["results"].items() if name not in ran)
    assert all(r["output_tokens"] == 4 * 3 for r in ran.values())
    assert all(len(r["runs_seconds"]) == 2 for r in ran.values()) and report["repeats"] == 2
    engine_rows = [r for name, r in ran.items() if name.startswith("engine_")]
    assert [r["prefix_cache_hits_all_runs"] for r in engine_rows] == [0, 0, 0, 0]   # every run did its own prefill
    assert set(report["ratios"]) >= {"engine_base/hf_base", "engine_mix4/engine_base"}
    assert "engine_mix4/engine_base" in capsys.readouterr().out


@pytest.mark.parametrize("seconds, want", [([3.0], 3.0), ([5.0, 1.0, 3.0], 3.0), ([4.0, 2.0], 2.0),
                                           ([9.0, 1.0, 2.0, 8.0], 2.0), ([7.0, 7.0, 1.0], 7.0)])
def test_engine_bench_reports_each_rows_median_run(seconds, want):
    from mtlora_server.bench_engine import summarize

    row = summarize([{"seconds": s, "output_tokens": 100, "steps": i} for i, s in enumerate(seconds)])
    assert row["seconds"] == want and row["tokens_per_s"] == 100 / want
    assert row["runs_seconds"] == seconds                         # every run, in the order they ran
    assert row["steps"] == seconds.index(want)                    # the median run's own figures


def test_engine_rows_rotate_so_each_runs_in_every_position():
    from mtlora_server.bench_engine import rotated

    rows = ["engine_base", "engine_mix4", "engine_lora4"]
    rounds = [rotated(rows, k) for k in range(6)]
    assert rounds[0] == rows and rounds[1] == ["engine_mix4", "engine_lora4", "engine_base"]
    for pos in range(3):                                       # over 3k rounds each row sits in each place k times
        assert sorted(r[pos] for r in rounds) == sorted(rows * 2)
    assert rotated([], 3) == []


@pytest.mark.parametrize("copies, model_gb, available_gb, want", [
    (4, 0.3, 24, True),              # the default model's rows on a 24 GiB machine
    (4, 14, 24, False),              # a 7B checkpoint: four copies do not fit
    (1, 10, 22, True), (1, 11, 22, False),   # copies x (model + 1 GiB KV) against half the available memory
    (3, 0.3, None, False),           # available memory unknown: one engine
])
def test_engine_rows_interleave_only_when_their_copies_fit(copies, model_gb, available_gb, want):
    from mtlora_server.bench_engine import interleave_fits

    gib = 1 << 30
    avail = None if available_gb is None else int(available_gb * gib)
    assert interleave_fits(copies, int(model_gb * gib), gib, avail) is want


@pytest.mark.parametrize("flag, rows, memory, want", [
    (None, "engine_base,engine_mix4", 64 << 30, True), (None, "engine_base,engine_mix4", 1 << 30, False),
    (True, "engine_base,engine_mix4", 1 << 30, True), (False, "engine_base,engine_mix4", 64 << 30, False),
    (None, "hf_base", 64 << 30, False), (True, "hf_base", 64 << 30, False),   # no engine rows: nothing to step
])
def test_interleave_default_and_flags(tmp_path, monkeypatch, flag, rows, memory, want):
    import argparse

    from mtlora_server import bench_engine

    (tmp_path / "model.safetensors").write_bytes(b"0" * 1000)
    monkeypatch.setattr(bench_engine, "_available_memory", lambda: memory)
    args = argparse.Namespace(interleave=flag)
    assert bench_engine.decide_interleave(args, tmp_path, rows.split(",")) is want
    assert bench_engine.build_parser().parse_args(["--no-interleave"]).interleave is False
