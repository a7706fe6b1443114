"""The Triton paged decode attention (engine/triton_attention.py) against a float64 oracle and the torch gather path.

The interpreter check runs in a subprocess with TRITON_INTERPRET=1 set before triton is imported (read at import
time; it must not leak into other tests). On CUDA the same cases run for real (gpu marker), and the kernel is
compiled ahead of time for sm_90 in CI so a kernel the interpreter accepts but the compiler rejects is a red CI.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from triton_interp import CUDA_DTYPES, needs_cuda, print_results, run_interpreted  # noqa: E402

# (KV heads, query heads per KV head, head dim, context lengths per row, Kmax): MHA, GQA, a head dim that is not
# a power of two, Kmax not a multiple of the kernel's block, padded rows, one row, a row of one token.
CASES = [
    (2, 1, 16, [5, 17, 1], 17),
    (2, 4, 32, [70, 3, 64, 65], 80),
    (1, 3, 24, [9, 30], 40),
    (4, 2, 16, [1], 64),
    (2, 2, 64, [128, 100, 7, 129, 50], 130),
]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# context splits (flash-decoding): None = the device's choice (1 on CPU), 3 = forced (splits of 64 slots here:
# some splits of the short rows hold no live slot, which the combine must weigh by zero)
SPLITS = (None, 3)


def _case(n: int, kv: int, g: int, hd: int, lens: list[int], kmax: int, dtype, device: str):
    """Pools, a strided q (a slice of a fused qkv row), scattered slots padded with the scratch slot, the mask."""
    gen = torch.Generator().manual_seed(n)
    B, H, S = len(lens), kv * g, sum(lens) + 7
    k_pool = (torch.randn(kv, S + 1, hd, generator=gen) * 2).to(device, dtype)
    v_pool = torch.randn(kv, S + 1, hd, generator=gen).to(device, dtype)
    qkv = torch.randn(B, (H + 2 * kv) * hd, generator=gen).to(device, dtype)
    q = qkv[:, : H * hd].view(B, H, hd)                                       # a strided view, as in the engine
    perm = torch.randperm(S, generator=gen)
    slots = torch.full((B, kmax), S, dtype=torch.long)                        # padding reads the scratch slot
    start = 0
    for b, n_b in enumerate(lens):
        slots[b, :n_b] = perm[start: start + n_b]
        start += n_b
    mask = (torch.arange(kmax)[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]   # [B, 1, 1, Kmax]
    return q, k_pool, v_pool, slots.to(device), mask.to(device)


def _oracle(q, k_pool, v_pool, slots, mask, scale) -> torch.Tensor:
    """float64, one row and head at a time over exactly the unmasked slots."""
    B, H, hd = q.shape
    G = H // k_pool.shape[0]
    out = torch.zeros(B, H, hd, dtype=torch.float64)
    for b in range(B):
        idx = slots[b][mask[b].reshape(-1)].cpu()
        for h in range(H):
            k = k_pool[h // G].cpu().double()[idx]
            v = v_pool[h // G].cpu().double()[idx]
            p = torch.softmax(q[b, h].cpu().double() @ k.T * scale, dim=-1)
            out[b, h] = p @ v
    return out.reshape(B, H * hd)


def _run(device: str, dtypes=(torch.float32, torch.bfloat16)) -> list[dict]:
    from mtlora_server.engine import triton_attention
    from mtlora_server.engine.model import LlamaDecoder

    rows = []
    for dtype, splits in [(dt, sp) for dt in dtypes for sp in SPLITS]:
        for n, (kv, g, hd, lens, kmax) in enumerate(CASES):
            q, kp, vp, slots, mask = _case(n, kv, g, hd, lens, kmax, dtype, device)
            scale = hd ** -0.5
            got = triton_attention.decode_attention(q, kp, vp, slots, mask, scale, splits=splits)
            ref = _oracle(q, kp, vp, slots, mask, scale)
            keys, values = kp.index_select(1, slots.reshape(-1)), vp.index_select(1, slots.reshape(-1))
            gather = LlamaDecoder._decode_attention(SimpleNamespace(scale=scale), q.float(),
                                                    keys.float().view(kv, *slots.shape, hd),
                                                    values.float().view(kv, *slots.shape, hd), mask)
            rows.append({"dtype": str(dtype), "case": n, "splits": splits, "shape": list(got.shape),
                         "out_dtype": str(got.dtype),
                         "err": float((got.cpu().double() - ref).abs().max()),
                         "gather_err": float((gather.cpu().double() - ref).abs().max()),
                         "ref_scale": float(ref.abs().max()), "finite": bool(torch.isfinite(got).all())})
    return rows


def _engine_rows(workdir: str) -> dict:
    """The eager engine (fp32, tiny model, mixed adapters, several sequences per decode step) with the kernel
    switched in for decode attention, against the same engine on the torch gather path."""
    from mtlora.base import load_config
    from mtlora.testing import make_tiny_model_dir
    from mtlora_server.engine import triton_attention
    from mtlora_server.engine.core import EngineCore
    from mtlora_server.engine.testing import run_to_completion, tiny_engine_args, write_tiny_adapters
    from mtlora_server.engine.types import GenerationRequest, SamplingParams

    tiny = make_tiny_model_dir(Path(workdir) / "model", seed=5)
    paths = write_tiny_adapters(Path(workdir) / "adapters", load_config(tiny))
    out = {}
    for kernel in (False, True):
        core = EngineCore(tiny_engine_args(tiny, adapters=paths, enforce_eager=True, cpu_attention="torch",
                                           cpu_adapters="torch", cpu_fused_ops="torch"))
        core.model.cuda_paged = triton_attention if kernel else None          # the CUDA dispatch, on CPU
        reqs = [GenerationRequest(f"r{i}", torch.randint(3, 250, (3 + 9 * i,), generator=torch.Generator()
                                                         .manual_seed(i)).tolist(),
                                  SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1),
                                  adapter=name) for i, name in enumerate([None, "mt_ffn", "hydra", "lora", None])]
        out[kernel] = {k: (v.tokens[0], [x.logprob for x in v.logprobs[0]])
                       for k, v in run_to_completion(core, reqs).items()}
    return {"tokens_equal": all(out[True][k][0] == out[False][k][0] for k in out[False]),
            "logprob_max_diff": max(abs(a - b) for k in out[False] for a, b in zip(out[True][k][1], out[False][k][1])),
            "tokens": sum(len(v[0]) for v in out[True].values())}


def _check(rows: list[dict], dtypes) -> None:
    assert len(rows) == len(CASES) * len(dtypes) * len(SPLITS)
    for r in rows:
        tol = TOL[getattr(torch, r["dtype"].removeprefix("torch."))]
        assert r["finite"] and r["out_dtype"] == r["dtype"], r
        assert r["err"] <= tol * max(1.0, r["ref_scale"]), r
        assert r["gather_err"] <= 1e-4 * max(1.0, r["ref_scale"]), r        # the torch path agrees with the oracle
    assert all(r["ref_scale"] > 0.1 for r in rows)                           # outputs compared are not all ~zero


def test_interpreter_matches_oracle_and_gather_path():
    out = run_interpreted(__file__)
    _check(out["kernel"], (torch.float32, torch.bfloat16))
    engine = out["engine"]
    assert engine["tokens"] == 30 and engine["tokens_equal"] and engine["logprob_max_diff"] <= 1e-4, engine


def test_bad_layouts_are_refused_with_the_reason():
    pytest.importorskip("triton", reason="triton is not installed")
    from mtlora_server.engine import triton_attention

    q, kp, vp, slots, mask = _case(0, 2, 1, 16, [3, 2], 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="group"):
        triton_attention.decode_attention(q[:, :1], kp, vp, slots, mask, 0.25)
    with pytest.raises(ValueError, match="contiguous"):
        triton_attention.decode_attention(q, kp, vp, slots.t().contiguous().t(), mask, 0.25)
    assert triton_attention.available("cpu") == triton_attention.interpreter_enabled()


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernel_compiles_for_hopper_without_a_gpu(dtype):
    """Ahead-of-time compile for sm_90 (ptxas ships with triton): the LLaMA-2-7B shape (MHA, hd 128) and GQA 4."""
    pytest.importorskip("triton", reason="triton is not installed")
    from test_triton_molora import _compile_sm90

    from mtlora_server.engine import triton_attention as ta

    if ta.interpreter_enabled():
        pytest.skip("TRITON_INTERPRET=1: the jit functions are interpreter objects here")
    sig = {"q_ptr": f"*{dtype}", "q_sb": "i32", "q_sh": "i32", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}",
           "kv_sh": "i64", "kv_ss": "i32", "slots_ptr": "*i64", "slots_sb": "i32", "mask_ptr": "*u8",
           "mask_sb": "i32", "out_ptr": f"*{dtype}", "out_sb": "i32", "ws_ptr": "*fp32", "ml_ptr": "*fp32",
           "scale": "fp32", "KMAX": "i32", "SPLIT_LEN": "i32"}
    for g, partial in ((1, False), (4, False), (1, True)):
        k = _compile_sm90(ta._paged_decode_kernel, sig, dict(G=g, GP=16, HD=128, HDP=128, BN=ta.BLOCK_N,
                                                              PARTIAL=partial, UPCAST=False, IEEE=dtype == "fp32"), 4)
        assert k.asm.get("cubin") and k.metadata.shared <= 228 * 1024
    comb = _compile_sm90(ta._combine_kernel, {"ws_ptr": "*fp32", "ml_ptr": "*fp32", "out_ptr": f"*{dtype}",
                                              "out_sb": "i32", "NSP": "i32", "H": "i32"},
                         dict(HD=128, HDP=128, SP=16), 4)
    assert comb.asm.get("cubin")


@pytest.mark.gpu
@needs_cuda
def test_cuda_matches_oracle_and_gather_path():
    pytest.importorskip("triton", reason="triton is not installed")
    _check(_run("cuda", CUDA_DTYPES), CUDA_DTYPES)


if __name__ == "__main__":   # the interpreter subprocess: print one JSON line of results
    print_results(lambda tmp: {"kernel": _run("cpu"), "engine": _engine_rows(tmp)})
