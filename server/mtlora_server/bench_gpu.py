"""`mtlora-bench gpu`: one prepared command that proves the CUDA path and measures the 7B-shaped numbers.

Contract:
- Items (each time-boxed by its own budget; an item that raises is recorded as "error" and the rest continue):
  1. `kernel`  Triton MoLoRA kernel == the reference forward (`mtlora.grouped` per slot) over random slot
     layouts (ranks, experts, groups, empty slots, base-only rows), fp32 / bf16 / fp16 (tolerances in
     `bench_gpu_kernel.TOLERANCES`), the in-place add into a strided (fused) target, routing statistics, a
     CUDA-graph capture + replay with new tile metadata, and a small tile-size sweep on the device whose winners
     (the "tile_table") are installed for items 2-4 and written to the report.
  2. `engine`  engine on CUDA == the CPU reference (`mtlora.reference`) on one random small LLaMA: fp32 prompt
     logprobs within 1e-3, greedy tokens equal; mixed-adapter batch == serial; prefix-cache hit == miss.
  3. `graphs`  `EngineArgs(enforce_eager=False)` vs `enforce_eager=True` in bf16: identical greedy tokens and
     sampled-token logprobs within bf16 tolerance, over batch sizes across bucket edges, with adapters swapped
     between rounds; reports whether the engine actually captured graphs (looked up defensively).
  4. `perf`    LLaMA-2-7B-shaped bf16 random weights built on the device: decode step time at batch 1/16/64/256
     vs the bandwidth bound, prefill tokens/s vs the bf16 matmul peak, mtLoRA overhead vs the base.
- Output: one JSON report (`--output`; the directory is created) and a human-readable table on stdout. Exit code
  0 when no item failed or errored (skipped items do not fail the run), 1 otherwise.
- `--dry-run`: tiny shapes, the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported: the
  process re-executes itself when triton was already imported without it), CUDA-only checks skipped with their
  reason; items 2-4 run at toy size on CPU so every code path of the script is exercised. CI runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

ITEMS = ("kernel", "engine", "graphs", "perf")
# Seconds per item on the device (dry run: the CPU budgets). The whole run must stay under 8 minutes.
# Item 1 is mostly Triton compiles (a few seconds each on the device; see bench_gpu_kernel._shapes).
BUDGETS = {"kernel": 130.0, "engine": 80.0, "graphs": 80.0, "perf": 150.0}
# The dry run (CI) is about running every sub-step, not about time: generous budgets, so a busy CI machine does
# not cut checks (about a minute on an idle laptop CPU).
DRY_BUDGETS = {"kernel": 300.0, "engine": 300.0, "graphs": 300.0, "perf": 300.0}
TOTAL_SECONDS, RESERVE_PER_ITEM = 450.0, 25.0   # the whole run's deadline; time kept back for each later item
DRY_TOTAL_SECONDS = 1500.0


@dataclass
class Budget:
    """A deadline for one item: sub-steps check `left()` and stop early (recording that they did)."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def spent(self) -> bool:
        return self.left() <= 0


@dataclass
class ItemResult:
    """One item's outcome. status: pass | fail | error | skipped | incomplete. `checks`: name -> bool (all must hold for
    pass); `metrics`: the numbers; `targets`: what the checks compare against, in words."""

    name: str
    status: str = "skipped"        # "incomplete": its checks held, but the budget cut sub-steps (not a pass)
    reason: str = ""
    targets: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    truncated: bool = False        # the budget ran out before every sub-step ran

    def finish(self) -> "ItemResult":
        if self.status == "skipped" and self.checks:
            self.status = "pass" if all(self.checks.values()) else "fail"
        if self.status == "pass" and self.truncated:
            self.status = "incomplete"
            self.reason = "the budget ran out before every sub-step ran (the checks that ran held)"
        if self.status == "fail" and not self.reason:
            self.reason = "failed checks: " + ", ".join(k for k, v in self.checks.items() if not v)
        return self


@dataclass
class Context:
    """What every item gets: the run mode, the device, the item's budget, a seed and a scratch directory."""

    dry_run: bool
    device: str                  # "cuda" or "cpu"
    budget: Budget
    seed: int
    workdir: Path
    shared: dict = field(default_factory=dict)   # results later items use (e.g. the tuned tile table)


def environment() -> dict:
    """Versions and the device, so a report says what it was measured on."""
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cuda_available": torch.cuda.is_available(), "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   sm_count=p.multi_processor_count, cuda=torch.version.cuda)
    return env


def _item_functions() -> dict[str, Callable[[Context, ItemResult], None]]:
    from . import bench_gpu_engine, bench_gpu_kernel, bench_gpu_perf
    return {"kernel": bench_gpu_kernel.run, "engine": bench_gpu_engine.run_engine,
            "graphs": bench_gpu_engine.run_graphs, "perf": bench_gpu_perf.run}


def run_item(name: str, fn, ctx_kw: dict, budget_s: float, shared: dict) -> ItemResult:
    res = ItemResult(name)
    ctx = Context(budget=Budget(budget_s), shared=shared, **ctx_kw)
    t0 = time.monotonic()
    log.info("item %s: start (budget %.0f s)", name, budget_s)
    try:
        fn(ctx, res)
    except Exception as exc:   # an item's failure is recorded; the others still run
        res.status, res.reason = "error", f"{type(exc).__name__}: {exc}"
        res.metrics["traceback"] = traceback.format_exc()[-3000:]
        log.error("item %s raised: %s", name, res.reason)
    finally:
        res.seconds = round(time.monotonic() - t0, 2)
        if ctx.device == "cuda":
            import torch
            torch.cuda.empty_cache()
    return res.finish()


def run(args) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    workdir = Path(args.workdir or (Path(os.environ.get("TMPDIR", "/tmp")) / f"mtlora-bench-gpu-{os.getpid()}"))
    workdir.mkdir(parents=True, exist_ok=True)
    wanted = [i for i in ITEMS if i in args.items]
    budgets = DRY_BUDGETS if args.dry_run else BUDGETS
    fns, shared, results = _item_functions(), {}, []
    t0 = time.monotonic()
    deadline = t0 + (DRY_TOTAL_SECONDS if args.dry_run else TOTAL_SECONDS) * args.budget_scale
    for k, name in enumerate(wanted):
        if not cuda and not args.dry_run:
            results.append(ItemResult(name, reason="no CUDA device: run on a GPU, or --dry-run for the CPU "
                                                   "exercise of the script"))
            continue
        ctx_kw = dict(dry_run=args.dry_run, device=device, seed=args.seed, workdir=workdir)
        later = RESERVE_PER_ITEM * args.budget_scale * (len(wanted) - k - 1)
        budget = min(budgets[name] * args.budget_scale, deadline - time.monotonic() - later)
        if budget < 5:
            results.append(ItemResult(name, reason="skipped: the run's total time budget is spent", truncated=True))
            continue
        results.append(run_item(name, fns[name], ctx_kw, budget, shared))
    report = {"schema": "mtlora-bench-gpu/1", "dry_run": args.dry_run, "device": device,
              "environment": environment(), "wall_s": round(time.monotonic() - t0, 2),
              "items": {r.name: asdict(r) for r in results},
              "summary": {r.name: r.status for r in results}}
    # Without a GPU only the dry run can succeed: a real run that found no CUDA device proves nothing.
    report["ok"] = all(r.status in ("pass", "skipped") for r in results) and (cuda or args.dry_run)
    return report


def table(report: dict) -> str:
    """The human-readable summary: one line per item, then its key metrics."""
    lines = [f"mtlora-bench gpu  device={report['device']}  dry_run={report['dry_run']}  "
             f"wall={report['wall_s']}s  gpu={report['environment'].get('gpu', '-')}",
             f"{'item':8} {'status':8} {'secs':>7}  reason / checks"]
    for name, item in report["items"].items():
        checks = " ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in item["checks"].items())
        lines.append(f"{name:8} {item['status']:8} {item['seconds']:7.1f}  {item['reason'] or checks}"
                     + ("  [budget ran out]" if item["truncated"] else ""))
        for k, v in item["metrics"].get("table", {}).items():
            lines.append(f"{'':17}  {k}: {v}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtlora-bench gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=None, help="write the JSON report here (parent directories are created); "
                   "when $OUT is set a copy also lands in $OUT")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, Triton interpreter, CUDA-only "
                   "checks skipped with their reason (CI)")
    p.add_argument("--items", default=",".join(ITEMS), type=lambda s: [x for x in s.split(",") if x],
                   help=f"comma-separated subset of {','.join(ITEMS)} (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random model, adapter and layout")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every item's time budget")
    p.add_argument("--workdir", default=None, help="scratch directory for the small model and adapters")
    p.add_argument("--quiet", action="store_true", help="only warnings in the log")
    return p


def _outputs(output: str | None) -> list[Path]:
    """--output, and a copy in $OUT (the device runner's return folder) when that is set and elsewhere."""
    paths = [Path(output)] if output else []
    if os.environ.get("OUT"):
        in_out = Path(os.environ["OUT"]) / (paths[0].name if paths else "mtlora-bench-gpu.json")
        if not paths or paths[0].resolve() != in_out.resolve():
            paths.append(in_out)
    return paths


def _needs_reexec(args) -> bool:
    """The dry run needs TRITON_INTERPRET=1 before triton is imported; re-exec when it is too late."""
    if not args.dry_run or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if "triton" in sys.modules:
        return True
    os.environ["TRITON_INTERPRET"] = "1"
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [i for i in args.items if i not in ITEMS]
    if bad or not args.items:
        print(f"mtlora-bench gpu: --items: unknown {bad or 'empty'}; choose from {','.join(ITEMS)}", file=sys.stderr)
        return 2
    if args.budget_scale <= 0:
        print("mtlora-bench gpu: --budget-scale must be positive", file=sys.stderr)
        return 2
    if _needs_reexec(args):
        env = dict(os.environ, TRITON_INTERPRET="1")
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.call([sys.executable, "-m", "mtlora_server.bench_gpu", *argv], env=env)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(args)
    text = json.dumps(report, indent=2, default=str)
    for out in _outputs(args.output):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        log.info("report written to %s", out)
    print(table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
