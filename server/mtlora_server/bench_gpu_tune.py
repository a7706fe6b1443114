"""CUDA-only parts of item 1 of `mtlora-bench gpu`: graph capture of the kernels, and the tile-size sweep.

Contract:
- `graph_replay_check(ctx)`: captures `triton_molora.molora_add_` for one step size in a `torch.cuda.CUDAGraph`,
  then for a few new random layouts copies the new tile metadata into the captured metadata buffer and new inputs
  into the captured input, replays, and compares with the reference. Passing proves the op does no host sync and
  reads its layout only from the step's metadata.
- `sweep_tiles(ctx, res)`: times candidate `TileConfig`s (CUDA events, median of a few runs) on the 7B-shaped FFN
  block site (d 4096 -> 4096, 8 slots of N 16, r 16, g 2, every token on its own adapter among the 8) at step
  sizes T; the fastest candidate per T that also passes parity (bf16 tolerance) becomes that T's entry of the
  table. Returns {"T": {config: ms}, "table": [(max_T, TileConfig)], "parity": ...}.
"""

from __future__ import annotations

import logging
import statistics

import torch

log = logging.getLogger(__name__)

SWEEP_T = (1, 16, 64, 256, 2048)
# Table boundaries: a step of T tokens uses the entry of the smallest swept T' >= T (the last covers all).
# Each candidate costs two Triton compiles on the device (seconds each), so the list stays short.
CANDIDATES = [dict(bt=16, bk=64, ksplit=8, bko=64, num_warps=4), dict(bt=16, bk=128, ksplit=16, bko=64, num_warps=4),
              dict(bt=16, bk=64, ksplit=2, bko=128, num_warps=4), dict(bt=32, bk=64, ksplit=4, bko=64, num_warps=4),
              dict(bt=64, bk=64, ksplit=1, bko=64, num_warps=4), dict(bt=64, bk=32, ksplit=1, bko=128, num_warps=8)]


def _time_ms(fn, reps: int = 10) -> float:
    """Median CUDA-event time of fn() in ms (after one warm-up call, which also compiles)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_replay_check(ctx) -> dict:
    from .bench_gpu_kernel import random_layout, random_site
    from .engine.lora_ops import molora_reference
    from .engine.triton_molora import build_tiles, molora_add_, tile_config

    S, T, d = 8, 48, 512
    site = random_site(S, 16, 8, 2, d, d, ctx.seed + 101)
    dev = site.to("cuda", torch.float32)
    cfg = tile_config(T, torch.float32)
    x = torch.zeros(T, d, device="cuda")                                         # the captured input
    out = torch.zeros(T, d, device="cuda")                                       # the captured output
    tiles = build_tiles(random_layout(T, S, ctx.seed), cfg.bt, S, "cuda")
    call = lambda: molora_add_(x, tiles, dev.A, dev.B, dev.R, dev.nexp, dev.groups, dev.scaling, out, cfg)  # noqa
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()                                                                   # compile + warm up off-graph
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    errs = []
    for k in range(4):
        idx = random_layout(T, S, ctx.seed + 200 + k, base_only=k == 3)
        new = build_tiles(idx, cfg.bt, S, "cuda")
        tiles.meta.copy_(new.meta)                                               # same buffer, new layout
        x.copy_(torch.randn(T, d, generator=torch.Generator().manual_seed(k)).cuda())
        out.zero_()
        graph.replay()
        eff = torch.where((idx >= 0) & (site.nexp[idx.clamp_min(0)] > 0), idx, -1)
        ref = molora_reference(x.cpu(), eff, *site.stacked())
        errs.append(float((out.cpu() - ref).abs().max()) / max(1.0, float(ref.abs().max())))
    return {"T": T, "replays": len(errs), "max_err": max(errs), "ok": max(errs) <= 1e-5}


def _site_7b(seed: int):
    from .bench_gpu_kernel import random_site
    return random_site(8, 16, 16, 2, 4096, 4096, seed, n_empty=0, fixed=(16, 16, 2)).to("cuda", torch.bfloat16)


def sweep_tiles(ctx, res) -> dict:
    from .bench_gpu_kernel import TOLERANCES, parity_case, random_site
    from .engine.triton_molora import TileConfig, build_tiles, molora_add_

    dev = _site_7b(ctx.seed)
    cands = [TileConfig(**c) for c in CANDIDATES]
    timings: dict[str, dict[str, float]] = {}
    best: dict[int, TileConfig] = {}
    for T in SWEEP_T:
        if ctx.budget.left() < 15:
            res.truncated = True
            break
        x = torch.randn(T, 4096, device="cuda", dtype=torch.bfloat16)
        out = torch.zeros(T, 4096, device="cuda", dtype=torch.bfloat16)
        idx = torch.arange(T) % 8                                                # every token its own adapter
        row = {}
        for cfg in cands:
            if ctx.budget.left() < 10:
                res.truncated = True
                break
            tiles = build_tiles(idx, cfg.bt, 8, "cuda")
            try:
                row[str(cfg)] = _time_ms(lambda: molora_add_(x, tiles, dev.A, dev.B, dev.R, dev.nexp, dev.groups,
                                                             dev.scaling, out, cfg))
            except Exception as exc:   # a config that does not compile on this GPU (e.g. shared memory) is skipped
                row[str(cfg)] = f"{type(exc).__name__}: {str(exc)[:120]}"
        timings[str(T)] = row
        ranked = sorted((v, c) for c, v in zip(map(str, cands), cands) if isinstance(row.get(c), float)
                        for v in [row[c]])
        # The fastest that also passes parity on a small random layout in bf16.
        small = random_site(8, 16, 16, 2, 4096, 4096, ctx.seed + 7)
        for _, cfg in ranked:
            case = parity_case(small, torch.arange(min(T, 96)) % 9 - 1, torch.bfloat16, "cuda", ctx.seed, cfg=cfg)
            if case["err"] <= TOLERANCES["bfloat16"] and case["base_rows_untouched"]:
                best[T] = cfg
                break
    table = []
    for i, T in enumerate(sorted(best)):
        last = i == len(best) - 1
        table.append((1 << 62 if last else T, best[T]))
    return {"shape": "FFN block site d 4096->4096, 8 slots N=16 r=16 g=2, bf16, every token its own adapter",
            "ms": timings, "table": table}
