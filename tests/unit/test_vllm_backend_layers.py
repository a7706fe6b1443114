"""vLLM backend pieces that need no vLLM: the block-adapter math against MoLoRA, the sub-block wrappers, the
launcher's command line and its refusals. The end-to-end vLLM runs are in tests/peers/test_vllm_backend.py."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch
from torch import nn

from mtlora.adapters import MoLoRA
from mtlora.base import load_config
from mtlora.checkpoint import save_adapter
from mtlora.config import AdapterConfig
from mtlora.errors import ConfigError
from mtlora.reference import random_adapter_tensors
from mtlora_server.cli import build_parser
from mtlora_server.vllm_backend import launch
from mtlora_server.vllm_backend.layers import AdaptedAttention, AdaptedMLP, BlockAdapter


def _pair(config: AdapterConfig, d_in: int = 64, d_out: int = 64, seed: int = 0, dtype=torch.float32):
    """A MoLoRA with random non-zero weights and a BlockAdapter holding the same tensors."""
    torch.manual_seed(seed)
    ref = MoLoRA(d_in, d_out, config).eval()
    with torch.no_grad():
        ref.lora_B.normal_(0, 0.3)
    ours = BlockAdapter(d_in, d_out, config)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(getattr(ref, name))
    ours.refresh()
    return ref.to(dtype), ours.to(dtype)


@pytest.mark.parametrize("experts, group_size", [(4, 16), (3, None), (1, None), (2, 64), (5, 8)])
def test_block_adapter_matches_molora(experts, group_size):
    config = AdapterConfig(method="mtlora", rank=8, alpha=24, num_experts=experts, placement="both",
                           routing_group_size=group_size)
    ref, ours = _pair(config)
    z = torch.randn(2, 7, 64)                                                   # [..., d_in]
    expected = ref(z)
    assert expected.abs().max() > 1e-2                                         # a non-trivial delta
    torch.testing.assert_close(ours(z), expected, rtol=1e-5, atol=1e-5)


def test_block_adapter_bf16_close_to_fp32_reference():
    config = AdapterConfig(method="mtlora", rank=8, alpha=16, num_experts=4, placement="ffn", routing_group_size=16)
    ref, _ = _pair(config)
    _, ours = _pair(config, dtype=torch.bfloat16)
    z = torch.randn(11, 64)
    out = ours(z.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref(z), rtol=5e-2, atol=5e-2)


def test_refresh_picks_up_new_b():
    config = AdapterConfig(method="mtlora", rank=4, num_experts=2, placement="ffn")
    ref, ours = _pair(config)
    with torch.no_grad():
        ours.lora_B.mul_(2.0)
        ref.lora_B.mul_(2.0)
    z = torch.randn(3, 64)
    assert not torch.allclose(ours(z), ref(z))          # stale until refreshed: refresh() is load-bearing
    ours.refresh()
    torch.testing.assert_close(ours(z), ref(z), rtol=1e-5, atol=1e-5)


class _FakeAttention(nn.Module):
    """Stands in for vLLM's LlamaAttention: called with keywords, returns a tensor."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def forward(self, positions, hidden_states):
        return self.proj(hidden_states) + positions[:, None].float()


def test_wrappers_add_the_delta_of_the_normed_input():
    config = AdapterConfig(method="mtlora", rank=4, num_experts=3, placement="both", routing_group_size=32)
    _, adapter = _pair(config)
    x, pos = torch.randn(5, 64), torch.arange(5)
    attn = _FakeAttention()
    got = AdaptedAttention(attn, adapter)(positions=pos, hidden_states=x)
    torch.testing.assert_close(got, attn(pos, x) + adapter(x))
    mlp = nn.Linear(64, 64)
    torch.testing.assert_close(AdaptedMLP(mlp, adapter)(x), mlp(x) + adapter(x))


# -- launcher ----------------------------------------------------------------------------------------------------
def _args(*argv: str) -> argparse.Namespace:
    return launch.add_arguments(build_parser()).parse_args(list(argv))


@pytest.fixture
def adapter_dir(tmp_path, tiny_model_dir):
    def make(name="ad", **kw):
        cfg = AdapterConfig(**{"method": "mtlora", "rank": 4, "num_experts": 2, "placement": "ffn", **kw})
        return str(save_adapter(tmp_path / name, cfg, random_adapter_tensors(cfg, load_config(tiny_model_dir))))
    return make


def test_add_arguments_is_idempotent_and_parses():
    parser = launch.add_arguments(launch.add_arguments(build_parser()))
    ns = parser.parse_args(["--tensor-parallel-size", "2", "--vllm-arg=--foo=1", "--vllm-python", "/x/python"])
    assert (ns.tensor_parallel_size, ns.vllm_arg, ns.vllm_python) == (2, ["--foo=1"], "/x/python")
    assert "--vllm-python" in parser.format_help()


def test_build_command(tmp_path):
    ns = _args("--dtype", "float32", "--port", "9123", "--max-model-len", "256", "--enforce-eager",
               "--api-key", "sekrit", "--vllm-python", "/v/bin/python", "--vllm-arg=--foo", "--tensor-parallel-size",
               "2")
    cmd = launch.build_command(ns, "/models/tiny", str(tmp_path / "ad"), "ad")
    assert cmd[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    overrides = json.loads(cmd[cmd.index("--hf-overrides") + 1])
    assert overrides == {"architectures": ["MtloraLlamaForCausalLM"], "mtlora_adapter": str((tmp_path / "ad"))}
    for flag, value in [("--model", "/models/tiny"), ("--served-model-name", "ad"), ("--port", "9123"),
                        ("--dtype", "float32"), ("--max-model-len", "256"), ("--tensor-parallel-size", "2")]:
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enforce-eager" in cmd and cmd[-1] == "--foo"
    assert "--block-size" not in cmd          # vLLM's backends choose their own (the CPU one needs 32k)
    assert not any("sekrit" in part for part in cmd)          # the key travels in the environment


def test_vllm_python_default_comes_from_env(monkeypatch):
    monkeypatch.setenv("MTLORA_VLLM_PYTHON", "/env/python")
    assert launch.vllm_python(_args()) == "/env/python"
    assert launch.vllm_python(_args("--vllm-python", "/flag/python")) == "/flag/python"


@pytest.mark.parametrize("extra, field", [
    (["--tensor-parallel-size", "3"], "--tensor-parallel-size"),      # 4 heads
    (["--enable-adapter-loading", "--adapter-root", "."], "--enable-adapter-loading"),
])
def test_check_inputs_refuses_bad_flags(tiny_model_dir, adapter_dir, extra, field):
    with pytest.raises(ConfigError) as exc:
        launch.check_inputs(_args("--model", str(tiny_model_dir), "--adapter", adapter_dir(), *extra))
    assert exc.value.field == field


def test_check_inputs_wants_exactly_one_block_level_adapter(tiny_model_dir, adapter_dir):
    model = str(tiny_model_dir)
    with pytest.raises(ConfigError, match="exactly one adapter"):
        launch.check_inputs(_args("--model", model, "--adapter", adapter_dir("a"), "--adapter", adapter_dir("b")))
    with pytest.raises(ConfigError, match="exactly one adapter"):
        launch.check_inputs(_args("--model", model))
    hydra = adapter_dir("h", method="hydralora", placement=None, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="block-level") as exc:
        launch.check_inputs(_args("--model", model, "--adapter", hydra))
    assert exc.value.field == "method"
    model_dir, name, path = launch.check_inputs(_args("--model", model, "--adapter", f"math={adapter_dir()}"))
    assert (model_dir, name) == (tiny_model_dir, "math")


def _fake_python(tmp_path, name: str, with_vllm: bool) -> str:
    """An interpreter without site-packages (so no real vLLM, no entry points), optionally with a dummy `vllm`."""
    fake = tmp_path / f"{name}-lib"
    if with_vllm:
        (fake / "vllm").mkdir(parents=True)
        (fake / "vllm" / "__init__.py").write_text("")
    script = tmp_path / name
    script.write_text(f'#!/bin/sh\nPYTHONPATH={fake} exec {sys.executable} -S "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_check_vllm_python_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="no such executable") as exc:
        launch.check_vllm_python(str(tmp_path / "nope" / "python"))
    assert exc.value.field == "--vllm-python"
    with pytest.raises(ConfigError, match="vLLM is not installed"):
        launch.check_vllm_python(_fake_python(tmp_path, "py-bare", with_vllm=False))
    with pytest.raises(ConfigError, match=r"plugin is not installed there; run .*pip install --no-deps -e"):
        launch.check_vllm_python(_fake_python(tmp_path, "py-vllm", with_vllm=True))


def test_serve_refuses_before_launching(tiny_model_dir, adapter_dir, monkeypatch):
    launched = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: launched.append(a))
    hydra = adapter_dir("h", method="hydralora", placement=None, target_modules=["q_proj"])
    assert launch.serve(_args("--model", str(tiny_model_dir), "--adapter", hydra)) == 1
    assert launch.serve(_args("--model", str(tiny_model_dir), "--adapter", adapter_dir(),
                              "--vllm-python", "/no/such/python")) == 1
    assert launched == []
