"""The Triton MoLoRA kernels against `molora_reference`: on CPU through the Triton interpreter, on CUDA for real.

The interpreter check runs in a subprocess with TRITON_INTERPRET=1 set before triton is imported (the flag is read
at import time and must not leak into other tests). Sizes stay tiny (T <= 8, d <= 64): the interpreter is slow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from triton_interp import run_interpreted  # noqa: E402

# (site, tokens' slots) cases: heterogeneous mixes, slots that do not use the site, all-base, one token.
CASES = [
    ("mlp", [4, -1, 0, 0, 4, 3, 0, -1]),                     # mtlora g=3 + small mtlora + empty slot 3
    ("self_attn", [0, 0, 0, 0, 0, 0, 0, 0]),                 # one slot, full tile
    ("self_attn.q_proj", [1, 2, -1, 1, 2, 2, 0, 1]),         # hydralora g=4 + plain lora (0 does not use q)
    ("self_attn.v_proj", [2, 1, 1, -1, 1, 4, 1, 2]),         # v: d_out 24, hydralora g=2
    ("self_attn.o_proj", [-1, -1, -1]),                      # nobody: all zeros
    ("self_attn.o_proj", [2]),
]


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| of two stats buffers, zero-padded to one shape (buffers grow on first use: a path that records
    zero-weight padding rows has grown them where a path that records nothing has not)."""
    a, b = (t.cpu()[:, None] if t.dim() == 1 else t.cpu() for t in (a, b))
    S, N = max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, N - t.shape[1], 0, S - t.shape[0]))   # noqa: E731
    return float((pad(a) - pad(b)).abs().max()) if S * N else 0.0


def _run_cases(device: str, dtype=torch.float32) -> list[dict]:
    """Compare molora_triton with molora_reference (and the stats with the torch path's) for every case."""
    from test_lora_ops import ADAPTERS, CFG, _native, _oracles

    from molora_stacked import molora_reference, molora_torch
    from mtlora.inject import site_dims
    from mtlora_server.engine.lora_ops import AdapterSlots, RoutingStats
    from mtlora_server.engine.triton_molora import molora_triton

    oracles = _oracles()
    slots = AdapterSlots(CFG, max_adapters=6, max_rank=16, max_experts=8, max_groups=4, device=device)
    for slot, cfg in ADAPTERS.items():
        slots.load(slot, cfg, _native(oracles[slot]))
    results = []
    for n, (site, idx) in enumerate(CASES):
        d_in, _ = site_dims(CFG, site)
        users = torch.tensor([f"layers.0.{site}" in oracles.get(s, {}) for s in range(6)], device=device)
        idx = torch.tensor(idx, device=device)
        eff = torch.where((idx >= 0) & users[idx.clamp_min(0)], idx, -1)
        x = torch.randn(len(idx), d_in, generator=torch.Generator().manual_seed(n)).to(device, dtype)
        bufs = slots.buffers(0, site)
        ref = molora_reference(x, eff, *bufs)
        st_tri, st_torch = RoutingStats(), RoutingStats()
        got = molora_triton(x, eff, *bufs, stats=st_tri)
        molora_torch(x, eff, *bufs, stats=st_torch)
        results.append({
            "site": site, "dtype": str(got.dtype), "shape": list(got.shape),
            "max_err": float((got.float() - ref.float()).abs().max()) if got.numel() else 0.0,
            "ref_scale": float(ref.float().abs().max()) if ref.numel() else 0.0,
            "base_rows_zero": bool(torch.all(got[eff == -1] == 0)),
            "stats_err": max(_maxdiff(st_tri.weight_sum, st_torch.weight_sum),
                             _maxdiff(st_tri.entropy_sum, st_torch.entropy_sum),
                             _maxdiff(st_tri.count, st_torch.count)),
            "count": float(st_tri.count.sum()) if st_tri.count.numel() else 0.0,
            "expected_count": int((eff >= 0).sum()),
        })
    return results


# Step-planned path (`AdapterSlots._apply_triton`: tile metadata from the step's SlotPlan, deltas added in place
# into column views of one fused output): layouts with an empty slot (3), base rows, G > 1 (slot 0: g=3 at block
# level; slot 1: g=4 at q), an all-base step, and runs grouped by slot as the runner lays them out.
PLANNED = [(7, [0, 0, 3, -1, 1, 2, 4]), (1, [3]), (5, [-1, -1, -1, -1, -1]),
           (20, [0] * 6 + [1] * 5 + [2] * 3 + [3] * 2 + [4] * 3 + [-1]), (9, [4, 1, 0, 2, 0, 1, -1, 3, 4])]


def _run_planned(device: str) -> list[dict]:
    """`_apply_triton` (metadata from the plan) vs the CPU fused path (`apply_shared` with a plan), per group of
    sites sharing an input, both layers; routing stats too."""
    from test_lora_ops import ADAPTERS, CFG, SHARED, _native, _oracles

    from mtlora_server.engine.lora_ops import AdapterSlots, RoutingStats, SlotPlan

    oracles = _oracles()
    slots = AdapterSlots(CFG, max_adapters=6, max_rank=16, max_experts=8, max_groups=4, device=device)
    for slot, cfg in ADAPTERS.items():
        slots.load(slot, cfg, _native(oracles[slot]))
    results = []
    for n, (T, idx) in enumerate(PLANNED):
        idx = torch.tensor(idx, device=device)
        plan = SlotPlan(idx)
        for group, sites in SHARED.items():
            d_in = site_dims_of(CFG, sites[0])[0]
            widths = [site_dims_of(CFG, site)[1] for site in sites]
            x = torch.randn(T, d_in, generator=torch.Generator().manual_seed(n)).to(device)
            for layer in range(CFG.num_hidden_layers):
                fused = torch.randn(T, sum(widths), generator=torch.Generator().manual_seed(n + 50)).to(device)
                want = fused.clone()
                st_tri, st_cpu = RoutingStats(), RoutingStats()
                slots._apply_triton(layer, x, _targets(fused, sites, widths), plan, st_tri)
                slots.apply_shared(layer, x, _targets(want, sites, widths), idx, stats=st_cpu, plan=plan)
                results.append({"T": T, "group": group, "layer": layer,
                                "max_err": float((fused - want).abs().max()),
                                "ref_scale": float(want.abs().max()),
                                "stats_err": max(_maxdiff(st_tri.weight_sum, st_cpu.weight_sum),
                                                 _maxdiff(st_tri.entropy_sum, st_cpu.entropy_sum),
                                                 _maxdiff(st_tri.count, st_cpu.count))})
        tiles = plan.tiles(16, 6)
        results.append({"tiles_cached": tiles is plan.tiles(16, 6), "n_tiles": tiles.n_tiles, "T": T})
    return results


def site_dims_of(cfg, site):
    from mtlora.inject import site_dims
    return site_dims(cfg, site)


def _targets(fused: torch.Tensor, sites, widths) -> list:
    out, start = [], 0
    for site, width in zip(sites, widths):
        out.append((site, fused[:, start:start + width]))
        start += width
    return out


def _check_planned(results: list[dict], atol: float) -> None:
    from mtlora_server.engine.triton_molora import max_tiles

    parity = [r for r in results if "max_err" in r]
    assert len(parity) >= len(PLANNED) * 2
    for r in parity:
        assert r["max_err"] <= atol * max(1.0, r["ref_scale"]) and r["stats_err"] <= 1e-5, r
    assert any(r["ref_scale"] > 1.0 for r in parity)
    for r in (r for r in results if "tiles_cached" in r):
        assert r["tiles_cached"] and r["n_tiles"] == max_tiles(r["T"], 16, 6), r   # sized by maxima only


def _check(results: list[dict], atol: float) -> None:
    assert len(results) == len(CASES)
    for res, (site, idx) in zip(results, CASES):
        assert res["shape"][0] == len(idx), res
        assert res["max_err"] <= atol * max(1.0, res["ref_scale"]), res
        assert res["base_rows_zero"], res
        assert res["stats_err"] <= 1e-5 and res["count"] == res["expected_count"], res
    assert any(r["ref_scale"] > 0.1 for r in results)     # the deltas compared are not all trivially zero


def test_triton_interpreter_matches_reference_on_cpu():
    out = run_interpreted(__file__)
    _check(out["cases"], atol=1e-5)
    _check_planned(out["planned"], atol=1e-5)


@pytest.mark.parametrize("idx,bt", [([2, -1, 0, 2, 5, 5, 5], 16), ([-1, -1], 16), ([1] * 40 + [0] * 3, 16),
                                    (list(range(-1, 7)) * 9, 32), ([3], 16)])
def test_build_tiles_covers_each_adapter_token_once_sized_by_maxima(idx, bt):
    from mtlora_server.engine.triton_molora import build_tiles, max_tiles

    idx = torch.tensor(idx)
    T = idx.numel()
    tiles = build_tiles(idx, bt, 8, "cpu")
    assert tiles.meta.dtype == torch.int32 and tiles.n_tiles == max_tiles(T, bt, 8)
    slot, rows = tiles.tile_slot.long(), tiles.tile_rows.long()
    seen = []
    for s, r in zip(slot.tolist(), rows.tolist()):
        real = [t for t in r if t < T]
        if s < 0:
            assert not real                                                   # dead tiles hold only padding
            continue
        assert real and all(int(idx[t]) == s for t in real)                   # one slot per tile
        seen.extend(real)
    assert sorted(seen) == (idx >= 0).nonzero().squeeze(1).tolist()           # every adapter token exactly once
    assert (slot[: (slot >= 0).sum()] >= 0).all()                             # live tiles first
    with pytest.raises(ValueError, match="max_slots"):
        build_tiles(torch.tensor([9]), bt, 8, "cpu")


def _compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_hopper_without_a_gpu(dtype):
    """Ahead-of-time compile for sm_90 (no GPU needed: ptxas ships with triton), so a kernel the interpreter
    accepts but the compiler rejects is a red CI, not a failed GPU run. The 7B adapter shape (N 16, r 16, g 2)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from mtlora_server.engine import triton_molora as tm

    if tm.interpreter_enabled():
        pytest.skip("TRITON_INTERPRET=1: the jit functions are interpreter objects here")
    cfg = tm.FP32_TILE if dtype == "fp32" else tm.DEFAULT_TILE_TABLE[0][1]
    up = dtype == "fp32"
    try:
        shrink = _compile_sm90(tm._shrink_kernel, {
            "x_ptr": f"*{dtype}", "x_stride": "i32", "meta_ptr": "*i32", "a_ptr": f"*{dtype}", "r_ptr": f"*{dtype}",
            "nexp_ptr": "*i32", "hp_ptr": "*fp32", "lp_ptr": "*fp32", "T": "i32", "D_IN": "i32", "K_PER": "i32"},
            dict(R_MAX=16, N_MAX=16, G_MAX=2, BT=cfg.bt, BK=cfg.bk, RP=16, NP=16, GP=2, KSPLIT=cfg.ksplit, UPCAST=up),
            cfg.num_warps)
    except (ImportError, RuntimeError) as exc:   # a triton build without the NVIDIA backend / ptxas
        if "ptxas" in str(exc) or "backend" in str(exc).lower():
            pytest.skip(f"this triton cannot compile for CUDA here: {exc}")
        raise
    expand = _compile_sm90(tm._expand_kernel, {
        "hp_ptr": "*fp32", "lp_ptr": "*fp32", "meta_ptr": "*i32", "b_ptr": f"*{dtype}", "nexp_ptr": "*i32",
        "groups_ptr": "*i64", "scaling_ptr": "*fp32", "out_ptr": f"*{dtype}", "out_stride": "i32", "T": "i32",
        "D_OUT": "i32"}, dict(R_MAX=16, N_MAX=16, BT=cfg.bt, BKO=cfg.bko, RP=16, NP=16, GP=2, KSPLIT=cfg.ksplit,
                              UPCAST=up), cfg.num_warps)
    for k in (shrink, expand):
        assert k.asm.get("cubin") and k.metadata.shared <= 228 * 1024        # fits an H100/H200 SM


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available: GPU kernel test needs a GPU")
def test_triton_kernel_on_cuda_matches_reference():
    pytest.importorskip("triton", reason="triton is not installed")
    _check(_run_cases("cuda"), atol=1e-5)
    _check(_run_cases("cuda", torch.bfloat16), atol=2e-2)
    _check_planned(_run_planned("cuda"), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available: GPU dispatch test needs a GPU")
def test_apply_on_cuda_dispatches_to_triton_and_matches_cpu():
    pytest.importorskip("triton", reason="triton is not installed")
    from test_lora_ops import ADAPTERS, CFG, _mix, _native, _oracles

    from mtlora_server.engine.lora_ops import AdapterSlots

    oracles = _oracles()
    cpu = AdapterSlots(CFG, max_adapters=6, max_rank=16, max_experts=8, max_groups=4)
    gpu = AdapterSlots(CFG, max_adapters=6, max_rank=16, max_experts=8, max_groups=4, device="cuda")
    for slot, cfg in ADAPTERS.items():
        cpu.load(slot, cfg, _native(oracles[slot]))
        gpu.load(slot, cfg, _native(oracles[slot]))
    for T in (1, 64, 2048):
        idx, x = _mix(T, T), torch.randn(T, 96)
        got = gpu.apply(1, "mlp.down_proj", x.cuda(), idx.cuda())
        torch.testing.assert_close(got.cpu(), cpu.apply(1, "mlp.down_proj", x, idx), atol=1e-4, rtol=1e-4)


if __name__ == "__main__":   # the interpreter subprocess: print one JSON line of results
    print(json.dumps({"cases": _run_cases("cpu"), "planned": _run_planned("cpu")}))
