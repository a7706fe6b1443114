"""CUDA-only parts of item 1 of `mtlora-bench gpu`: graph capture of the kernels, and the tile-size sweep.

Contract:
- Both also run in the dry run (CPU, interpreter, toy sizes, no graph: the same buffers are re-read eagerly),
  so their code is exercised in CI; only there the capture and the timings are skipped / meaningless.
- `graph_replay_check(ctx)`: captures `triton_molora.molora_add_` for one step size in a `torch.cuda.CUDAGraph`,
  then for a few new random layouts copies the new tile metadata into the captured metadata buffer and new inputs
  into the captured input, replays, and compares with the reference. Passing proves the op does no host sync and
  reads its layout only from the step's metadata.
- `sweep_tiles(ctx, res)`: times candidate `TileConfig`s (device time: a CUDA graph of 20 calls, CUDA events,
  median of a few replays) on the 7B-shaped FFN
  block site (d 4096 -> 4096, 8 slots of N 16, r 16, g 2, every token on its own adapter among the 8) at step
  sizes T; the fastest candidate per T that also passes parity (bf16 tolerance) becomes that T's entry of the
  table. Returns {"T": {config: ms}, "table": [(max_T, TileConfig)], "parity": ...}.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

log = logging.getLogger(__name__)

SWEEP_T = (1, 16, 64, 256, 2048)
# Table boundaries: a step of T tokens uses the entry of the smallest swept T' >= T (the last covers all).
# Each candidate costs two Triton compiles on the device (seconds each), so the list stays short.
CANDIDATES = [dict(bt=16, bk=64, ksplit=8, bko=64, num_warps=4), dict(bt=16, bk=128, ksplit=16, bko=64, num_warps=4),
              dict(bt=16, bk=64, ksplit=2, bko=128, num_warps=4), dict(bt=32, bk=64, ksplit=4, bko=64, num_warps=4),
              dict(bt=64, bk=64, ksplit=1, bko=64, num_warps=4), dict(bt=64, bk=32, ksplit=1, bko=128, num_warps=8)]


def capture_graph(fn, calls: int = 1) -> "torch.cuda.CUDAGraph":
    """`calls` calls of fn() captured in one CUDA graph, after a warm-up call on a side stream (allocator, cuBLAS
    handles and Triton compiles happen outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def _time_ms(fn, reps: int = 5, calls: int = 20) -> float:
    """Device time of one fn() call in ms after a warm-up call (which also compiles): on CUDA, `calls` calls are
    captured in one CUDA graph and the replay is timed with CUDA events (median of `reps`, divided by `calls`).
    Timing single eager calls measured the host's launch overhead instead (the first H200 run: every candidate
    ~0.1 ms at every T, while the profiler put the shrink kernel alone at 52 us for T = 64). perf_counter in the
    dry run (interpreter timings mean nothing; the dry run only exercises the code)."""
    fn()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    graph = capture_graph(fn, calls)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del graph
    return statistics.median(times)


def graph_replay_check(ctx) -> dict:
    from .bench_gpu_kernel import random_layout, random_site, reference_delta
    from .engine.triton_molora import build_tiles, molora_add_, tile_config

    dev_name = ctx.device
    S, T, d = (4, 20, 48) if ctx.dry_run else (8, 48, 512)
    site = random_site(S, 16, 8, 2, d, d, ctx.seed + 101)
    dev = site.to(dev_name, torch.float32)
    cfg = tile_config(T, torch.float32)
    x = torch.zeros(T, d, device=dev_name)                                       # the captured input
    out = torch.zeros(T, d, device=dev_name)                                     # the captured output
    tiles = build_tiles(random_layout(T, S, ctx.seed), cfg.bt, S, dev_name)
    call = lambda: molora_add_(x, tiles, dev.A, dev.B, dev.R, dev.nexp, dev.groups, dev.scaling, out, cfg)  # noqa
    replay = call                                    # dry run: no graph; the same buffers are re-read eagerly
    if dev_name == "cuda":
        replay = capture_graph(call).replay                                      # compiles + warms up off-graph
    errs = []
    for k in range(4):
        idx = random_layout(T, S, ctx.seed + 200 + k, base_only=k == 3)
        new = build_tiles(idx, cfg.bt, S, dev_name)
        tiles.meta.copy_(new.meta)                                               # same buffer, new layout
        x.copy_(torch.randn(T, d, generator=torch.Generator().manual_seed(k)).to(dev_name))
        out.zero_()
        replay()
        ref = reference_delta(x, idx, site)
        errs.append(float((out.cpu() - ref).abs().max()) / max(1.0, float(ref.abs().max())))
    return {"T": T, "replays": len(errs), "max_err": max(errs), "ok": max(errs) <= 1e-5,
            "captured": dev_name == "cuda"}


def sweep_tiles(ctx, res) -> dict:
    from .bench_gpu_kernel import TOLERANCES, parity_case, random_site
    from .engine.triton_molora import TileConfig, build_tiles, molora_add_

    # The 7B FFN block site; the dry run sweeps a toy site and two candidates to exercise the code.
    d, cands, sweep_t = (48, CANDIDATES[:2], (1, 20)) if ctx.dry_run else (4096, CANDIDATES, SWEEP_T)
    site = random_site(8, 16, 16, 2, d, d, ctx.seed + 7, n_empty=0, fixed=(16, 16, 2))
    dev = site.to(ctx.device, torch.bfloat16)
    cands = [TileConfig(**c) for c in cands]
    timings: dict[str, dict[str, float]] = {}
    best: dict[int, TileConfig] = {}
    for T in sweep_t:
        if ctx.budget.left() < 15:
            res.truncated = True
            break
        x = torch.randn(T, d, device=ctx.device, dtype=torch.bfloat16)
        out = torch.zeros(T, d, device=ctx.device, dtype=torch.bfloat16)
        idx = torch.arange(T) % 8                                                # every token its own adapter
        row = {}
        for cfg in cands:
            if ctx.budget.left() < 10:
                res.truncated = True
                break
            tiles = build_tiles(idx, cfg.bt, 8, ctx.device)
            try:
                row[str(cfg)] = _time_ms(lambda: molora_add_(x, tiles, dev.A, dev.B, dev.R, dev.nexp, dev.groups,
                                                             dev.scaling, out, cfg))
            except Exception as exc:   # a config that does not compile on this GPU (e.g. shared memory) is skipped
                row[str(cfg)] = f"{type(exc).__name__}: {str(exc)[:120]}"
        timings[str(T)] = row
        timed = [(row[str(cfg)], k, cfg) for k, cfg in enumerate(cands) if isinstance(row.get(str(cfg)), float)]
        ranked = [(ms, cfg) for ms, _, cfg in sorted(timed, key=lambda e: e[:2])]       # fastest first
        # The fastest that also passes parity (bf16) on a layout with base rows, on the same site.
        for _, cfg in ranked:
            case = parity_case(site, torch.arange(min(T, 96)) % 9 - 1, torch.bfloat16, ctx.device, ctx.seed,
                               cfg=cfg)
            if case["err"] <= TOLERANCES["bfloat16"] and case["base_rows_untouched"]:
                best[T] = cfg
                break
    table = []
    for i, T in enumerate(sorted(best)):
        last = i == len(best) - 1
        table.append((1 << 62 if last else T, best[T]))
    return {"shape": f"FFN block site d {d}->{d}, 8 slots N=16 r=16 g=2, bf16, every token its own adapter",
            "ms": timings, "table": table, **({"note": "dry run: interpreter timings mean nothing"}
                                              if ctx.dry_run else {})}
