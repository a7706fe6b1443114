"""The Triton MoLoRA kernels against `molora_reference`: on CPU through the Triton interpreter, on CUDA for real.

The interpreter check runs in a subprocess with TRITON_INTERPRET=1 set before triton is imported (the flag is read
at import time and must not leak into other tests). Sizes stay tiny (T <= 8, d <= 64): the interpreter is slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max()) if a.numel() else 0.0


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


def _check(results: list[dict], atol: float) -> None:
    assert len(results) == len(CASES)
    for res, (site, idx) in zip(results, CASES):
        assert res["shape"][0] == len(idx), res
        assert res["max_err"] <= atol * max(1.0, res["ref_scale"]), res
        assert res["base_rows_zero"], res
        assert res["stats_err"] <= 1e-5 and res["count"] == res["expected_count"], res
    assert any(r["ref_scale"] > 0.1 for r in results)     # the deltas compared are not all trivially zero


def test_triton_interpreter_matches_reference_on_cpu():
    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check(json.loads(proc.stdout.strip().splitlines()[-1]), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available: GPU kernel test needs a GPU")
def test_triton_kernel_on_cuda_matches_reference():
    pytest.importorskip("triton", reason="triton is not installed")
    _check(_run_cases("cuda"), atol=1e-5)
    _check(_run_cases("cuda", torch.bfloat16), atol=2e-2)


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
    print(json.dumps(_run_cases("cpu")))
