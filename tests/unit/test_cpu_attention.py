"""The CPU paged decode-attention kernel (engine/cpu_attention.py) against the torch path it replaces: the kernel
alone on random pools (fp32 to 1e-5, bf16 to its rounding), and whole decoder steps with and without it. Also:
the fallback when it cannot be built, and the engine flag."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from cpu_kernels import break_the_build, built, three_steps
from mtlora.errors import ConfigError
from mtlora.testing import make_tiny_model_dir
from mtlora_server.engine import cpu_attention, cpu_ext
from mtlora_server.engine.args import EngineArgs
from mtlora_server.engine.kv_cache import KVCachePool
from mtlora_server.engine.model import LlamaDecoder
from mtlora_server.engine.runner import ModelRunner


@pytest.fixture(scope="module")
def ext():
    return built(cpu_attention, "paged CPU attention kernel")


def _oracle(q, k, v, kv_slots, mask, scale):
    """Gather + softmax(q k^T) v in float64, masked positions excluded: [B, H*hd]."""
    B, H, hd = q.shape
    G = H // k.shape[0]
    keys = k.double()[:, kv_slots].repeat_interleave(G, dim=0).transpose(0, 1)       # [B, H, Kmax, hd]
    values = v.double()[:, kv_slots].repeat_interleave(G, dim=0).transpose(0, 1)
    scores = torch.einsum("bhd,bhkd->bhk", q.double() * scale, keys).masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhk,bhkd->bhd", scores.softmax(-1), values).reshape(B, H * hd)


CASES = [  # (B, H, KV, hd, Kmax): GQA as SmolLM2 (3 query heads per KV head), MHA, MQA, unrolled and generic dims
    (5, 9, 3, 64, 40),
    (3, 4, 4, 128, 33),
    (4, 6, 1, 12, 17),
    (1, 2, 2, 64, 1),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_gathered_attention(ext, case, dtype):
    """Random pool, each sequence's slots scattered over it, masks with holes and different lengths: the kernel
    equals the float64 oracle (fp32: 1e-5; bf16: rounding of the output) and the torch path to the same tolerance."""
    B, H, KV, hd, K = case
    g = torch.Generator().manual_seed(B * 100 + hd)
    S = 4 * B * K + 7
    k, v = (torch.randn(KV, S, hd, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(B, H, hd, generator=g).to(dtype)
    kv_slots = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(B)])             # [B, Kmax]
    mask = torch.rand(B, K, generator=g) < 0.7
    mask[:, 0] = True                                                                          # no empty row
    scale = hd ** -0.5
    got = cpu_attention.decode_attention(ext, q, k, v, kv_slots, mask[:, None, None, :], scale)
    want = _oracle(q, k, v, kv_slots, mask, scale)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    assert got.dtype == dtype and got.shape == (B, H * hd)
    torch.testing.assert_close(got.double(), want, **tol)
    keys, values = KVCachePool.gather(SimpleNamespace(k=k[None], v=v[None]), 0, kv_slots)      # [KV, B, Kmax, hd]
    torch_path = LlamaDecoder._decode_attention(SimpleNamespace(scale=scale), q, keys, values, mask[:, None, None, :])
    torch.testing.assert_close(got.float(), torch_path.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_is_its_own_whatever_the_batch_order(ext, dtype):
    """The kernel visits sequences in the pool order of their first key, not in batch order: permuting the batch
    permutes the output rows bit for bit, a row with every key masked still returns zeros, and each row equals the
    oracle."""
    B, H, KV, hd, K = 7, 9, 3, 64, 24
    g = torch.Generator().manual_seed(7)
    S = 4 * B * K
    k, v = (torch.randn(KV, S, hd, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(B, H, hd, generator=g).to(dtype)
    kv_slots = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(B)])
    mask = torch.rand(B, K, generator=g) < 0.8
    mask[:, 0] = True
    mask[3] = False                                                # a row with nothing to attend to
    got = cpu_attention.decode_attention(ext, q, k, v, kv_slots, mask[:, None, None, :], hd ** -0.5)
    assert torch.equal(got[3], torch.zeros_like(got[3]))
    keep = torch.arange(B) != 3
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got[keep].double(), _oracle(q, k, v, kv_slots, mask, hd ** -0.5)[keep], **tol)
    for perm in (torch.arange(B).flip(0), torch.randperm(B, generator=g)):
        again = cpu_attention.decode_attention(ext, q[perm], k, v, kv_slots[perm], mask[perm][:, None, None, :],
                                               hd ** -0.5)
        assert torch.equal(again, got[perm])


def test_kernel_refuses_unmasked_slots_outside_the_pool_and_ignores_masked_ones(ext):
    k = v = torch.randn(1, 10, 64)
    q = torch.randn(2, 1, 64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    slots = torch.tensor([[0, 9, 10_000], [3, -5, 10]])          # out-of-pool slots only where masked: fine
    out = cpu_attention.decode_attention(ext, q, k, v, slots, mask, 0.125)
    torch.testing.assert_close(out.double(), _oracle(q, k, v, slots.clamp(0, 9), mask, 0.125), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="1 unmasked kv_slots outside the pool's 10 slots"):
        cpu_attention.decode_attention(ext, q, k, v, torch.tensor([[0, 10, 0], [3, 0, 0]]), mask, 0.125)
    empty = cpu_attention.decode_attention(ext, q, k, v, slots, torch.zeros_like(mask), 0.125)
    assert torch.equal(empty, torch.zeros_like(empty))                  # no key to attend: zeros, not NaN
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu_attention.decode_attention(ext, q.bfloat16(), k, v, slots, mask, 0.125)


def _runner(model_dir, paged: bool):
    model = LlamaDecoder.from_dir(model_dir, torch.float32, "cpu", max_len=256)
    c = model.cfg
    pool = KVCachePool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 64, 16, torch.float32)
    if paged:
        assert model.enable_paged_kernel(pool.k.dtype)
    return ModelRunner(model, pool, None, torch.device("cpu")), pool


def test_decoder_steps_are_the_same_with_the_kernel(ext, tmp_path):
    """Prefill, decode-only steps (the whole-step path) and a mixed step (a decode group beside prefill chunks):
    fp32 logits with the kernel equal those of the gather path to 1e-5."""
    model_dir = make_tiny_model_dir(tmp_path, seed=6)
    outs = [three_steps(*_runner(model_dir, paged)) for paged in (False, True)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_kernel_build_failure_falls_back_and_a_required_kernel_names_the_flag(monkeypatch, tmp_path, caplog):
    break_the_build(monkeypatch, cpu_attention)
    with caplog.at_level(logging.WARNING, logger=cpu_ext.__name__):
        assert cpu_attention.kernel() is None
    assert "could not be built" in caplog.text and "c++: not found" in caplog.text
    model = LlamaDecoder.from_dir(make_tiny_model_dir(tmp_path, seed=1), torch.float32, "cpu", max_len=64)
    assert model.enable_paged_kernel(torch.float32) is False and model.paged_kernel is None
    with pytest.raises(ConfigError) as info:
        model.enable_paged_kernel(torch.float32, required=True)
    assert info.value.field == "cpu_attention"


def test_env_forces_the_torch_path_and_engine_args_validate(monkeypatch):
    monkeypatch.setattr(cpu_attention.EXTENSION, "_state", {})
    monkeypatch.setenv(cpu_attention.ENV, "torch")
    assert cpu_attention.kernel() is None
    with pytest.raises(ConfigError) as info:
        EngineArgs(cpu_attention="fast")
    assert info.value.field == "cpu_attention"


def test_build_name_depends_on_the_source_and_this_cpu(monkeypatch):
    a = cpu_attention.EXTENSION.build_name()
    monkeypatch.setattr(cpu_ext, "_cpu_flags", lambda: "flags : fpu sse2")
    b = cpu_attention.EXTENSION.build_name()
    assert b != a and b.startswith("mtlora_paged_attention_")


def test_build_name_depends_on_the_headers_the_sources_include(tmp_path):
    """exp_poly.h is shared by two kernels: editing it must rebuild them, not reuse a stale build."""
    src = tmp_path / "k.cpp"
    src.write_text('#include "shared.h"\n')
    (tmp_path / "shared.h").write_text("// v1\n")
    ext = cpu_ext.CpuExtension(src, "mtlora_test", "MTLORA_TEST_KERNEL", "test kernel")
    a = ext.build_name()
    (tmp_path / "shared.h").write_text("// v2\n")
    assert ext.build_name() != a
    assert '#include "exp_poly.h"' in (cpu_ext.CSRC / "paged_decode_attention.cpp").read_text()


def test_ninja_from_the_wheel_is_put_on_path_when_none_is_there(monkeypatch):
    ninja = pytest.importorskip("ninja", reason="the ninja wheel is a serve / dev dependency")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(cpu_ext.shutil, "which", lambda name: None)
    cpu_ext._ninja_on_path()
    assert cpu_ext.os.environ["PATH"].split(cpu_ext.os.pathsep)[0] == ninja.BIN_DIR
