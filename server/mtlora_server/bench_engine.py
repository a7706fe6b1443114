"""`mtlora-bench engine`: in-process throughput of the serving engine against transformers `generate` and vLLM.

Workload (defaults): 64 prompts x 128 random tokens in, 64 greedy tokens out (EOS ignored so every request does
the same work), the default model in bf16 on CPU. Rows:
  engine_base      the engine, bare base model for every request
  engine_mtlora    the engine, every request on one mtlora adapter (N=8, r=16, ffn, g=3, random non-zero weights)
  engine_mix4      the engine, requests spread over 4 adapters in the same batches (2 mtlora, 1 hydralora, 1 lora)
  engine_lora4     the engine, requests spread round-robin over 4 plain LoRA adapters (q, k, v, o; r=16), read
                   from PEFT LoRA directories
  hf_base          transformers generate, all prompts in one batch (the strongest HF baseline)
  hf_mix4          transformers generate with the reference adapters attached by mtlora.inject, one batch per
                   adapter (HF cannot mix adapters in a batch)
  vllm_base        vLLM's CPU build, compiled (its default), bare base
  vllm_base_eager  vLLM's CPU build, --enforce-eager, bare base
  vllm_lora4       vLLM's own multi-LoRA serving (enable_lora, max_loras 4) on the same 4 PEFT LoRA directories
The vLLM rows run ../shared/peers/vllm_multilora_bench.py in vLLM's own venv (--vllm-python) after the engine
and HF rows, one process per row (bench_peers.py); when vLLM is missing or fails, the row says "not run:
<reason>" in the table and the JSON.
Prompts: every engine row has its own random prompt set per round (the prefix cache outlives requests and would
serve repeated prompts from cache; the report counts any hits); hf_base and the vllm_base rows get engine_base's
prompts, hf_mix4 engine_mix4's, vllm_lora4 engine_lora4's (same adapter per prompt too), round by round.
Prints one table (each row against engine_base, the ratios the issue's targets name) and writes the JSON report.
Timings cover generation only (model and adapter loading excluded); a short warm-up run precedes the engine rows
and each vLLM process. With `--repeats K` every row runs K times, in rounds (each round runs every engine and HF
row once, so slow spells of a shared machine spread over those rows; the engine rows' order rotates from round to
round, so each row runs in each position equally often with K a multiple of their number; each vLLM row runs its K
rounds in one process), and the table shows each row's median; the JSON keeps every run's seconds.
By default the engine rows run on one engine each, the engines stepped in turn within each round ("interleaved"),
so every row sees the same moments of the host (a row's seconds: the sum of its own steps) and the engine rows'
ratios do not carry the host's run-to-run swings (docs/benchmarks.md) -- when one model copy and KV pool per
engine row fit in half the available memory (`interleave_fits`); otherwise, or with `--no-interleave`, one
engine runs the rows one after another. The report says which (`interleaved`).
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

from .bench_peers import VLLM_ROWS, find_vllm, run_vllm_row, write_lora4

log = logging.getLogger("mtlora.bench_engine")

ENGINE_ROWS = ("engine_base", "engine_mtlora", "engine_mix4", "engine_lora4")
HF_ROWS = ("hf_base", "hf_mix4")
ROWS = (*ENGINE_ROWS, *HF_ROWS, *VLLM_ROWS)
PROMPTS_OF = {"hf_base": "engine_base", "hf_mix4": "engine_mix4",
              **{name: r.prompts_of for name, r in VLLM_ROWS.items()}}
SEEDS_PER_SET = 1000                     # prompt set k uses seeds base_k + 1 .. base_k + repeats


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
    p.add_argument("--decode-graphs", default="auto", choices=["auto", "compile", "static"],
                   help="engine decode steps (mtlora-serve --decode-graphs): auto (CPU: eager), compile "
                   "(torch.compile per batch bucket; compile time lands in the first rounds, use --repeats) or "
                   "static (static buffers, eager ops)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="the engine rows on one engine each, stepped in turn within each round (not one engine "
                   "running the rows one after another): every row sees the same moments of the host, whose "
                   "swings (+-10 %% run to run on a shared machine) otherwise exceed what the adapter rows cost. "
                   "Needs one model copy and KV pool per engine row. Default: on when those fit in half the "
                   "available memory, else off")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, also OMP_NUM_THREADS of the vLLM "
                   "rows (default: torch's choice; vLLM: every core)")
    p.add_argument("--repeats", type=int, default=1, help="runs per row, in rounds over the rows; the report "
                   "uses each row's median (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts and random adapter weights")
    p.add_argument("--output", default="bench_engine.json", help="where to write the JSON report (vLLM's logs go "
                   "beside it, OUTPUT.vllm_ROW.log)")
    p.add_argument("--vllm-python", default=None, help="python of a venv with vLLM's CPU build (default: "
                   "$MTLORA_VLLM_PYTHON, else ~/.cache/mtlora-peers/vllm-cpu/bin/python, the venv .ci/run builds "
                   "with MTLORA_CI_PEERS=1); without it the vllm rows say 'not run'")
    p.add_argument("--peer-scripts", default=None, help="folder holding vllm_multilora_bench.py (default: "
                   "$MTLORA_PEER_SCRIPTS, else ../shared/peers beside the repository)")
    p.add_argument("--vllm-timeout", type=float, default=3600.0, help="seconds one vLLM row may take, start-up "
                   "included, before it is reported as not run (default 3600)")
    return p


# -- workload ----------------------------------------------------------------------------------------------------
def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def adapter_specs(hidden_size: int) -> dict[str, dict]:
    """The benchmark's adapters; the main mtlora adapter routes 3 groups over the hidden size (2 where 3 does not
    divide it, e.g. a 64-wide test model; one group where neither does)."""
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    groups = next((g for g in (3, 2) if hidden_size % g == 0), None)
    return {
        "mt_ffn": dict(method="mtlora", placement="ffn", rank=16, num_experts=8,
                       routing_group_size=hidden_size // groups if groups else None),
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


def prompt_seed(args, row: str) -> int:
    """Base seed of a row's prompt set; round k's prompts use base + 1 + k (as the vLLM peer script does with
    `--seed base`). Engine rows have sets of their own: the engine's prefix cache outlives requests, so reusing a
    prompt set would let later rows and rounds skip prefill. HF and vLLM rows reuse their engine row's set."""
    return args.seed + SEEDS_PER_SET * (1 + ENGINE_ROWS.index(PROMPTS_OF.get(row, row)))


def row_prompts(args, vocab: int, row: str, round_: int) -> list[list[int]]:
    return make_prompts(args.num_prompts, args.input_len, vocab, prompt_seed(args, row) + 1 + round_)


def rotated(rows: list[str], k: int) -> list[str]:
    """Round k's row order: the rows rotated by k, so over the rounds every row runs first, second, ... equally
    often and no ratio carries an order bias (in one sitting the rows' decode time moved with their place in the
    round, by more than the adapters cost: docs/benchmarks.md, 2026-12-04 13:15)."""
    k %= max(1, len(rows))
    return rows[k:] + rows[:k]


def round_robin(names: list[str], n: int) -> list[str]:
    """Adapter per prompt, round-robin (the order vllm_multilora_bench.py gives its LoRARequests too); [] when
    the adapters were not written (no asked-for row serves them)."""
    return [names[i % len(names)] for i in range(n)] if names else []


async def run_engine_rows(args, model_dir, paths, lora_paths, vocab: int, rows) -> dict[str, dict]:
    from mtlora_server.engine.engine import Engine

    every = {**paths, **lora_paths}
    eng = Engine.from_args(_engine_args(args, model_dir, every))
    await eng.start()
    plans = _plans(args, paths, lora_paths)
    cache = eng.core.prefix_cache
    runs: dict[str, list[dict]] = {}
    try:
        warm_with = [None, *every]                            # every adapter once: first-use costs stay out
        warm = make_prompts(len(warm_with), args.input_len, vocab, args.seed + 10 * SEEDS_PER_SET)
        await _drive(eng, warm, warm_with, 4, "warmup")
        engine_rows = [r for r in rows if r in plans]
        for k in range(args.repeats):
            for row in rotated(engine_rows, k):
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


def _engine_args(args, model_dir, adapters: dict):
    from mtlora_server.engine.args import EngineArgs

    return EngineArgs(model=str(model_dir), dtype=args.dtype, device="cpu", adapters=adapters,
                      max_adapters=max(8, len(adapters)), max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
                      batch_invariant=args.batch_invariant, decode_graphs=args.decode_graphs)


def _plans(args, paths: dict, lora_paths: dict) -> dict[str, list]:
    """Each engine row's adapter per prompt."""
    names, n = list(paths), args.num_prompts
    return {"engine_base": [None] * n, "engine_mtlora": ["mt_ffn"] * n,
            "engine_mix4": round_robin(names, n), "engine_lora4": round_robin(list(lora_paths), n)}


def run_engine_rows_interleaved(args, model_dir, paths, lora_paths, vocab: int, rows) -> dict[str, dict]:
    """--interleave: one EngineCore per engine row (each holding every adapter, as the shared engine does); each
    round every row's requests are added at once and the engines step in turn (the order rotating by round) until
    all are done, so every row sees the same moments of the host; a row's seconds are the sum of its own steps.
    Runs on the calling thread (its OpenMP pool the only one stepping)."""
    from mtlora_server.engine.core import EngineCore
    from mtlora_server.engine.types import GenerationRequest, SamplingParams

    from .bench_paired import step_in_turn

    every = {**paths, **lora_paths}
    engine_rows = [r for r in rows if r in ENGINE_ROWS]
    cores = {row: EngineCore(_engine_args(args, model_dir, every)) for row in engine_rows}
    plans = _plans(args, paths, lora_paths)
    warm_with = [None, *every]
    warm = make_prompts(len(warm_with), args.input_len, vocab, args.seed + 10 * SEEDS_PER_SET)
    runs: dict[str, list[dict]] = {}

    def add(row: str, prompts, adapters, output_len: int, tag: str) -> None:
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        for i, ids in enumerate(prompts):
            cores[row].add_request(GenerationRequest(f"{tag}-{i}", ids, params, adapter=adapters[i]))

    for k in range(-1, args.repeats):                         # round -1: the warm-up, not reported
        order = rotated(engine_rows, max(k, 0))
        took = {row: {"seconds": 0.0, "output_tokens": 0, "steps": 0} for row in order}
        hits0 = {row: cores[row].prefix_cache.hits if cores[row].prefix_cache else 0 for row in order}
        for row in order:
            if k < 0:
                add(row, warm, warm_with, 4, f"warmup-{row}")
            else:
                add(row, row_prompts(args, vocab, row, k), plans[row], args.output_len, f"{row}-{k}")
        step_in_turn(cores, order, lambda row, dt, outs: _count(took[row], dt, outs))
        if k < 0:
            continue
        for row in order:
            cache = cores[row].prefix_cache
            hits = (cache.hits if cache else 0) - hits0[row]
            runs.setdefault(row, []).append({**took[row], "prefix_cache_hits": hits})
            log.info("%s (run %d, interleaved): %.1f s", row, k + 1, took[row]["seconds"])
    return {row: summarize(r) for row, r in runs.items()}


def _count(took: dict, dt: float, outs) -> None:
    took["seconds"] += dt
    took["output_tokens"] += sum(len(d.token_ids) for out in outs for d in out.deltas)
    took["steps"] += 1


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


def run_hf_rows(args, model_dir, paths, vocab: int, rows) -> dict[str, dict]:
    from mtlora.base import load_base_model

    if not any(r in rows for r in HF_ROWS):
        return {}
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    model = load_base_model(model_dir, dtype=dtype)
    runs: dict[str, list[dict]] = {}
    if "hf_base" in rows:
        _hf_generate(model, make_prompts(2, args.input_len, vocab, args.seed), 2)     # warm-up
    for k in range(args.repeats):
        if "hf_base" in rows:
            prompts = row_prompts(args, vocab, "hf_base", k)
            t0 = time.perf_counter()
            tokens = _hf_generate(model, prompts, args.output_len)
            runs.setdefault("hf_base", []).append({"seconds": time.perf_counter() - t0, "output_tokens": tokens})
        if "hf_mix4" in rows:
            prompts = row_prompts(args, vocab, "hf_mix4", k)
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
# name -> (numerator row, denominator row, issue 15's target for it or None)
RATIOS = {
    "engine_base/vllm_base": ("engine_base", "vllm_base", 1.3),
    "engine_base/vllm_base_eager": ("engine_base", "vllm_base_eager", None),
    "engine_base/hf_base": ("engine_base", "hf_base", 1.8),
    "engine_mtlora/engine_base": ("engine_mtlora", "engine_base", None),
    "engine_mix4/engine_base": ("engine_mix4", "engine_base", 0.95),
    "engine_lora4/engine_base": ("engine_lora4", "engine_base", 0.95),
    "engine_lora4/vllm_lora4": ("engine_lora4", "vllm_lora4", None),
    "vllm_lora4/vllm_base": ("vllm_lora4", "vllm_base", None),
    "engine_mix4/hf_mix4": ("engine_mix4", "hf_mix4", None),
}


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Every ratio of RATIOS whose two rows ran (rows that were not run have no tokens_per_s)."""
    tps = {k: v["tokens_per_s"] for k, v in results.items() if "tokens_per_s" in v}
    return {k: tps[a] / tps[b] for k, (a, b, _) in RATIOS.items() if a in tps and b in tps}


def print_table(results: dict[str, dict], rat: dict[str, float]) -> None:
    base = results.get("engine_base", {}).get("tokens_per_s")
    print(f"{'row':<17}{'seconds':>10}{'tokens':>9}{'tok/s':>10}{'x engine_base':>15}  every run (s)")
    for row in ROWS:
        if row not in results:
            continue
        r = results[row]
        if "not_run" in r:
            print(f"{row:<17}not run: {r['not_run']}")
            continue
        rel = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
        every = " ".join(f"{x:.1f}" for x in r.get("runs_seconds", []))
        print(f"{row:<17}{r['seconds']:>10.1f}{r['output_tokens']:>9d}{r['tokens_per_s']:>10.1f}{rel:>15}  {every}")
    for k, (a, b, target) in RATIOS.items():
        if a not in results or b not in results:
            continue                                          # a row left out with --rows
        if k not in rat:
            missing = [x for x in (a, b) if "not_run" in results[x]]
            print(f"{k:<30}     -  ({', '.join(missing)} not run)")
            continue
        goal = f"  target >= {target:.2f}x: {'met' if rat[k] >= target else 'MISSED'}" if target else ""
        print(f"{k:<30}{rat[k]:>6.2f}x{goal}")


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


def prompt_vocab(model_dir, hf_config) -> int:
    """Token ids for the random prompts: the tokenizer's vocab_size, as vllm_multilora_bench.py draws them (so both
    engines get the same prompts), capped at the model's vocabulary."""
    from mtlora.base import load_tokenizer

    tok_vocab = load_tokenizer(model_dir).vocab_size
    if tok_vocab > hf_config.vocab_size:
        log.warning("tokenizer vocab_size %d > model vocab_size %d: prompts drawn below %d, so the vLLM rows' "
                    "prompts differ from the engine rows'", tok_vocab, hf_config.vocab_size, hf_config.vocab_size)
    return min(tok_vocab, hf_config.vocab_size)


def run_vllm_rows(args, model_dir, lora_paths, rows) -> dict[str, dict]:
    """The vLLM rows asked for, one process each, after the engine and HF rows (never at the same time)."""
    wanted = [VLLM_ROWS[r] for r in rows if r in VLLM_ROWS]
    if not wanted:
        return {}
    setup = find_vllm(args.vllm_python, args.peer_scripts)
    if setup.problem:
        log.warning("vLLM rows not run: %s", setup.problem)
    out = Path(args.output)
    return {r.name: run_vllm_row(setup, r, model_dir, list(lora_paths.values()), args, prompt_seed(args, r.name),
                                 out.with_name(f"{out.name}.{r.name}.log"), args.vllm_timeout) for r in wanted}


def check_args(args) -> list[str]:
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"--rows: unknown row(s) {bad}; expected names from {ROWS}")
    if not 1 <= args.repeats < SEEDS_PER_SET:
        raise SystemExit(f"--repeats: expected 1 to {SEEDS_PER_SET - 1}, got {args.repeats}")
    return rows


def interleave_fits(copies: int, model_bytes: int, kv_bytes: int, available: int | None) -> bool:
    """Whether `copies` engines (one model copy and KV pool each) fit in half the available memory (None:
    unknown, so no)."""
    return available is not None and copies * (model_bytes + kv_bytes) <= available // 2


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def decide_interleave(args, model_dir: Path, rows: list[str]) -> bool:
    """--interleave / --no-interleave as given; by default interleave when the engine rows' copies fit
    (`interleave_fits`: the checkpoint's bytes on disk bound one copy, plus the engine's default CPU KV pool)."""
    copies = sum(r in ENGINE_ROWS for r in rows)
    if args.interleave is not None or copies == 0:
        return bool(args.interleave) and copies > 0
    from mtlora_server.engine.kv_cache import DEFAULT_CPU_BUDGET

    model_bytes = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    fits = interleave_fits(copies, model_bytes, DEFAULT_CPU_BUDGET, _available_memory())
    log.info("engine rows %s: %d engine(s) of ~%.1f GB checkpoint + 1 GiB KV pool each %s half the available "
             "memory (--interleave / --no-interleave to choose)", "interleaved" if fits else "on one engine",
             copies, model_bytes / 1e9, "fit in" if fits else "do not fit in")
    return fits


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = check_args(args)
    args.dtype = _resolve_dtype_name(args.dtype)
    from mtlora.base import load_config, resolve_model

    model_dir = resolve_model(args.model)
    hf_config = load_config(model_dir)
    vocab = prompt_vocab(model_dir, hf_config)
    with tempfile.TemporaryDirectory(prefix="mtlora-bench-") as tmp:
        # Torch work before the engine rows runs in a thread that ends with it: an OpenMP pool left behind in
        # this thread would slow the engine's step thread (engine.py's module docstring).
        with ThreadPoolExecutor(1) as pool:           # only the adapters some asked-for row serves
            paths = pool.submit(write_adapters, Path(tmp), hf_config, args.seed).result() \
                if {"engine_mtlora", "engine_mix4", "hf_mix4"} & set(rows) else {}
            lora_paths = pool.submit(write_lora4, Path(tmp), hf_config, args.seed).result() \
                if {"engine_lora4", "vllm_lora4"} & set(rows) else {}
        results = {}
        interleave = decide_interleave(args, model_dir, rows)
        if interleave:                                # (only with engine rows asked for)
            results.update(run_engine_rows_interleaved(args, model_dir, paths, lora_paths, vocab, rows))
        elif any(r in rows for r in ENGINE_ROWS):
            results.update(asyncio.run(run_engine_rows(args, model_dir, paths, lora_paths, vocab, rows)))
        results.update(run_hf_rows(args, model_dir, paths, vocab, rows))
        results.update(run_vllm_rows(args, model_dir, lora_paths, rows))
    rat = ratios(results)
    print_table(results, rat)
    if any(r in rows for r in ENGINE_ROWS):
        print("engine rows: " + ("interleaved (one engine each, stepped in turn)" if interleave
                                 else "on one engine, one row after another"))
    report = {"model": str(model_dir), "dtype": args.dtype, "num_prompts": args.num_prompts,
              "input_len": args.input_len, "output_len": args.output_len, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "interleaved": interleave, "prompt_vocab": vocab, "results": results,
              "ratios": rat,
              "targets": {k: t for k, (_, _, t) in RATIOS.items() if t is not None}}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
