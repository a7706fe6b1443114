"""`mtlora-bench paired`: what serving adapters costs the engine, measured in one process, paired against the base.

Why: `mtlora-bench engine` times each row whole, one row after another; on a shared host its rounds swing +-10 %,
more than the 3-5 % the adapters cost, so its medians cannot say on which side of a 0.95x target the adapter rows
are (issue 15, docs/benchmarks.md). This runs the engine bench's row workload (--num-prompts prompts of --input-len
random tokens, --output-len greedy tokens each, EOS ignored) in one `EngineCore` holding the adapters, alternately
with the requests spread round-robin over the adapters ("adapted") and on the bare base ("base"), --rounds times,
the kind that runs first alternating from round to round, fresh prompts every run. Inside every run it times the
prefill-containing and the decode-only steps, the adapter work (the decoder's `_adapt` calls, 4 a layer: its Python
included; on a base step they return at once), within that the C++ adapter kernel (`adapter_rows` and the steps'
bound `RowsCall`s), the C++ decode attention (where the KV blocks a run was given show: scattered blocks read
slower) and the weight GEMMs (the same work in both kinds: a difference there is the host, or the adapters' weights
evicting the base's from the caches).

Reports per kind the median run; per round the ratio base wall / adapted wall of its two adjacent runs, and their
median (the engine bench's "x engine_base" figure, paired); and the adapter work's share of the adapted runs' wall
time: 1 - share is the ratio a quiet host would show, up to what the adapter rows change outside the adapter
work (batch layout, KV placement) -- which is what the paired ratio measures directly.
`--interleave` builds one engine per kind and, within each round, steps them in turn (base step, adapted step,
...): the two runs see the same moments of the host, which moves whole runs by +-10 % -- the ratio then comes
from whole-step times only (no inner timers).
Runs on the calling thread (no engine thread), so its OpenMP pool is the only one. The timers wrap the engine's
own objects (runner, decoder, `_adapt`, the C++ kernels) while it measures, and put them back after.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .bench_profile import wrapped_binding

log = logging.getLogger("mtlora.bench_paired")

KINDS = ("base", "adapted")


@dataclass
class Run:
    """One run of the workload: wall seconds and the timed parts (seconds, steps)."""

    kind: str
    round: int
    wall: float
    prefill_s: float = 0.0          # steps with any prompt chunk
    decode_s: float = 0.0           # decode-only steps
    prefill_steps: int = 0
    decode_steps: int = 0
    adapter_s: float = 0.0          # inside the decoder's `_adapt` (engine/model.py)
    kernel_s: float = 0.0           # inside the C++ adapter kernel (part of adapter_s)
    attention_s: float = 0.0        # inside the C++ paged decode attention (0 where the engine has none)
    gemm_s: float = 0.0             # the weight GEMMs (the decoder's `_linear`: qkv, o, gate_up, down, lm_head)
    output_tokens: int = 0


@dataclass
class Report:
    adapters: str
    dtype: str
    num_prompts: int
    input_len: int
    output_len: int
    runs: list[Run] = field(default_factory=list)
    round_ratios: list[float] = field(default_factory=list)     # base wall / adapted wall, per round
    paired_ratio: float = 0.0                                     # their median
    adapter_share: float = 0.0        # median over adapted runs of adapter_s / wall
    kernel_share: float = 0.0         # median over adapted runs of kernel_s / wall
    interleaved: bool = False         # --interleave: two engines stepped in turn (no inner timers)


def build_parser() -> argparse.ArgumentParser:
    from .cli import positive_int

    p = argparse.ArgumentParser(prog="mtlora-bench paired", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir or hub id (default: mtlora.base's default model)")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float32 (default auto: the engine's choice)")
    p.add_argument("--adapters", choices=("mix4", "lora4"), default="mix4", help="mix4: the engine bench's 4 "
                   "adapters (2 mtlora, hydralora, lora); lora4: its 4 plain LoRA adapters (q, k, v, o; r=16) "
                   "(default mix4)")
    p.add_argument("--num-prompts", type=positive_int, default=64, help="requests per run (default 64)")
    p.add_argument("--input-len", type=positive_int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--output-len", type=positive_int, default=64, help="generated tokens (default 64)")
    p.add_argument("--rounds", type=positive_int, default=6, help="rounds, each one base and one adapted run "
                   "(default 6)")
    p.add_argument("--interleave", action="store_true", help="two engines, one per kind, stepped in turn (a base "
                   "step, an adapted step, ...) within each round: both kinds see the same moment of the host, "
                   "so the host's swings (+-10 %% from run to run) cancel step by step. Times whole steps only "
                   "(no adapter / kernel / GEMM timers); the two engines are built alike (2x the memory)")
    p.add_argument("--enforce-eager", action="store_true", help="the engine's --enforce-eager")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts and random adapter weights")
    p.add_argument("--output", default=None, help="also write the report (every run) as JSON here")
    return p


def timed(fn, acc, key: str):
    """fn, with the seconds of every call added to acc[key]."""
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[key] += time.perf_counter() - t0
    return call


@contextmanager
def timers(core):
    """Time the engine's steps, adapter work and adapter kernel into a dict (seconds / counts) while inside."""
    from .engine import model as model_module

    acc: dict[str, float] = defaultdict(float)
    runner, slots, model = core.runner, core.slots, core.model
    execute, adapt, kernel, linear = runner.execute, model_module._adapt, slots.cpu_kernel, model._linear
    attention = getattr(model, "paged_kernel", None)

    def timed_execute(scheduled, *args, **kwargs):
        kind = "prefill" if any(c.length > 1 for c in scheduled.chunks) else "decode"
        acc[kind + "_steps"] += 1
        return timed(execute, acc, kind + "_s")(scheduled, *args, **kwargs)

    runner.execute, model_module._adapt = timed_execute, timed(adapt, acc, "adapter_s")
    model._linear = timed(linear, acc, "gemm_s")
    if kernel is not None:
        slots.cpu_kernel = _TimedKernel(kernel, acc, "adapter_rows", "kernel_s")
        slots.bind_step = wrapped_binding(slots.bind_step, lambda c: timed(c, acc, "kernel_s"))
    if attention is not None:
        model.paged_kernel = _TimedKernel(attention, acc, "paged_decode_attention", "attention_s")
    try:
        yield acc
    finally:
        runner.execute, model_module._adapt, slots.cpu_kernel, model._linear = execute, adapt, kernel, linear
        vars(slots).pop("bind_step", None)
        if attention is not None:
            model.paged_kernel = attention


class _TimedKernel:
    """A C++ extension module with one function timed into acc[key]."""

    def __init__(self, ext, acc, function: str, key: str):
        self._ext, self._acc, self._function, self._key = ext, acc, function, key

    def __getattr__(self, name: str):
        fn = getattr(self._ext, name)
        return timed(fn, self._acc, self._key) if name == self._function else fn


def one_run(core, acc, kind: str, k: int, prompts: list[list[int]], names: list[str], output_len: int) -> Run:
    from .engine.types import GenerationRequest, SamplingParams

    acc.clear()
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        adapter = names[i % len(names)] if kind == "adapted" else None
        core.add_request(GenerationRequest(f"{kind}-{k}-{i}", ids, params, adapter=adapter))
    tokens, t0 = 0, time.perf_counter()
    while core.has_work():
        for out in core.step():
            tokens += sum(len(d.token_ids) for d in out.deltas)
    wall = time.perf_counter() - t0
    return Run(kind, k, wall, acc["prefill_s"], acc["decode_s"], int(acc["prefill_steps"]),
               int(acc["decode_steps"]), acc["adapter_s"], acc["kernel_s"], acc["attention_s"],
               acc["gemm_s"], tokens)


def measure(args) -> Report:
    from .bench_engine import make_prompts
    from .bench_profile import build_core

    core_args = argparse.Namespace(model=args.model, dtype=args.dtype, adapters=args.adapters,
                                   batch=args.num_prompts, enforce_eager=args.enforce_eager, seed=args.seed)
    if args.interleave:
        return summarize(measure_interleaved(args, core_args))
    with tempfile.TemporaryDirectory(prefix="mtlora-paired-") as tmp:
        core, names, vocab = build_core(core_args, Path(tmp))
        report = Report(args.adapters, str(core.dtype).removeprefix("torch."), args.num_prompts, args.input_len,
                        args.output_len)
        with timers(core) as acc:
            for kind in KINDS:                                   # warm-up: first-use costs stay out
                one_run(core, acc, kind, -1, make_prompts(len(names), args.input_len, vocab, args.seed + 7),
                        names, 2)
            for k in range(args.rounds):
                for kind in (KINDS if k % 2 == 0 else KINDS[::-1]):
                    prompts = make_prompts(args.num_prompts, args.input_len, vocab,
                                           args.seed + 1000 * (k + 1) + KINDS.index(kind))
                    report.runs.append(one_run(core, acc, kind, k, prompts, names, args.output_len))
                    log.info("round %d %s: %.2f s", k + 1, kind, report.runs[-1].wall)
    return summarize(report)


def measure_interleaved(args, core_args) -> Report:
    """--interleave: an engine per kind, each round both workloads added at once and their steps taken in turn
    (the kind that steps first alternating by round); each run's wall time is the sum of its own steps."""
    from .bench_engine import make_prompts
    from .bench_profile import build_core

    with tempfile.TemporaryDirectory(prefix="mtlora-paired-") as tmp:
        cores = {}
        for kind in KINDS:
            cores[kind], names, vocab = build_core(core_args, Path(tmp) / kind)
        report = Report(args.adapters, str(cores["base"].dtype).removeprefix("torch."), args.num_prompts,
                        args.input_len, args.output_len, interleaved=True)
        warm = {kind: make_prompts(len(names), args.input_len, vocab, args.seed + 7) for kind in KINDS}
        interleaved_round(cores, -1, warm, names, 2, KINDS)             # warm-up: first-use costs stay out
        for k in range(args.rounds):
            prompts = {kind: make_prompts(args.num_prompts, args.input_len, vocab,
                                          args.seed + 1000 * (k + 1) + KINDS.index(kind)) for kind in KINDS}
            runs = interleaved_round(cores, k, prompts, names, args.output_len, KINDS if k % 2 == 0 else KINDS[::-1])
            report.runs += runs
            log.info("round %d: %s", k + 1, ", ".join(f"{r.kind} {r.wall:.2f} s" for r in runs))
    return report


def interleaved_round(cores: dict, k: int, prompts: dict, names: list[str], output_len: int, order) -> list[Run]:
    """One round of --interleave: both kinds' requests added, then one step of each engine in `order` until both
    are done. Runs carry wall (their steps' sum), prefill / decode seconds and steps, tokens."""
    from .engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    runs = {kind: Run(kind, k, 0.0) for kind in order}
    for kind in order:
        for i, ids in enumerate(prompts[kind]):
            adapter = names[i % len(names)] if kind == "adapted" else None
            cores[kind].add_request(GenerationRequest(f"{kind}-{k}-{i}", ids, params, adapter=adapter))
    prefill = {kind: False for kind in order}           # whether the engine's last step had a prompt chunk
    executes = {kind: cores[kind].runner.execute for kind in order}

    def noting(kind):
        def execute(scheduled, *args, **kwargs):
            prefill[kind] = any(c.length > 1 for c in scheduled.chunks)
            return executes[kind](scheduled, *args, **kwargs)
        return execute

    try:
        for kind in order:
            cores[kind].runner.execute = noting(kind)
        step_in_turn(cores, order, lambda kind, dt, outs: _count_step(runs[kind], dt, outs, prefill[kind]))
    finally:
        for kind in order:
            vars(cores[kind].runner).pop("execute", None)
    return [runs[kind] for kind in order]


def step_in_turn(cores: dict, order, on_step) -> None:
    """One step of each engine in `order` in turn until none has work; on_step(name, seconds, outputs) after each
    (the interleaved benches' loop: here and `bench_engine --interleave`)."""
    while any(cores[name].has_work() for name in order):
        for name in order:
            if cores[name].has_work():
                t0 = time.perf_counter()
                outs = cores[name].step()
                on_step(name, time.perf_counter() - t0, outs)


def _count_step(run: Run, dt: float, outs, prefill: bool) -> None:
    run.wall += dt
    run.output_tokens += sum(len(d.token_ids) for out in outs for d in out.deltas)
    if prefill:
        run.prefill_s, run.prefill_steps = run.prefill_s + dt, run.prefill_steps + 1
    else:
        run.decode_s, run.decode_steps = run.decode_s + dt, run.decode_steps + 1


def summarize(report: Report) -> Report:
    """Fill the paired ratios and the adapter shares from the runs."""
    by = {(r.kind, r.round): r for r in report.runs}
    report.round_ratios = [by[("base", k)].wall / by[("adapted", k)].wall
                           for k in sorted({r.round for r in report.runs})
                           if ("base", k) in by and ("adapted", k) in by]
    adapted = [r for r in report.runs if r.kind == "adapted"]
    if report.round_ratios:
        report.paired_ratio = statistics.median(report.round_ratios)
    if adapted:
        report.adapter_share = statistics.median(r.adapter_s / r.wall for r in adapted)
        report.kernel_share = statistics.median(r.kernel_s / r.wall for r in adapted)
    return report


def _median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.wall)[(len(runs) - 1) // 2]


def print_report(rep: Report) -> None:
    print(f"mtlora-bench paired: {rep.adapters} vs bare base, {rep.num_prompts} x {rep.input_len} tokens in, "
          f"{rep.output_len} out, {rep.dtype}, one process, {len(rep.round_ratios)} rounds"
          + (", two engines stepped in turn" if rep.interleaved else ""))
    print(f"{'kind':<9}{'wall s':>8}{'prefill s':>11}{'decode s':>10}{'adapter s':>11}{'kernel s':>10}"
          f"{'attention s':>13}{'GEMMs s':>9}{'tok/s':>8}  every run (s)")
    for kind in KINDS:
        runs = [r for r in rep.runs if r.kind == kind]
        if not runs:
            continue
        m = _median_run(runs)
        print(f"{kind:<9}{m.wall:>8.2f}{m.prefill_s:>11.2f}{m.decode_s:>10.2f}{m.adapter_s:>11.3f}"
              f"{m.kernel_s:>10.3f}{m.attention_s:>13.3f}{m.gemm_s:>9.2f}{m.output_tokens / m.wall:>8.1f}  "
              + " ".join(f"{r.wall:.2f}" for r in runs))
    print("per round, base / adapted: " + " ".join(f"{x:.3f}" for x in rep.round_ratios))
    print(f"paired ratio (median of rounds): {rep.paired_ratio:.3f}x")
    if rep.interleaved:
        print("adapter work: not timed (--interleave times whole steps)")
        return
    print(f"adapter work: {100 * rep.adapter_share:.1f}% of the adapted runs' wall time (the C++ kernel "
          f"{100 * rep.kernel_share:.1f}%, the Python around it {100 * (rep.adapter_share - rep.kernel_share):.1f}%)"
          f" -> {1 - rep.adapter_share:.3f}x on a quiet host, adapter work alone")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rep = measure(args)
    print_report(rep)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(asdict(rep), indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
