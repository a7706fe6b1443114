"""`mtlora-bench`: load generators. `http` drives a running OpenAI-compatible server; `engine` (lazy) runs
`mtlora_server.bench_engine:main` in-process when the server package provides it; `adapters` (lazy) runs
`mtlora_server.bench_adapters:main` (many registered adapters through a few device slots); `profile` (lazy) runs
`mtlora_server.bench_profile:main` (one decode step under torch.profiler, GEMM share); `ops` (lazy) runs
`mtlora_server.bench_ops:main` (one decode step's adapter work alone, stacked vs per-slot).

`mtlora-bench http` contract: N `/v1/completions` requests (models taken round-robin from --model), at most C in
flight, a synthetic prompt of about L words, M new tokens each (`ignore_eos` asked for, so servers that honour it
generate exactly M). Reports JSON: req/s, output tokens/s, latency p50/p90/p99 and, with --stream, time to first
token and inter-token latency; failed requests are counted (never retried: retries would hide overload). A stream
fails when it carries an in-band error event or ends without `data: [DONE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from .http import server_root

log = logging.getLogger(__name__)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]) of unsorted values; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float | None]:
    return {"mean": sum(values) / len(values) if values else None,
            **{f"p{q}": percentile(values, q) for q in (50, 90, 99)}}


@dataclass
class Sample:
    """One request's measurements (seconds)."""

    model: str
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks carrying text
    output_tokens: int = 0
    error: str | None = None


def make_prompt(words: int, i: int) -> str:
    """About `words` tokens of varied text; the request number leads so prefix caches cannot share it whole."""
    vocab = "the model serves many adapters in one batch while the router picks experts per token".split()
    return f"{i} " + " ".join(vocab[(i + k) % len(vocab)] for k in range(max(0, words - 1)))


def _payload(args, model: str, i: int) -> dict[str, Any]:
    p = {"model": model, "prompt": make_prompt(args.prompt_len, i), "max_tokens": args.max_tokens,
         "temperature": 0.0, "ignore_eos": True}
    if args.stream:
        p.update(stream=True, stream_options={"include_usage": True})
    if args.extra_body:                 # e.g. a structured-output constraint, which ends outputs itself (no ignore_eos)
        p.pop("ignore_eos")
        p.update(json.loads(args.extra_body))
    return p


async def _one_plain(http: httpx.AsyncClient, payload: dict, s: Sample, t0: float) -> None:
    resp = await http.post("/v1/completions", json=payload)
    s.latency = time.perf_counter() - t0
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
    body = resp.json()
    usage = body.get("usage") or {}
    s.output_tokens = int(usage.get("completion_tokens", 0))
    if not isinstance(body.get("choices"), list):
        raise RuntimeError(f"malformed reply: {str(body)[:200]}")


async def _one_stream(http: httpx.AsyncClient, payload: dict, s: Sample, t0: float) -> None:
    chunks, last, done = 0, None, False
    async with http.stream("POST", "/v1/completions", json=payload) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if isinstance(event, dict) and event.get("error"):   # the server failed mid-stream and said so in-band
                raise RuntimeError(f"error event: {str(event['error'])[:200]}")
            if event.get("usage"):
                s.output_tokens = int(event["usage"].get("completion_tokens", 0))
            if any(c.get("text") for c in event.get("choices") or []):
                now = time.perf_counter()
                if last is None:
                    s.ttft = now - t0
                else:
                    s.itl.append(now - last)
                last, chunks = now, chunks + 1
    if not done:
        raise RuntimeError("stream ended without data: [DONE] (truncated answer)")
    s.latency = time.perf_counter() - t0
    s.output_tokens = s.output_tokens or chunks  # without usage, one chunk per token is the best guess


async def run_http(args, transport: httpx.AsyncBaseTransport | None = None) -> dict[str, Any]:
    """Send the requests and return the JSON report."""
    models = [m for m in args.model.split(",") if m]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    samples: list[Sample] = []
    bar = tqdm(total=args.requests, desc="bench", unit="req", disable=args.quiet)

    async def worker(http):
        while not queue.empty():
            i = queue.get_nowait()
            model = models[i % len(models)]
            s, t0 = Sample(model, ok=True), time.perf_counter()
            try:
                await (_one_stream if args.stream else _one_plain)(http, _payload(args, model, i), s, t0)
            except (httpx.HTTPError, RuntimeError, ValueError) as e:
                s.ok, s.error, s.latency = False, f"{type(e).__name__}: {e}", time.perf_counter() - t0
            samples.append(s)
            bar.update(1)

    t_start = time.perf_counter()
    try:
        async with httpx.AsyncClient(base_url=server_root(args.base_url), headers=headers, timeout=args.timeout,
                                     transport=transport, limits=httpx.Limits(max_connections=None)) as http:
            await asyncio.gather(*(worker(http) for _ in range(max(1, args.concurrency))))
    finally:
        bar.close()
    return _report(args, models, samples, time.perf_counter() - t_start)


def _report(args, models: list[str], samples: list[Sample], wall: float) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    tokens = sum(s.output_tokens for s in ok)
    out = {"base_url": args.base_url, "models": models, "requests": args.requests, "concurrency": args.concurrency,
           "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "stream": args.stream,
           "completed": len(ok), "errors": len(samples) - len(ok), "wall_s": wall,
           "requests_per_s": len(ok) / wall if wall > 0 else None,
           "output_tokens": tokens, "output_tokens_per_s": tokens / wall if wall > 0 else None,
           "latency_s": summary([s.latency for s in ok]),
           "per_model": {m: {"completed": sum(1 for s in ok if s.model == m),
                             "errors": sum(1 for s in samples if not s.ok and s.model == m)} for m in models},
           "error_examples": sorted({s.error for s in samples if s.error})[:10]}
    if args.stream:
        out["ttft_s"] = summary([s.ttft for s in ok if s.ttft is not None])
        out["itl_s"] = summary([g for s in ok for g in s.itl])
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtlora-bench", description="Load generators for mtlora-serve.")
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("http", help="drive a running OpenAI-compatible server over HTTP")
    h.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 "
                   "(a trailing /v1 is accepted)")
    h.add_argument("--model", required=True, help="model/adapter names, comma-separated; used round-robin")
    h.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    h.add_argument("--requests", type=int, default=100, help="total requests to send")
    h.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    h.add_argument("--prompt-len", type=int, default=128, help="prompt length in words (about tokens)")
    h.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    h.add_argument("--stream", action="store_true", help="stream (SSE) to measure TTFT and inter-token latency")
    h.add_argument("--timeout", type=float, default=300.0, help="seconds per request before it counts as an error")
    h.add_argument("--extra-body", default=None, metavar="JSON",
                   help="JSON object merged into every request, e.g. '{\"guided_json\": {...}}' to measure "
                        "structured outputs (ignore_eos is then not sent)")
    h.add_argument("--output", default=None, help="also write the JSON report to this file")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("engine", help="in-process engine benchmark (mtlora_server.bench_engine); its own flags follow",
                   add_help=False)
    sub.add_parser("adapters", help="in-process benchmark of many registered adapters through a few slots "
                   "(mtlora_server.bench_adapters); its own flags follow", add_help=False)
    sub.add_parser("gpu", help="CUDA proof + 7B-shaped numbers in one run (mtlora_server.bench_gpu; --dry-run: "
                   "CPU + Triton interpreter); its own flags follow", add_help=False)
    sub.add_parser("profile", help="where one engine decode step spends its time, GEMM share stated "
                   "(mtlora_server.bench_profile); its own flags follow", add_help=False)
    sub.add_parser("paired", help="what the adapters cost, in one process: the engine row workload alternating "
                   "adapted and bare base runs (mtlora_server.bench_paired); its own flags follow", add_help=False)
    sub.add_parser("ops", help="the adapter work of one decode step alone, stacked vs per-slot "
                   "(mtlora_server.bench_ops); its own flags follow", add_help=False)
    sub.add_parser("train", help="training step time, mtlora vs hydralora vs lora (mtlora_train.bench); its own "
                   "flags follow", add_help=False)
    return p


def _check_args(args: argparse.Namespace) -> str | None:
    """The first `http` flag out of range, as a message naming it; None when all are fine."""
    for flag in ("requests", "concurrency", "max_tokens", "prompt_len", "timeout"):
        value = getattr(args, flag)
        if not value > 0:
            return f"--{flag.replace('_', '-')} must be positive, got {value}"
    if not [m for m in args.model.split(",") if m]:
        return f"--model names no model: {args.model!r}"
    if args.extra_body is not None:
        try:
            if not isinstance(json.loads(args.extra_body), dict):
                return "--extra-body must be a JSON object"
        except ValueError as exc:
            return f"--extra-body is not valid JSON: {exc}"
    return None


# In-process benchmarks that need torch: subcommand -> (module, install hint). Imported only when asked, since
# `http` must not import torch.
IN_PROCESS = {"engine": ("mtlora_server.bench_engine", "pip install -e '.[serve]'"),
              "adapters": ("mtlora_server.bench_adapters", "pip install -e '.[serve]'"),
              "gpu": ("mtlora_server.bench_gpu", "pip install -e '.[serve]'"),
              "train": ("mtlora_train.bench", "pip install -e '.[train]'"),
              "profile": ("mtlora_server.bench_profile", "pip install -e '.[serve]'"),
              "ops": ("mtlora_server.bench_ops", "pip install -e '.[serve]'"),
              "paired": ("mtlora_server.bench_paired", "pip install -e '.[serve]'")}


def run_in_process(name: str, argv: list[str]) -> int:
    module, hint = IN_PROCESS[name]
    try:
        bench_main = importlib.import_module(module).main
    except (ImportError, AttributeError) as e:
        print(f"mtlora-bench {name}: cannot import {module}:main ({e}). Install it ({hint}) or use "
              "`mtlora-bench http`.", file=sys.stderr)
        return 2
    return int(bench_main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in IN_PROCESS:
        return run_in_process(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    problem = _check_args(args)
    if problem:
        print(f"mtlora-bench http: {problem}", file=sys.stderr)
        return 2
    result = asyncio.run(run_http(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
