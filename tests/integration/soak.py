"""Bounded soak test of mtlora-serve over loopback: many mixed-adapter requests with random client disconnects.

    python tests/integration/soak.py                         # starts its own server on a tiny random model
    python tests/integration/soak.py --url http://127.0.0.1:8000 --requests 2000

Contract: sends `--requests` (>= 1,000 by default) completions/chat requests, streamed and not, spread over the
base model and every served adapter, `--concurrency` at a time; about `--disconnect-fraction` of them are dropped
by the client mid-flight (stream closed after a chunk, or the request cancelled). Then it requires: no 5xx and no
unexpected status, the KV pool back to empty and no running/waiting requests (read from /metrics), and the server
still answering. Exits 0 on success, 1 with a reason otherwise. Only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
from tqdm import tqdm

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def metric_values(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def make_body(rng: random.Random, models: list[str]) -> tuple[str, dict]:
    model = rng.choice(models)
    common = {"model": model, "max_tokens": rng.randint(1, 16), "temperature": rng.choice([0.0, 0.7, 1.0]),
              "stream": rng.random() < 0.5, "n": rng.choice([1, 1, 1, 2]), "seed": rng.randint(0, 1000)}
    if rng.random() < 0.5:
        body = {**common, "prompt": rng.choice(["hello", "the soak", "a b c d e f", "x" * rng.randint(1, 40)])}
        if rng.random() < 0.3:
            body["logprobs"] = rng.randint(0, 3)
        return "/v1/completions", body
    body = {**common, "messages": [{"role": "user", "content": rng.choice(["hi", "tell me more", "?" * 10])}]}
    if rng.random() < 0.3:
        body.update(logprobs=True, top_logprobs=rng.randint(0, 3))
    return "/v1/chat/completions", body


async def one_request(client: httpx.AsyncClient, path: str, body: dict, disconnect: bool,
                      rng: random.Random) -> str:
    """Outcome label: the status code, or 'dropped' when the client gave up on purpose."""
    if body["stream"]:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return str(r.status_code)
            chunks = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    if disconnect and chunks >= rng.randint(1, 3):
                        return "dropped"        # leaving the block closes the connection mid-stream
                    if line == "data: [DONE]":
                        return "200"
            return "200-no-done"
    task = asyncio.ensure_future(client.post(path, json=body))
    if disconnect:
        await asyncio.sleep(rng.uniform(0.0, 0.05))
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return "dropped"
    r = await task
    return str(r.status_code)


async def soak(url: str, requests: int, concurrency: int, disconnect_fraction: float, seed: int,
               settle_s: float = 60.0) -> list[str]:
    """Run the soak; returns the list of problems (empty: success)."""
    rng = random.Random(seed)
    problems: list[str] = []
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        models = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        outcomes: Counter = Counter()
        sem = asyncio.Semaphore(concurrency)
        bar = tqdm(total=requests, desc="soak", unit="req")

        async def worker(i: int):
            path, body = make_body(rng, models)
            async with sem:
                try:
                    outcome = await one_request(client, path, body, rng.random() < disconnect_fraction, rng)
                except httpx.HTTPError as exc:
                    outcome = f"transport-error:{type(exc).__name__}"
            outcomes[outcome] += 1
            bar.update()
        await asyncio.gather(*(worker(i) for i in range(requests)))
        bar.close()
        print(f"outcomes over {len(models)} models: {dict(outcomes)}")
        bad = {k: v for k, v in outcomes.items() if k not in ("200", "dropped")}
        if bad:
            problems.append(f"unexpected outcomes: {bad}")
        problems += await check_settled(client, settle_s)
        values = metric_values((await client.get("/metrics")).text)
        aborted = sum(v for k, v in values.items() if k.startswith("mtlora:requests_total{")
                      and 'finish_reason="abort"' in k)
        print(f"sequences aborted server-side: {aborted:.0f}")
        if outcomes["dropped"] >= 50 and aborted == 0:
            problems.append("no client disconnect ever reached the engine as an abort")
    return problems


async def check_settled(client: httpx.AsyncClient, settle_s: float) -> list[str]:
    """The KV pool must drain to empty and the server must still answer."""
    deadline = time.monotonic() + settle_s
    while True:
        values = metric_values((await client.get("/metrics")).text)
        busy = (values.get("mtlora:kv_blocks_used", -1), values.get("mtlora:num_requests_running", -1),
                values.get("mtlora:num_requests_waiting", -1))
        if busy == (0.0, 0.0, 0.0):
            break
        if time.monotonic() > deadline:
            return [f"engine did not drain: kv_blocks_used, running, waiting = {busy}"]
        await asyncio.sleep(0.2)
    print(f"drained: kv_blocks_used=0 of {values.get('mtlora:kv_blocks_total')}")
    r = await client.post("/v1/completions", json={"prompt": "still there?", "max_tokens": 2})
    if r.status_code != 200 or (await client.get("/health")).status_code != 200:
        return [f"server no longer answers after the soak: {r.status_code} {r.text[:200]}"]
    return []


def _own_server_args(workdir: Path) -> list[str]:
    """A tiny random model and two adapters, so the soak needs nothing but this repository."""
    sys.path.insert(0, str(Path(__file__).parent))
    from serve_helpers import MTLORA_CFG, write_adapter

    from mtlora.testing import make_tiny_model_dir

    model = make_tiny_model_dir(workdir / "model")
    moe = write_adapter(workdir / "moe", model, seed=1, **MTLORA_CFG)
    lora = write_adapter(workdir / "lora", model, seed=2, method="lora", rank=4, target_modules=["q_proj", "v_proj"])
    return ["--model", str(model), "--adapter", str(moe), "--adapter", str(lora), "--device", "cpu",
            "--dtype", "float32", "--kv-cache-memory", "4MiB", "--max-num-seqs", "32", "--log-level", "warning"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="A running server (loopback only); default: start one.")
    p.add_argument("--requests", type=int, default=1000, help="Number of requests to send.")
    p.add_argument("--concurrency", type=int, default=16, help="Requests in flight at once.")
    p.add_argument("--disconnect-fraction", type=float, default=0.2, help="Share of requests the client drops.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the request mix.")
    args = p.parse_args(argv)

    async def run(url: str) -> list[str]:
        return await soak(url, args.requests, args.concurrency, args.disconnect_fraction, args.seed)

    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            p.error(f"--url {args.url}: only loopback servers may be soaked")
        problems = asyncio.run(run(args.url.rstrip("/")))
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from serve_helpers import serve_process

        with tempfile.TemporaryDirectory() as tmp, serve_process(_own_server_args(Path(tmp))) as url:
            problems = asyncio.run(run(url))
    for problem in problems:
        print(f"SOAK FAILED: {problem}", file=sys.stderr)
    if not problems:
        print("soak passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
