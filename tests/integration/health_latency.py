"""/health latency while one huge request is being handled (docs/benchmarks.md, "API event loop").

    python tests/integration/health_latency.py --url http://127.0.0.1:8000 --mb 10 --rounds 5
    python tests/integration/health_latency.py --model-dir DIR --mb 10     # starts its own server (limit raised)

Contract: per round and per route (/v1/completions with max_tokens 1, /tokenize) one thread polls /health back to
back (`--interval` apart) while the main thread sends ONE request whose prompt is `--mb` MB of random words; the
poller stops when that request is answered. A round reports the big request's status and seconds and the /health
latencies seen meanwhile (count, p50, p99, max, non-200 answers); the summary is the median over rounds of each
statistic. `poll_health_during(url, send)` is the measuring core, shared with the integration test. Only loopback
URLs are accepted. Timing numbers belong in this report, never in test assertions.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ROUTES = ("/v1/completions", "/tokenize")


def random_words(nbytes: int, seed: int = 0) -> str:
    """About `nbytes` UTF-8 bytes of random words (ASCII, accents, CJK, digits, newlines)."""
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Question:", "answer", "12345",
             "multi-task", "low-rank", "adaptation", "é", "日本語", "\n"]
    out, size = [], 0
    while size < nbytes:
        word = rng.choice(words)
        out.append(word)
        size += len(word.encode()) + 1
    return " ".join(out)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


@dataclass
class Round:
    route: str
    status: int
    seconds: float
    health_ms: list[float] = field(default_factory=list)
    health_failures: int = 0          # non-200 answers and transport errors

    def stats(self) -> dict:
        h = self.health_ms or [float("nan")]
        return {"route": self.route, "status": self.status, "seconds": round(self.seconds, 2),
                "polls": len(self.health_ms), "p50_ms": round(percentile(h, 50), 1),
                "p99_ms": round(percentile(h, 99), 1), "max_ms": round(max(h), 1),
                "health_failures": self.health_failures}


def poll_health_during(url: str, route: str, send: Callable[[], httpx.Response], interval: float = 0.01) -> Round:
    """Poll `url`/health from a thread while `send()` runs on this one; the round's statuses and latencies."""
    done = threading.Event()
    result = Round(route, 0, 0.0)

    def poll() -> None:
        with httpx.Client(timeout=120.0) as client:
            while not done.is_set():
                t = time.perf_counter()
                try:
                    ok = client.get(url + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                result.health_ms.append((time.perf_counter() - t) * 1000)
                result.health_failures += not ok
                done.wait(interval)

    poller = threading.Thread(target=poll, name="health-poller")
    poller.start()
    time.sleep(0.2)                        # the poller is warm (connection open) before the big request starts
    t0 = time.perf_counter()
    try:
        response = send()
        result.status = response.status_code
    finally:
        result.seconds = time.perf_counter() - t0
        done.set()
        poller.join()
    return result


def big_request(url: str, route: str, text: str, timeout: float = 600.0) -> Callable[[], httpx.Response]:
    body = {"prompt": text, "max_tokens": 1} if route == "/v1/completions" else {"prompt": text}
    payload = json.dumps(body).encode()    # encoded once, before the clock starts

    def send() -> httpx.Response:
        return httpx.post(url + route, content=payload, headers={"content-type": "application/json"},
                          timeout=timeout)
    return send


def summarize(rounds: list[Round]) -> dict:
    out = {}
    for route in sorted({r.route for r in rounds}):
        stats = [r.stats() for r in rounds if r.route == route]
        out[route] = {key: statistics.median(s[key] for s in stats)
                      for key in ("seconds", "polls", "p50_ms", "p99_ms", "max_ms", "health_failures")}
        out[route]["statuses"] = sorted({s["status"] for s in stats})
    return out


def run(url: str, mb: float, rounds: int, interval: float, routes: list[str]) -> dict:
    text = random_words(int(mb * 10**6))
    done = []
    for i in range(rounds):
        for route in routes:
            r = poll_health_during(url, route, big_request(url, route, text), interval)
            done.append(r)
            print(json.dumps({"round": i, **r.stats()}), flush=True)
    return {"mb": mb, "rounds": rounds, "every_round": [r.stats() for r in done], "median": summarize(done)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (loopback only); else one is started")
    p.add_argument("--model-dir", default=None, help="model for the server this script starts (default: a tiny "
                   "random model)")
    p.add_argument("--mb", type=float, default=10.0, help="size of the big prompt in MB (10^6 bytes)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--interval", type=float, default=0.01, help="seconds between /health polls")
    p.add_argument("--route", action="append", choices=ROUTES, help="repeatable; default: both")
    p.add_argument("--output", default=None, help="write the JSON report here too")
    args = p.parse_args(argv)
    routes = args.route or list(ROUTES)
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            p.error("--url must be a loopback address")
        report = run(args.url.rstrip("/"), args.mb, args.rounds, args.interval, routes)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from serve_helpers import serve_process

        model_dir = args.model_dir
        if model_dir is None:
            import tempfile

            from mtlora.testing import make_tiny_model_dir
            model_dir = make_tiny_model_dir(Path(tempfile.mkdtemp()) / "tiny")
        limit = f"{int(args.mb * 10**6 * 1.5) + 2**20}"
        with serve_process(["--model", str(model_dir), "--device", "cpu", "--log-level", "warning",
                            "--max-request-body-size", limit]) as url:
            report = run(url, args.mb, args.rounds, args.interval, routes)
    print(json.dumps(report["median"], indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
