"""`mtlora-bench adapters`: many registered adapters through a few device slots, in-process.

Workload (defaults): 200 registered adapters (mtlora ffn / mtlora attention / hydralora / lora in turn, random
non-zero weights, rank 16), 8 slots, 256 requests whose adapters follow a Zipf popularity (s = 1.1 over the
adapters in a random order), 64 random prompt tokens in, 32 greedy tokens out, Poisson arrivals at `--rate`
requests/s (0: all at once). Rows:
  many_adapters   the 200 adapters registered, `--max-adapters` (8) resident at a time
  resident        the same requests (prompts, lengths, arrival times) over `--resident-adapters` (8) adapters that
                  all stay resident: the request for popularity rank k uses adapter k mod 8
Rounds (`--repeats`): each runs both rows, each in a fresh engine, the first row alternating from round to round;
a row reports its median run (every run's seconds beside it) and the ratio is of the two medians, with each
round's own ratio printed too (this host's rounds swing +-15 %: one round is not a measurement).
Reported: output tokens/s of each row and their ratio; time to first token (p50 / p99) of the requests whose
adapter was not resident when they arrived, next to that of all requests of the resident row; adapter loads,
evictions, host-cache hits; and the cold-load time of one adapter per kind, disk -> slot (file read, validation,
the CPU kernel's data, slot copy) and host cache -> slot (slot copy), medians of `--load-repeats`. The host cache
is sized by `--adapter-cache-size` (default 2 GiB: it holds every adapter of the default workload, so after its
first disk read an adapter comes back from memory). "Waited" is read from the registry when the request is
submitted (the step thread may install the adapter a moment later: a few requests counted as waiting may have
waited very little).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from .bench_engine import _resolve_dtype_name, adapter_specs, make_prompts, rotated, summarize
from .cli import positive_int

log = logging.getLogger("mtlora.bench_adapters")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtlora-bench adapters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir or hub id (default: mtlora.base's default model)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (default auto)")
    p.add_argument("--num-adapters", type=positive_int, default=200, help="registered adapters (default 200)")
    p.add_argument("--max-adapters", type=positive_int, default=8, help="device slots (default 8)")
    p.add_argument("--resident-adapters", type=positive_int, default=8,
                   help="adapters of the resident row, all in slots (default 8; kept apart from --max-adapters so "
                        "a run with more slots is compared against the same baseline)")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent of adapter popularity (default 1.1)")
    p.add_argument("--num-prompts", type=positive_int, default=256, help="requests (default 256)")
    p.add_argument("--input-len", type=positive_int, default=64, help="prompt tokens per request (default 64)")
    p.add_argument("--output-len", type=positive_int, default=32, help="greedy tokens per request (default 32)")
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrival rate, requests/s (0: all at once)")
    p.add_argument("--max-num-seqs", type=positive_int, default=64, help="engine max_num_seqs (default 64)")
    p.add_argument("--adapter-cache-size", type=int, default=2 << 30, help="host cache bytes (default 2 GiB)")
    p.add_argument("--preload-adapters", action="store_true",
                   help="the many_adapters row's engine reads its adapters into the host cache at start-up "
                        "(mtlora-serve --preload-adapters), before the timed part")
    p.add_argument("--load-repeats", type=positive_int, default=5, help="cold loads timed per adapter kind (default 5)")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="rounds: each runs both rows (a fresh engine each), the first row alternating between rounds "
                        "(so neither always runs on a cold or a warm host); each row reports its median run and the "
                        "ratio is of the medians (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts, popularity and adapter weights")
    p.add_argument("--output", default="bench_adapters.json", help="where to write the JSON report")
    return p


def zipf_choices(n_items: int, n: int, s: float, rng: random.Random) -> list[int]:
    """n popularity ranks in [0, n_items) drawn with P(rank k) proportional to 1 / (k + 1)^s."""
    weights = [1.0 / (k + 1) ** s for k in range(n_items)]
    return rng.choices(range(n_items), weights=weights, k=n)


def write_many(root: Path, hf_config, count: int, seed: int) -> dict[str, str]:
    from mtlora.checkpoint import save_adapter
    from mtlora.config import AdapterConfig
    from mtlora.reference import random_adapter_tensors

    specs = list(adapter_specs(hf_config.hidden_size).items())
    paths = {}
    for i in range(count):
        kind, spec = specs[i % len(specs)]
        cfg = AdapterConfig(**spec)
        tensors = random_adapter_tensors(cfg, hf_config, seed=seed + i, scale=0.02)
        paths[f"{kind}-{i:03d}"] = str(save_adapter(root / f"{kind}-{i:03d}", cfg, tensors))
    return paths


def in_fresh_thread(fn, *args):
    """Torch work outside the engine's step thread, in a thread that ends with it (engine.py's docstring)."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    t.join()
    return out[0]


async def run_row(args, model_dir, registered: dict[str, str], plan: list[str], prompts, arrivals,
                  slots: int) -> dict:
    from mtlora_server.engine.args import EngineArgs
    from mtlora_server.engine.engine import Engine
    from mtlora_server.engine.types import GenerationRequest, SamplingParams

    eng = Engine.from_args(EngineArgs(model=str(model_dir), dtype=args.dtype, device="auto", adapters=registered,
                                      max_adapters=slots, max_num_seqs=args.max_num_seqs,
                                      adapter_cache_size=args.adapter_cache_size, seed=args.seed,
                                      preload_adapters=args.preload_adapters,
                                      max_num_batched_tokens=2048))
    await eng.start()
    records = eng.core.registry.records
    ttft: list[tuple[float, bool]] = []
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    async def one(i: int, t0: float) -> int:
        await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
        start, waited, n = time.perf_counter(), records[plan[i]].slot is None, 0
        async for out in eng.generate(GenerationRequest(f"r{i}", prompts[i], params, adapter=plan[i])):
            if n == 0 and any(d.token_ids for d in out.deltas):
                ttft.append((time.perf_counter() - start, waited))
            n += sum(len(d.token_ids) for d in out.deltas)
        return n

    try:
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*[one(i, t0) for i in range(len(plan))]))
        seconds = time.perf_counter() - t0
        c = eng.stats().adapter_counters
        steps = eng.core.step_count                       # forward passes (the step thread is idle now)
    finally:
        await eng.shutdown()
    waited = [t for t, w in ttft if w]
    return {"seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds,
            "ttft_all": _pcts([t for t, _ in ttft]), "ttft_waited": _pcts(waited), "num_waited": len(waited),
            "distinct_adapters": len(set(plan)), "slots": slots, "steps": steps,
            "tokens_per_step": (tokens + len(plan) * len(prompts[0])) / max(1, steps), "loads": c.loads_total,
            "disk_loads": c.disk_loads_total, "evictions": c.evictions_total, "host_cache_hits": c.cache_hits_total}


def _pcts(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    return {"p50": xs[(len(xs) - 1) // 2], "p99": xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))],
            "mean": statistics.fmean(xs)}


def cold_loads(args, model_dir, paths: dict[str, str]) -> dict[str, dict]:
    """Per adapter kind: disk -> slot (read + validation + the kernel's data + slot copy: a load worker's work and
    the step thread's) and host cache -> slot (slot copy)."""
    from mtlora_server.engine.args import EngineArgs
    from mtlora_server.engine.core import EngineCore

    core = EngineCore(EngineArgs(model=str(model_dir), dtype=args.dtype, device="auto", max_adapters=1,
                                 kv_cache_memory=64 << 20))
    out = {}
    for kind in adapter_specs(core.hf_config.hidden_size):
        names = [n for n in paths if n.startswith(kind + "-")][:args.load_repeats]
        disk, copy = [], []
        for name in names:
            t0 = time.perf_counter()
            config, tensors = core.read_adapter(paths[name])
            if core.device.type == "cuda":
                tensors = {k: t.pin_memory() for k, t in tensors.items()}
            prepared = core.slots.prepare(config, tensors)             # the load worker's kernel data (CPU)
            core.slots.load(0, config, tensors, checked=True, prepared=prepared)   # as the engine installs
            _sync(core.device)
            t2 = time.perf_counter()
            core.slots.load(0, config, tensors, checked=True, prepared=prepared)   # again: from memory only
            _sync(core.device)
            t3 = time.perf_counter()
            disk.append(t2 - t0)
            copy.append(t3 - t2)
        out[kind] = {"disk_to_slot_ms": 1000 * statistics.median(disk),
                     "host_cache_to_slot_ms": 1000 * statistics.median(copy),
                     "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resident_adapters > args.num_adapters:
        parser.error(f"--resident-adapters ({args.resident_adapters}) must not exceed --num-adapters "
                     f"({args.num_adapters}): the resident row serves the first of the registered adapters")
    if not args.rate >= 0:
        parser.error(f"--rate: expected requests/s >= 0 (0: all at once), got {args.rate}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mtlora_server.engine").setLevel(logging.WARNING)     # one line per load/eviction otherwise
    logging.getLogger("mtlora.checkpoint").setLevel(logging.WARNING)
    args.dtype = _resolve_dtype_name(args.dtype)
    from mtlora.base import load_config, resolve_model

    model_dir = resolve_model(args.model)
    hf_config = load_config(model_dir)
    rng = random.Random(args.seed)
    ranks = zipf_choices(args.num_adapters, args.num_prompts, args.zipf_s, rng)
    prompts = make_prompts(args.num_prompts, args.input_len, hf_config.vocab_size, args.seed)
    gaps = [rng.expovariate(args.rate) if args.rate > 0 else 0.0 for _ in range(args.num_prompts)]
    arrivals = [sum(gaps[:i + 1]) for i in range(args.num_prompts)]
    with tempfile.TemporaryDirectory(prefix="mtlora-bench-adapters-") as tmp:
        t0 = time.perf_counter()
        paths = in_fresh_thread(write_many, Path(tmp), hf_config, args.num_adapters, args.seed)
        log.info("wrote %d adapters in %.1f s", len(paths), time.perf_counter() - t0)
        names = list(paths)
        order = rng.sample(names, len(names))                      # popularity rank -> adapter
        many_plan = [order[k] for k in ranks]
        few = {n: paths[n] for n in names[:args.resident_adapters]}
        few_plan = [names[k % args.resident_adapters] for k in ranks]
        rows = {"many_adapters": (paths, many_plan, args.max_adapters),
                "resident": (few, few_plan, args.resident_adapters)}
        runs: dict[str, list[dict]] = {}
        for k in range(args.repeats):
            for row in rotated(list(rows), k):
                # fresh prompts would change the work; the prefix cache is per engine, so reusing them is fair
                registered, plan, slots = rows[row]
                runs.setdefault(row, []).append(asyncio.run(run_row(args, model_dir, registered, plan, prompts,
                                                                    arrivals, slots)))
                log.info("%s (round %d): %.1f s", row, k + 1, runs[row][-1]["seconds"])
        results = {row: summarize(r) for row, r in runs.items()}
        loads = in_fresh_thread(cold_loads, args, model_dir, paths)
    ratio = results["many_adapters"]["tokens_per_s"] / results["resident"]["tokens_per_s"]
    rounds = [m["tokens_per_s"] / r["tokens_per_s"] for m, r in zip(runs["many_adapters"], runs["resident"])]
    for row, r in results.items():
        print(f"{row:<15}{r['seconds']:>8.1f} s {r['tokens_per_s']:>8.1f} tok/s  slots {r['slots']:>3}  steps "
              f"{r['steps']:>5} ({r['tokens_per_step']:.0f} tokens/step)  distinct adapters "
              f"{r['distinct_adapters']:>3}  loads {r['loads']:>3}  evictions {r['evictions']:>3}  "
              f"waited {r['num_waited']:>3}  ttft p50/p99 all {_fmt(r['ttft_all'])} waited {_fmt(r['ttft_waited'])}"
              f"  runs (s) {' '.join(f'{x:.1f}' for x in r['runs_seconds'])}")
    print(f"throughput many_adapters / resident: {ratio:.2f}x (medians of {args.repeats} round(s); per round: "
          f"{' '.join(f'{x:.2f}' for x in rounds)})")
    for kind, v in loads.items():
        print(f"cold load {kind:<8} ({v['bytes'] / 2**20:.1f} MiB): disk -> slot {v['disk_to_slot_ms']:.1f} ms, "
              f"host cache -> slot {v['host_cache_to_slot_ms']:.1f} ms")
    report = {"model": str(model_dir), "dtype": args.dtype, "args": {k: v for k, v in vars(args).items()},
              "threads": torch.get_num_threads(), "results": results, "ratio": ratio, "round_ratios": rounds,
              "cold_loads": loads}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


def _fmt(p: dict) -> str:
    return f"{p['p50']:.2f}/{p['p99']:.2f} s" if p else "-"


if __name__ == "__main__":
    raise SystemExit(main())
