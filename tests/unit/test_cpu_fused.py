"""The CPU fused row kernels (engine/cpu_fused.py, csrc/fused_rows.cpp) against the torch expressions they replace
in engine/model.py: RMSNorm (alone and after the residual add, in place), silu(gate) * up, rotary embedding in
place on views of the fused qkv output. fp32 to 1e-6 relative, bf16 to the output's rounding (almost always the
same bits); extreme inputs; refused inputs; whole decoder steps (fp32 logits to 1e-5, bf16 greedy tokens). Also
the flag, the environment switch and the build-failure fallback."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from cpu_kernels import break_the_build, built, three_steps
from mtlora.errors import ConfigError
from mtlora.testing import make_tiny_model_dir
from mtlora_server.engine import cpu_fused
from mtlora_server.engine.args import EngineArgs
from mtlora_server.engine.kv_cache import KVCachePool
from mtlora_server.engine.model import LlamaDecoder, apply_rope, rms_norm
from mtlora_server.engine.runner import ModelRunner

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ext():
    return built(cpu_fused, "CPU fused row kernels")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32: 1e-6 relative; bf16: within one rounding step of the output and nearly always the same bits."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=2 ** -7)
        assert (got == want).float().mean() > 0.99


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d", [(1, 64), (37, 576), (300, 48), (5, 7)])
def test_rms_norm_and_add_rms_norm(ext, dtype, T, d):
    g = torch.Generator().manual_seed(T * d)
    x, delta = (torch.randn(T, d, generator=g).mul(3).to(dtype) for _ in range(2))
    w = torch.randn(d, generator=g).to(dtype)
    _close(ext.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5))
    h = x.clone()
    y = ext.add_rms_norm(h, delta, w, 1e-6)
    assert torch.equal(h, x + delta)                                    # the residual add, in place, rounded once
    _close(y, rms_norm(x + delta, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,F_", [(1, 16), (64, 1536), (9, 33)])
def test_silu_mul(ext, dtype, T, F_):
    g = torch.Generator().manual_seed(F_)
    gu = torch.randn(T, 2 * F_, generator=g).mul(4).to(dtype)
    _close(ext.silu_mul(gu), F.silu(gu[:, :F_]) * gu[:, F_:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_extreme_inputs(ext, dtype):
    gate = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 87.0, -87.0, 88.5, -88.5, 100.0, -100.0, 1e4, -1e4,
                         3e38, -3e38])
    gu = torch.cat([gate, torch.full_like(gate, 1.5)])[None].to(dtype)
    got = ext.silu_mul(gu)
    want = F.silu(gu[:, :16]) * gu[:, 16:]
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))          # 3e38 * 1.5 overflows in both
    torch.testing.assert_close(got.float(), want.float(), atol=1e-30, rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv,hd", [(9, 3, 64), (4, 4, 128), (2, 1, 6)])
def test_rope_in_place_on_qkv_views(ext, dtype, heads, kv, hd):
    """q and k are column views of the fused qkv output (row stride q + 2kv): rotated in place, v untouched."""
    T = 23
    g = torch.Generator().manual_seed(hd)
    qkv = torch.randn(T, (heads + 2 * kv) * hd, generator=g).to(dtype)
    cos, sin = (torch.randn(T, hd, generator=g).to(dtype) for _ in range(2))
    before = qkv.clone()
    q, k, v = qkv.split([heads * hd, kv * hd, kv * hd], dim=-1)
    q, k = q.reshape(T, heads, hd), k.reshape(T, kv, hd)
    want_q = apply_rope(before[:, :heads * hd].reshape(T, heads, hd), cos, sin)
    want_k = apply_rope(before[:, heads * hd:(heads + kv) * hd].reshape(T, kv, hd), cos, sin)
    ext.rope_(q, cos, sin)
    ext.rope_(k, cos, sin)
    _close(q, want_q)
    _close(k, want_k)
    assert torch.equal(v, before[:, (heads + kv) * hd:])


BAD = {  # name -> (call, message fragment)
    "weight dtype": (lambda e: e.rms_norm(torch.ones(2, 4), torch.ones(4).bfloat16(), 1e-6), "weight"),
    "weight size": (lambda e: e.rms_norm(torch.ones(2, 4), torch.ones(5), 1e-6), "weight"),
    "delta shape": (lambda e: e.add_rms_norm(torch.ones(2, 4), torch.ones(3, 4), torch.ones(4), 1e-6), "delta"),
    "half dtype": (lambda e: e.rms_norm(torch.ones(2, 4).half(), torch.ones(4).half(), 1e-6), "float32 or bfloat16"),
    "odd silu width": (lambda e: e.silu_mul(torch.ones(2, 5)), "even width"),
    "rope cos shape": (lambda e: e.rope_(torch.ones(2, 3, 4), torch.ones(2, 3), torch.ones(2, 4)), "cos / sin"),
    "rope odd head dim": (lambda e: e.rope_(torch.ones(2, 3, 5), torch.ones(2, 5), torch.ones(2, 5)), "hd even"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_are_refused(ext, name):
    call, fragment = BAD[name]
    with pytest.raises(RuntimeError, match=fragment.replace("/", r"/")):
        call(ext)


def _runner(model_dir, fused: bool, dtype=torch.float32):
    model = LlamaDecoder.from_dir(model_dir, dtype, "cpu", max_len=256)
    c = model.cfg
    pool = KVCachePool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 64, 16, dtype)
    assert model.enable_fused_ops() is True if fused else model.fused is None
    return ModelRunner(model, pool, None, torch.device("cpu")), pool


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_steps_are_the_same_with_the_kernels(ext, tmp_path, dtype):
    """Prefill, decode-only and mixed steps: fp32 logits equal to 1e-5; bf16 the same greedy tokens and logits
    within bf16 noise."""
    model_dir = make_tiny_model_dir(tmp_path, seed=6)
    outs = [three_steps(*_runner(model_dir, fused, dtype)) for fused in (False, True)]
    if dtype == torch.float32:
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(outs[1].argmax(-1), outs[0].argmax(-1))
        torch.testing.assert_close(outs[1], outs[0], atol=0.05, rtol=0.05)


def test_build_failure_falls_back_a_required_kernel_names_the_flag_and_env_forces_torch(monkeypatch, tmp_path,
                                                                                       caplog):
    break_the_build(monkeypatch, cpu_fused)
    model = LlamaDecoder.from_dir(make_tiny_model_dir(tmp_path, seed=1), torch.float32, "cpu", max_len=64)
    with caplog.at_level(logging.WARNING):
        assert model.enable_fused_ops() is False and model.fused is None
    assert "could not be built" in caplog.text and "c++: not found" in caplog.text
    with pytest.raises(ConfigError) as info:
        model.enable_fused_ops(required=True)
    assert info.value.field == "cpu_fused_ops"
    monkeypatch.setattr(cpu_fused.EXTENSION, "_state", {})
    monkeypatch.setenv(cpu_fused.ENV, "torch")
    assert cpu_fused.kernel() is None
    with pytest.raises(ConfigError) as info:
        EngineArgs(cpu_fused_ops="fast")
    assert info.value.field == "cpu_fused_ops"
