"""`mtlora-bench engine`: in-process throughput of the serving engine against transformers `generate`.

Workload (defaults): 64 prompts x 128 random tokens in, 64 greedy tokens out (EOS ignored so every request does
the same work), the default model in bf16 on CPU. Rows:
  engine_base    the engine, bare base model for every request
  engine_mtlora  the engine, every request on one mtlora adapter (N=8, r=16, ffn, g=3, random non-zero weights)
  engine_mix4    the engine, requests spread over 4 adapters in the same batches (2 mtlora, 1 hydralora, 1 lora)
  hf_base        transformers generate, all prompts in one batch (the strongest HF baseline)
  hf_mix4        transformers generate with the reference adapters attached by mtlora.inject, one batch per
                 adapter (HF cannot mix adapters in a batch)
Every engine row and round gets its own random prompts (the prefix cache outlives requests and would serve
repeated prompts from cache; the report counts any hits). Prints a side-by-side table with ratios and writes
the JSON report. Timings cover generation only (model and adapter loading excluded); a short warm-up run
precedes the engine rows. With `--repeats K` every row runs K
times, in rounds (each round runs every row once, so slow spells of a shared machine spread over all rows), and
the table shows each row's median; the JSON keeps every run's seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger("mtlora.bench_engine")

ROWS = ("engine_base", "engine_mtlora", "engine_mix4", "hf_base", "hf_mix4")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtlora-bench engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir or hub id (default: mtlora.base's default model)")
    p.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 | auto (the engine's choice for this "
                   "CPU: bf16 with native bf16 matmuls, else fp32), used by every row (default bfloat16)")
    p.add_argument("--num-prompts", type=int, default=64, help="number of requests (default 64)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default 128)")
    p.add_argument("--output-len", type=int, default=64, help="greedy tokens generated per request (default 64)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine max_num_seqs (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="engine token budget per step")
    p.add_argument("--batch-invariant", action="store_true", help="run the engine rows in batch-invariant mode "
                   "(mtlora-serve --batch-invariant) to measure its cost")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=1, help="runs per row, in rounds over the rows; the report "
                   "uses each row's median (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts and random adapter weights")
    p.add_argument("--output", default="bench_engine.json", help="where to write the JSON report")
    return p


# -- workload ----------------------------------------------------------------------------------------------------
def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def adapter_specs(hidden_size: int) -> dict[str, dict]:
    """The benchmark's adapters; g=3 routing groups over the hidden size for the main mtlora adapter."""
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return {
        "mt_ffn": dict(method="mtlora", placement="ffn", rank=16, num_experts=8,
                       routing_group_size=hidden_size // 3),
        "mt_attn": dict(method="mtlora", placement="attention", rank=16, num_experts=4),
        "hydra": dict(method="hydralora", rank=16, num_experts=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        "lora": dict(method="lora", rank=16, target_modules=attn),
    }


def write_adapters(root: Path, hf_config, seed: int) -> dict[str, str]:
    from mtlora.checkpoint import save_adapter
    from mtlora.config import AdapterConfig
    from mtlora.reference import random_adapter_tensors

    paths = {}
    for i, (name, spec) in enumerate(adapter_specs(hf_config.hidden_size).items()):
        cfg = AdapterConfig(**spec)
        tensors = random_adapter_tensors(cfg, hf_config, seed=seed + i, scale=0.02)
        paths[name] = str(save_adapter(root / name, cfg, tensors))
    return paths


# -- engine rows -------------------------------------------------------------------------------------------------
async def _drive(engine, prompts, adapters: list[str | None], output_len: int, tag: str) -> int:
    from mtlora_server.engine.types import GenerationRequest, SamplingParams

    async def one(i: int) -> int:
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        n = 0
        async for out in engine.generate(GenerationRequest(f"{tag}-{i}", prompts[i], params, adapter=adapters[i])):
            n += sum(len(d.token_ids) for d in out.deltas)
        return n

    return sum(await asyncio.gather(*[one(i) for i in range(len(prompts))]))


def row_prompts(args, vocab: int, row: str, round_: int) -> list[list[int]]:
    """Fresh random prompts for every (row, round): the engine's prefix cache outlives requests, so reusing a
    prompt set would let later rows and rounds skip prefill (their requests all hit the cache)."""
    seed = args.seed + 1 + round_ * len(ROWS) + ROWS.index(row)
    return make_prompts(args.num_prompts, args.input_len, vocab, seed)


async def run_engine_rows(args, model_dir, paths, vocab: int, rows) -> dict[str, dict]:
    from mtlora_server.engine.args import EngineArgs
    from mtlora_server.engine.engine import Engine

    eng = Engine.from_args(EngineArgs(model=str(model_dir), dtype=args.dtype, device="cpu", adapters=paths,
                                      max_num_seqs=args.max_num_seqs,
                                      max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
                                      batch_invariant=args.batch_invariant))
    await eng.start()
    names, n = list(paths), args.num_prompts
    plans = {"engine_base": [None] * n, "engine_mtlora": ["mt_ffn"] * n,
             "engine_mix4": [names[i % len(names)] for i in range(n)]}
    cache = eng.core.prefix_cache
    runs: dict[str, list[dict]] = {}
    try:
        warm = make_prompts(4, args.input_len, vocab, args.seed + 10_000)
        await _drive(eng, warm, [None, *names[:3]], 4, "warmup")
        for k in range(args.repeats):
            for row in (r for r in rows if r in plans):
                prompts = row_prompts(args, vocab, row, k)
                steps0, hits0 = eng.core.step_count, cache.hits if cache else 0
                t0 = time.perf_counter()
                tokens = await _drive(eng, prompts, plans[row], args.output_len, f"{row}-{k}")
                dt = time.perf_counter() - t0
                runs.setdefault(row, []).append({"seconds": dt, "output_tokens": tokens,
                                                 "steps": eng.core.step_count - steps0,
                                                 "prefix_cache_hits": (cache.hits if cache else 0) - hits0})
                log.info("%s (run %d): %.1f s, %.1f tok/s", row, k + 1, dt, tokens / dt)
    finally:
        await eng.shutdown()
    return {row: summarize(r) for row, r in runs.items()}


def summarize(runs: list[dict]) -> dict:
    """One row's report from its runs: the median run's figures (the lower middle one for an even count), plus
    every run's seconds."""
    med = sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]
    out = {**med, "tokens_per_s": med["output_tokens"] / med["seconds"],
           "runs_seconds": [round(r["seconds"], 3) for r in runs]}
    if "prefix_cache_hits" in med:              # engine rows: 0 unless prompts repeat (then prefill was skipped)
        out["prefix_cache_hits_all_runs"] = sum(r["prefix_cache_hits"] for r in runs)
    return out


# -- transformers rows -------------------------------------------------------------------------------------------
def _hf_generate(model, prompts, output_len: int) -> int:
    ids = torch.tensor(prompts)                                       # equal lengths: no padding needed
    with torch.inference_mode():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    return int((gen.shape[1] - ids.shape[1]) * ids.shape[0])


def run_hf_rows(args, model_dir, paths, prompts, rows) -> dict[str, dict]:
    from mtlora.base import load_base_model

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    model = load_base_model(model_dir, dtype=dtype)
    runs: dict[str, list[dict]] = {}
    if "hf_base" in rows:
        _hf_generate(model, prompts[:2], 2)                           # warm-up
    for k in range(args.repeats):
        if "hf_base" in rows:
            t0 = time.perf_counter()
            tokens = _hf_generate(model, prompts, args.output_len)
            runs.setdefault("hf_base", []).append({"seconds": time.perf_counter() - t0, "output_tokens": tokens})
        if "hf_mix4" in rows:
            runs.setdefault("hf_mix4", []).append(_hf_mix4(model, paths, prompts, args.output_len, dtype))
        for row, r in runs.items():
            log.info("%s (run %d): %.1f s, %.1f tok/s", row, k + 1, r[-1]["seconds"],
                     r[-1]["output_tokens"] / r[-1]["seconds"])
    return {row: summarize(r) for row, r in runs.items()}


def _hf_mix4(model, paths, prompts, output_len: int, dtype) -> dict:
    """One batch per adapter (HF cannot mix adapters in a batch); times the generate calls only."""
    from mtlora import inject
    from mtlora.checkpoint import load_adapter

    names, total_t, total_tok = list(paths), 0.0, 0
    for k, name in enumerate(names):
        config, tensors = load_adapter(paths[name], model_config=model.config, dtype=dtype)
        inject.attach(model, config)
        inject.load_adapter_state(model, tensors, source=paths[name])
        group = [p for i, p in enumerate(prompts) if i % len(names) == k]
        t0 = time.perf_counter()
        total_tok += _hf_generate(model, group, output_len)
        total_t += time.perf_counter() - t0
        inject.detach(model)
    return {"seconds": total_t, "output_tokens": total_tok}


# -- report ------------------------------------------------------------------------------------------------------
def ratios(results: dict[str, dict]) -> dict[str, float]:
    tps = {k: v["tokens_per_s"] for k, v in results.items()}
    pairs = {"engine_base/hf_base": ("engine_base", "hf_base"), "engine_mix4/engine_base": ("engine_mix4",
             "engine_base"), "engine_mtlora/engine_base": ("engine_mtlora", "engine_base"),
             "engine_mix4/hf_mix4": ("engine_mix4", "hf_mix4")}
    return {k: tps[a] / tps[b] for k, (a, b) in pairs.items() if a in tps and b in tps}


def print_table(results: dict[str, dict], rat: dict[str, float]) -> None:
    base = results.get("engine_base", {}).get("tokens_per_s")
    print(f"{'row':<15}{'seconds':>10}{'tokens':>9}{'tok/s':>10}{'x engine_base':>15}  every run (s)")
    for row in ROWS:
        if row in results:
            r = results[row]
            rel = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
            every = " ".join(f"{x:.1f}" for x in r.get("runs_seconds", []))
            print(f"{row:<15}{r['seconds']:>10.1f}{r['output_tokens']:>9d}{r['tokens_per_s']:>10.1f}{rel:>15}  {every}")
    for k, v in rat.items():
        print(f"{k:<28}{v:>6.2f}x")


def _resolve_dtype_name(name: str) -> str:
    """One dtype for every row (`auto` as the engine resolves it on this CPU); warn when bf16 would be emulated."""
    from mtlora.base import cpu_has_bf16, parse_dtype

    if name not in ("auto", "float32", "bfloat16"):
        raise SystemExit(f"--dtype: expected float32, bfloat16 or auto, got {name!r}")
    dtype = parse_dtype(name, torch.device("cpu"))
    if dtype == torch.bfloat16 and not cpu_has_bf16():
        log.warning("this CPU has no native bf16 (avx512_bf16 / amx): bf16 matmuls are emulated, several times "
                    "slower than fp32, for every row alike; --dtype float32 measures the fast path")
    return "bfloat16" if dtype == torch.bfloat16 else "float32"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"--rows: unknown row(s) {bad}; expected names from {ROWS}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats: expected at least 1, got {args.repeats}")
    args.dtype = _resolve_dtype_name(args.dtype)
    from mtlora.base import load_config, resolve_model

    model_dir = resolve_model(args.model)
    hf_config = load_config(model_dir)
    prompts = make_prompts(args.num_prompts, args.input_len, hf_config.vocab_size, args.seed)
    with tempfile.TemporaryDirectory(prefix="mtlora-bench-") as tmp:
        # Torch work before the engine rows runs in a thread that ends with it: an OpenMP pool left behind in
        # this thread would slow the engine's step thread (engine.py's module docstring).
        with ThreadPoolExecutor(1) as pool:
            paths = pool.submit(write_adapters, Path(tmp), hf_config, args.seed).result()
        results = asyncio.run(run_engine_rows(args, model_dir, paths, hf_config.vocab_size, rows))
        results.update(run_hf_rows(args, model_dir, paths, prompts, rows))
    rat = ratios(results)
    print_table(results, rat)
    report = {"model": str(model_dir), "dtype": args.dtype, "num_prompts": args.num_prompts,
              "input_len": args.input_len, "output_len": args.output_len, "threads": torch.get_num_threads(),
              "repeats": args.repeats,
              "results": results, "ratios": rat}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
