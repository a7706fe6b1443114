"""Item 1 of `mtlora-bench gpu`: the Triton MoLoRA kernel against the reference forward.

Contract:
- `random_site(...)` builds one site's stacked slot tensors (the `lora_ops` layout) with per-slot rank, experts
  and routing groups drawn at random below the maxima, zero padding beyond them, and some empty slots (nothing
  loaded: every tensor zero, `nexp` 0); `random_layout` draws each token's slot among loaded slots, empty slots
  and -1 (base), with base-only batches among the cases.
- The reference (`reference_delta`) is the engine's CPU path `mtlora.grouped` (itself tested against the oracle
  `mtlora.adapters.MoLoRA`) per slot, trimmed to the slot's own r / N / g, in fp32 on the CPU.
- Parity: the kernel output vs the reference computed in fp32 on the same (already rounded) weights and inputs.
  Error measure: max |got - ref| / max(1, max |ref|). Tolerances (`TOLERANCES`): fp32 1e-5, bf16 2e-2, fp16 5e-3.
  Also checked: base rows and empty-slot rows untouched (exactly), the in-place add into a strided column view
  (a fused projection output), routing statistics == the torch path's (fp32).
- `bench_gpu_tune`: a CUDA-graph capture of `molora_add_` replayed after new tile metadata was copied into the
  captured buffer (must equal the reference: the kernels are graph-capturable), and a tile-size sweep on the
  7B-shaped FFN block site (d 4096, N 16, r 16, g 2, 8 slots) for step sizes T; the fastest config per T (that
  also passes parity) forms the "tile_table", installed for the later items and written to the report. In the
  dry run both run at toy size without capture and with meaningless timings (code exercised, nothing measured).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger(__name__)

TOLERANCES = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SiteTensors:
    """One site's stacked slots (lora_ops layout) plus the kernels' `nexp`."""

    A: torch.Tensor            # [S, r_max, d_in]
    B: torch.Tensor            # [S, N_max, r_max, d_out]
    R: torch.Tensor            # [S, g_max, N_max, d_in]
    expert_mask: torch.Tensor  # [S, N_max] bool
    groups: torch.Tensor       # [S] long
    scaling: torch.Tensor      # [S] fp32
    nexp: torch.Tensor         # [S] int32
    loaded: list[int]          # slots holding an adapter (the others are empty)
    dims: dict[int, tuple[int, int, int]]   # loaded slot -> (r, N, g)

    def stacked(self) -> tuple:
        return self.A, self.B, self.R, self.expert_mask, self.groups, self.scaling

    def to(self, device, dtype) -> "SiteTensors":
        f = lambda t: t.to(device, dtype)   # noqa: E731
        return SiteTensors(f(self.A), f(self.B), f(self.R), self.expert_mask.to(device), self.groups.to(device),
                           self.scaling.to(device), self.nexp.to(device), self.loaded, self.dims)


def _divisor_groups(d_out: int, g_max: int, gen: torch.Generator) -> int:
    options = [g for g in range(1, g_max + 1) if d_out % g == 0]
    return options[int(torch.randint(0, len(options), (1,), generator=gen))]


def random_site(S: int, r_max: int, n_max: int, g_max: int, d_in: int, d_out: int, seed: int,
                n_empty: int = 1, fixed: tuple[int, int, int] | None = None) -> SiteTensors:
    """Random slots in fp32 on the CPU; `fixed` = (r, N, g) for every loaded slot (benchmarks), else random."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.zeros(S, r_max, d_in)
    B = torch.zeros(S, n_max, r_max, d_out)
    R = torch.zeros(S, g_max, n_max, d_in)
    mask = torch.zeros(S, n_max, dtype=torch.bool)
    groups, scaling = torch.ones(S, dtype=torch.long), torch.zeros(S)
    empty = set(torch.randperm(S, generator=gen)[:n_empty].tolist())
    loaded = [s for s in range(S) if s not in empty]
    dims = {}
    for s in loaded:
        if fixed is None:
            r = int(torch.randint(1, r_max + 1, (1,), generator=gen))
            n = int(torch.randint(1, n_max + 1, (1,), generator=gen))
            g = _divisor_groups(d_out, g_max, gen) if n > 1 else 1
        else:
            r, n, g = fixed
        A[s, :r] = torch.randn(r, d_in, generator=gen) / d_in ** 0.5
        B[s, :n, :r] = torch.randn(n, r, d_out, generator=gen) / r ** 0.5
        if n > 1:
            R[s, :g, :n] = torch.randn(g, n, d_in, generator=gen) / d_in ** 0.5 * 2
        mask[s, :n] = True
        groups[s], scaling[s] = g, float(torch.rand(1, generator=gen)) + 0.5
        dims[s] = (r, n, g)
    return SiteTensors(A, B, R, mask, groups, scaling, mask.sum(1).to(torch.int32), loaded, dims)


def reference_delta(x: torch.Tensor, idx: torch.Tensor, site: SiteTensors, stats=None) -> torch.Tensor:
    """[T, d_out] fp32 on the CPU: per loaded slot, `mtlora.grouped` on its tokens (empty slots and -1: zero).
    With `stats` (RoutingStats), records each slot's routing weights as the engine's CPU path does."""
    from mtlora import grouped

    site = site.to("cpu", torch.float32)
    x, idx = x.float().cpu(), idx.cpu()
    out = torch.zeros(x.shape[0], site.B.shape[3])
    for s in site.loaded:
        rows = (idx == s).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        r, N, g = site.dims[s]
        p = grouped.pack([grouped.SiteWeights(site.A[s, :r], site.B[s, :N, :r], site.R[s, :g, :N] if N > 1 else None,
                                              float(site.scaling[s]))])
        delta, w = grouped.expand(grouped.shrink(x[rows], p), p.parts[0])
        out[rows] = delta
        if stats is not None:
            w = torch.ones(rows.numel(), g, 1) if w is None else w
            w = torch.nn.functional.pad(w, (0, site.B.shape[1] - N))                   # [n, g, N_max]
            stats.record(torch.full((rows.numel(),), s, dtype=torch.long), w, site.groups, site.expert_mask)
    return out


def random_layout(T: int, S: int, seed: int, base_only: bool = False) -> torch.Tensor:
    """[T] slot per token among all slots (loaded and empty) and -1; sorted runs and shuffles alike."""
    gen = torch.Generator().manual_seed(seed)
    if base_only:
        return torch.full((T,), -1, dtype=torch.long)
    idx = torch.randint(-1, S, (T,), generator=gen)
    if seed % 2:                                   # half the layouts grouped by slot, as the runner lays them out
        idx = torch.sort(idx).values
    return idx


def parity_case(site: SiteTensors, idx: torch.Tensor, dtype: torch.dtype, device: str, seed: int,
                cfg=None, stats: bool = False) -> dict:
    """One comparison; returns the measured errors and flags (the caller checks them against TOLERANCES)."""
    from .engine.lora_ops import RoutingStats
    from .engine.triton_molora import build_tiles, molora_add_, tile_config

    T, d_in, d_out = idx.numel(), site.A.shape[2], site.B.shape[3]
    gen = torch.Generator().manual_seed(seed)
    dev = site.to(device, dtype)
    x = torch.randn(T, d_in, generator=gen).to(device, dtype)                     # x: [T, d_in]
    eff = torch.where((idx >= 0) & (site.nexp[idx.clamp_min(0)] > 0), idx, -1)    # empty slots act as base
    st_ref = RoutingStats() if stats else None
    ref = reference_delta(x, idx, site, st_ref)                                  # fp32 on the rounded inputs
    # The fused-target path: a column view of a wider output with random contents; the kernel adds in place.
    fused = (torch.randn(T, d_out + 24, generator=gen) * 0.5).to(device, dtype)
    before = fused.clone()
    target = fused[:, 8:8 + d_out]
    cfg = cfg or tile_config(T, dtype)
    tiles = build_tiles(idx, cfg.bt, site.A.shape[0], device)
    st = RoutingStats() if stats else None
    molora_add_(x, tiles, dev.A, dev.B, dev.R, dev.nexp, dev.groups, dev.scaling, target, cfg, stats=st,
                expert_mask=dev.expert_mask)
    got = (fused[:, 8:8 + d_out].float() - before[:, 8:8 + d_out].float()).cpu()
    scale = max(1.0, float(ref.abs().max())) if T else 1.0
    base = (eff == -1).cpu()
    out = {"T": T, "dtype": str(dtype).removeprefix("torch."), "d_in": d_in, "d_out": d_out,
           "adapter_rows": int((~base).sum()), "err": float((got - ref).abs().max()) / scale if T else 0.0,
           "ref_max": float(ref.abs().max()) if T else 0.0,
           "base_rows_untouched": bool(torch.equal(fused[base.to(fused.device)], before[base.to(fused.device)])),
           "outside_columns_untouched": bool(torch.equal(fused[:, :8], before[:, :8])
                                            and torch.equal(fused[:, 8 + d_out:], before[:, 8 + d_out:]))}
    if stats:
        out["stats_err"] = max(_diff(st.weight_sum, st_ref.weight_sum), _diff(st.count, st_ref.count),
                               _diff(st.entropy_sum, st_ref.entropy_sum))
    return out


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| after zero-padding both to the same shape (stats buffers grow on first use)."""
    a, b = (t.cpu()[:, None] if t.dim() == 1 else t.cpu() for t in (a, b))
    S, N = max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, N - t.shape[1], 0, S - t.shape[0]))   # noqa: E731
    return float((pad(a) - pad(b)).abs().max()) if S * N else 0.0


def _shapes(dry: bool) -> list[dict]:
    """Site shapes: (S slots, r_max, N_max, g_max, d_in, d_out) and the token counts tried."""
    if dry:
        return [dict(S=5, r_max=16, n_max=4, g_max=3, d_in=40, d_out=24, Ts=[1, 5, 19]),
                dict(S=4, r_max=8, n_max=8, g_max=2, d_in=64, d_out=80, Ts=[7])]
    # Few distinct shapes / tile-table entries: every (shape, dtype, tile config) is one Triton compile. The 7B
    # FFN shape is covered by the tile sweep, whose winners are parity-checked there.
    return [dict(S=8, r_max=16, n_max=16, g_max=4, d_in=512, d_out=768, Ts=[1, 33]),
            dict(S=6, r_max=12, n_max=5, g_max=3, d_in=352, d_out=1176, Ts=[17, 200])]


def run_parity(ctx, res) -> list[dict]:
    cases, k = [], 0
    for sh in _shapes(ctx.dry_run):
        site = random_site(sh["S"], sh["r_max"], sh["n_max"], sh["g_max"], sh["d_in"], sh["d_out"], ctx.seed + k)
        for dname, dtype in DTYPES.items():
            for T in sh["Ts"] + [3]:
                if ctx.budget.left() < 5:
                    res.truncated = True
                    return cases
                base_only = T == 3                                                 # one base-only batch per shape
                idx = random_layout(T, sh["S"], ctx.seed + k, base_only=base_only)
                c = parity_case(site, idx, dtype, ctx.device, ctx.seed + k, stats=dname == "float32")
                c["ok"] = (c["err"] <= TOLERANCES[dname] and c["base_rows_untouched"]
                           and c["outside_columns_untouched"] and c.get("stats_err", 0.0) <= 1e-4)
                cases.append(c)
                k += 1
    return cases


def run(ctx, res) -> None:
    from .engine import triton_molora

    res.targets = {"tolerance_max_abs_err_over_max(1,|ref|)": TOLERANCES, "stats_err": 1e-4,
                   "base_rows": "untouched (bitwise)", "graph_replay": "== reference after new metadata"}
    if not triton_molora.available():
        res.status, res.reason = "skipped", "triton is not installed"
        return
    if ctx.device != "cuda" and not triton_molora.interpreter_enabled():
        res.status, res.reason = "skipped", "no CUDA device and TRITON_INTERPRET is not 1"
        return
    cases = run_parity(ctx, res)
    res.metrics["cases"] = cases
    res.checks["parity_all_cases"] = bool(cases) and all(c["ok"] for c in cases)
    res.checks["nontrivial"] = any(c["ref_max"] > 0.1 for c in cases)
    res.metrics["table"] = {f"max err {d}": f"{max((c['err'] for c in cases if c['dtype'] == d), default=0):.2e} "
                            f"(tol {TOLERANCES[d]:.0e}, {sum(c['dtype'] == d for c in cases)} cases)"
                            for d in DTYPES}
    from .bench_gpu_tune import graph_replay_check, sweep_tiles
    graph = graph_replay_check(ctx)          # dry run: no capture (needs CUDA), the buffer swap still checked
    res.metrics["graph_replay"] = graph
    res.checks["graph_replay" if graph["captured"] else "metadata_swap_replay"] = graph["ok"]
    sweep = sweep_tiles(ctx, res)
    res.metrics["tile_sweep"] = sweep
    if sweep.get("table"):
        ctx.shared["tile_table"] = sweep["table"]
        res.metrics["tile_table"] = [[m, asdict(c)] for m, c in sweep["table"]]
        res.metrics["table"]["tile table"] = "; ".join(f"T<={m}: {asdict(c)}" for m, c in sweep["table"])
        triton_molora.set_tile_table(sweep["table"])
    log.info("kernel item: %d parity cases in %.1f s", len(cases), time.monotonic() - ctx.budget.start)
