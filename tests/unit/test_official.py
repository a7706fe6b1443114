"""Official mtLoRA checkpoints (ICLR26_mtLoRA PEFT fork): the key layout is written by hand here, the math is
re-implemented here the way the official modules compute it (per-expert loop, repeat_interleave of group weights),
and the converted native adapter must reproduce both, down to identical logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtlora.adapters import MoLoRA
from mtlora.checkpoint import load_adapter, save_adapter
from mtlora.config import AdapterConfig
from mtlora.errors import CheckpointError, ConfigError
from mtlora.official import main as convert_main
from mtlora.reference import ReferenceModel
from mtlora.testing import tiny_llama_config, tiny_llama_model

MCFG = tiny_llama_config()   # d = 64, q: 64, k/v: 32, ffn: 128, 2 layers
DIMS = {"mlp": (64, 64), "self_attn": (64, 64), "self_attn.q_proj": (64, 64), "self_attn.v_proj": (64, 32),
        "mlp.down_proj": (128, 64)}
OFFICIAL_DEFAULTS = {  # a full LoraConfig dump, as the official save_pretrained writes it
    "base_model_name_or_path": "tiny-llama", "peft_type": "HYDRALORA", "task_type": "CAUSAL_LM",
    "inference_mode": True, "r": 4, "target_modules": ["q_proj", "v_proj"], "lora_alpha": 8, "lora_nums": 2,
    "lora_dropout": 0.05, "merge_weights": False, "fan_in_fan_out": False, "enable_lora": None, "bias": "none",
    "modules_to_save": None, "enable_blc": True, "init_lora_weights": True, "enable_fine_grained_routing": False,
    "routing_group_size": 1, "enable_spectral_reg": False, "spectral_reg_lambda": 0.25,
    "spectral_reg_frequency": 1, "spectral_reg_steps": None, "enable_block_adapter": False,
    "block_adapter_type": "attention", "block_adapter_style": "lowrank", "block_adapter_rank": None,
    "adaptformer_init_scale": 0.0,
}

CASES = [  # (id, official config overrides, weights file, expected native config)
    ("block-ffn-N3-fgr16", dict(enable_block_adapter=True, block_adapter_type="ffn", lora_nums=3,
                                enable_fine_grained_routing=True, routing_group_size=16), "bin",
     dict(method="mtlora", placement="ffn", rank=4, num_experts=3, routing_group_size=16)),
    ("block-attn-N2", dict(enable_block_adapter=True, block_adapter_type="attention"), "safetensors",
     dict(method="mtlora", placement="attention", rank=4, num_experts=2)),
    ("block-both-N1-rank", dict(enable_block_adapter=True, block_adapter_type="both", lora_nums=1, r=8,
                                block_adapter_rank=2, enable_fine_grained_routing=True), "bin",
     dict(method="mtlora", placement="both", rank=2, num_experts=1)),
    ("comp-qv-N3-fgr8", dict(lora_nums=3, enable_fine_grained_routing=True, routing_group_size=8), "bin",
     dict(method="hydralora", target_modules=["q_proj", "v_proj"], rank=4, num_experts=3, routing_group_size=8)),
    ("comp-q-down-N2", dict(target_modules=["q_proj", "down_proj"]), "safetensors",
     dict(method="hydralora", target_modules=["q_proj", "down_proj"], rank=4, num_experts=2)),
    ("comp-v-N1-fgr", dict(target_modules=["v_proj"], lora_nums=1, enable_fine_grained_routing=True,
                           routing_group_size=16), "bin",
     dict(method="lora", target_modules=["v_proj"], rank=4)),
]


def official_sites(cfg: dict) -> list[str]:
    if cfg["enable_block_adapter"]:
        return {"ffn": ["mlp"], "attention": ["self_attn"], "both": ["self_attn", "mlp"]}[cfg["block_adapter_type"]]
    parent = {"q_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}
    return [f"{parent[m]}.{m}" for m in cfg["target_modules"]]


def make_official_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official key layout, written out by hand: nn.Linear weights are [out, in]."""
    gen = torch.Generator().manual_seed(seed)
    block, n = cfg["enable_block_adapter"], cfg["lora_nums"]
    rank = (cfg["block_adapter_rank"] or cfg["r"]) if block else cfg["r"]
    state = {}
    for layer in range(MCFG.num_hidden_layers):
        for site in official_sites(cfg):
            d_in, d_out = DIMS[site]
            groups = d_out // cfg["routing_group_size"] if cfg["enable_fine_grained_routing"] else 1
            if block:
                base = f"base_model.model.model.layers.{layer}.{site}.block_adapter."
                b_keys = [f"{base}lora_B.{i}.weight" for i in range(n)]
            else:
                base = f"base_model.model.model.layers.{layer}.{site}."
                b_keys = [f"{base}lora_B{i}.weight" for i in range(n)]
            state[base + "lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * 0.3
            for key in b_keys:
                state[key] = torch.randn(d_out, rank, generator=gen) * 0.3
            if n > 1 or not block:  # the component-level LoraLinear always builds a router
                state[base + "lora_route.weight"] = torch.randn(groups * n, d_in, generator=gen)
    return state


def write_official(path: Path, overrides: dict, fmt: str, seed: int = 0) -> tuple[dict, dict]:
    cfg = {**OFFICIAL_DEFAULTS, **overrides}
    state = make_official_state(cfg, seed)
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if fmt == "bin":
        torch.save(state, path / "adapter_model.bin")
    else:
        from safetensors.torch import save_file
        save_file(state, str(path / "adapter_model.safetensors"))
    return cfg, state


def official_forward(x, state, base, block, n, scaling, fgr, group_size):
    """The official forward, as the official modules compute it: per expert, repeat_interleave'd group weights."""
    a = state[base + "lora_A.weight"]
    hidden = x @ a.T
    b = [state[base + (f"lora_B.{i}.weight" if block else f"lora_B{i}.weight")] for i in range(n)]
    if n == 1:
        return hidden @ b[0].T * scaling
    logits = x @ state[base + "lora_route.weight"].T                              # [T, N*g]
    groups = logits.shape[-1] // n
    weights = torch.softmax(logits.view(x.shape[0], groups, n), dim=-1, dtype=torch.float32)
    result = 0
    for i in range(n):
        w_i = weights[:, :, i].repeat_interleave(group_size, dim=-1) if fgr else weights[:, 0, i:i + 1]
        result = result + w_i * (hidden @ b[i].T) * scaling
    return result


@pytest.mark.parametrize("overrides,fmt,want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_conversion_config_and_math(tmp_path, overrides, fmt, want):
    cfg, state = write_official(tmp_path / "off", overrides, fmt)
    config, tensors = load_adapter(tmp_path / "off", model_config=MCFG)
    assert config == AdapterConfig(alpha=8.0, dropout=0.05, base_model="tiny-llama", **want)
    block, n = cfg["enable_block_adapter"], cfg["lora_nums"]
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(5))
    for layer in range(MCFG.num_hidden_layers):
        for site in official_sites(cfg):
            d_in, d_out = DIMS[site]
            mod = MoLoRA(d_in, d_out, config).eval()      # eval: the checkpoint has lora_dropout 0.05
            prefix = f"layers.{layer}.{site}"
            with torch.no_grad():
                for name, p in mod.named_parameters():
                    p.copy_(tensors[f"{prefix}.{name}"])
            base = f"base_model.model.model.layers.{layer}.{site}." + ("block_adapter." if block else "")
            want_out = official_forward(x[:, :d_in], state, base, block, n, cfg["lora_alpha"] / config.rank,
                                        cfg["enable_fine_grained_routing"], cfg["routing_group_size"])
            assert want_out.abs().max() > 0.1
            torch.testing.assert_close(mod(x[:, :d_in]), want_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides,fmt,want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_official_and_native_conversion_give_identical_logits(tmp_path, overrides, fmt, want):
    write_official(tmp_path / "off", overrides, fmt)
    assert convert_main([str(tmp_path / "off"), str(tmp_path / "native")]) == 0
    assert json.loads((tmp_path / "native" / "adapter_config.json").read_text())["method"] == want["method"]
    model = tiny_llama_model()
    ids = [1, 40, 41, 42, 200, 7, 9]
    official = ReferenceModel(model, adapter=tmp_path / "off").logits(ids)
    native = ReferenceModel(model, adapter=tmp_path / "native").logits(ids)
    bare = ReferenceModel(model).logits(ids)
    assert torch.equal(official, native)
    assert not torch.allclose(official, bare, atol=1e-3)   # the adapter really changes the output


# -- bad official checkpoints ---------------------------------------------------------------------------------------
BLOCK = dict(enable_block_adapter=True, block_adapter_type="ffn", lora_nums=3)
COMP = dict(lora_nums=2)
K = "base_model.model.model.layers.1.mlp.block_adapter.lora_B.2.weight"


def _drop(key):
    return lambda state: state.pop(key)


def _add(key, shape=(64, 4)):
    return lambda state: state.update({key: torch.zeros(shape)})


BAD = [  # (id, official overrides, state mutation, error class, substrings)
    ("missing-expert", BLOCK, _drop(K), CheckpointError, ["adapter_model.bin", "missing", K]),
    ("extra-expert", BLOCK, _add("base_model.model.model.layers.0.mlp.block_adapter.lora_B.3.weight"),
     CheckpointError, ["adapter_model.bin", "unexpected", "lora_B.3.weight"]),
    ("adapter-name-infix", COMP, _add("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"),
     CheckpointError, ["unexpected", "lora_A.default.weight"]),
    ("saved-module", COMP, _add("base_model.model.lm_head.weight", (260, 64)), CheckpointError,
     ["unexpected", "base_model.model.lm_head.weight"]),
    ("missing-router", COMP, _drop("base_model.model.model.layers.0.self_attn.v_proj.lora_route.weight"),
     CheckpointError, ["missing", "layers.0.self_attn.v_proj.lora_route.weight"]),
    ("expert-shape", COMP, _add("base_model.model.model.layers.0.self_attn.q_proj.lora_B1.weight", (64, 5)),
     CheckpointError, ["lora_B1.weight", "(64, 5)"]),
    ("nan", COMP, lambda s: s["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].fill_(float("nan")),
     CheckpointError, ["adapter_model.bin", "layers.1.self_attn.q_proj.lora_A", "NaN"]),
    ("bottleneck-style", {**BLOCK, "block_adapter_style": "bottleneck"}, None, ConfigError,
     ["adapter_config.json", "block_adapter_style"]),
    ("unknown-field", {"use_rslora": True}, None, ConfigError, ["adapter_config.json", "use_rslora"]),
    ("regex-targets", {"target_modules": ".*q_proj"}, None, ConfigError, ["adapter_config.json", "target_modules"]),
    ("missing-lora-nums", {"lora_nums": None}, None, ConfigError, ["adapter_config.json", "lora_nums"]),
    ("string-lora-nums", {"lora_nums": "2"}, None, ConfigError, ["adapter_config.json", "lora_nums"]),
    ("string-block-lora-nums", {**BLOCK, "lora_nums": "3"}, None, ConfigError, ["adapter_config.json", "lora_nums"]),
    ("string-rank", {"r": "8"}, None, ConfigError, ["adapter_config.json", "r"]),
    ("prefix-tuning", {"peft_type": "PREFIX_TUNING"}, None, ConfigError, ["adapter_config.json", "peft_type"]),
    ("saved-modules-field", {"modules_to_save": ["lm_head"]}, None, ConfigError, ["modules_to_save"]),
    ("bad-block-type", {**BLOCK, "block_adapter_type": "mlp"}, None, ConfigError, ["block_adapter_type"]),
    ("group-does-not-divide", {**BLOCK, "enable_fine_grained_routing": True, "routing_group_size": 24}, None,
     CheckpointError, ["routing_group_size 24", "64"]),
]


@pytest.mark.parametrize("overrides,mutate,exc,needles", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_official_checkpoint(tmp_path, overrides, mutate, exc, needles):
    cfg = {**OFFICIAL_DEFAULTS, **overrides}
    d = tmp_path / "off"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    # Build the state from a valid variant of the config, so config errors are not masked by key errors.
    try:
        state = make_official_state(cfg)
    except (KeyError, TypeError, ZeroDivisionError):
        state = make_official_state({**OFFICIAL_DEFAULTS, **BLOCK})
    if mutate is not None:
        mutate(state)
    torch.save(state, d / "adapter_model.bin")
    with pytest.raises(exc) as err:
        load_adapter(d, model_config=MCFG)
    for needle in needles:
        assert needle in str(err.value), f"{needle!r} not in {str(err.value)!r}"
    assert str(d) in str(err.value)


def test_bin_is_loaded_with_weights_only(tmp_path):
    """A pickle that would run code on a plain torch.load is refused, and its code never runs."""
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    write_official(tmp_path / "off", {}, "bin")
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Payload()},
               tmp_path / "off" / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="weights_only") as err:
        load_adapter(tmp_path / "off")
    assert "adapter_model.bin" in str(err.value)
    assert not marker.exists()


def test_truncated_bin_and_missing_weights(tmp_path):
    write_official(tmp_path / "off", {}, "bin")
    data = (tmp_path / "off" / "adapter_model.bin").read_bytes()
    (tmp_path / "off" / "adapter_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="adapter_model.bin"):
        load_adapter(tmp_path / "off")
    (tmp_path / "off" / "adapter_model.bin").unlink()
    with pytest.raises(CheckpointError, match="adapter_model.bin: file not found"):
        load_adapter(tmp_path / "off")


def test_layer_count_checked_against_base(tmp_path):
    write_official(tmp_path / "off", COMP, "bin")
    load_adapter(tmp_path / "off")                       # without a base: layers inferred from the keys
    with pytest.raises(CheckpointError, match=r"missing \['base_model\.model\.model\.layers\.2\."):
        load_adapter(tmp_path / "off", model_config=tiny_llama_config(num_hidden_layers=3))


def test_cli_help_and_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as ex:
        convert_main(["--help"])
    assert ex.value.code == 0 and "--base-model" in capsys.readouterr().out
    assert convert_main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_records_base_fingerprint(tmp_path, tiny_model_dir):
    from mtlora.base import config_fingerprint

    write_official(tmp_path / "off", BLOCK, "bin")
    assert convert_main([str(tmp_path / "off"), str(tmp_path / "native"), "--base-model", str(tiny_model_dir)]) == 0
    config, _ = load_adapter(tmp_path / "native", model_config=MCFG)
    assert config.base_fingerprint == config_fingerprint(MCFG)
    save_adapter(tmp_path / "again", config, load_adapter(tmp_path / "native")[1])   # native stays loadable


def test_cli_bad_base_model_is_an_error_naming_the_flag(tmp_path, capsys):
    write_official(tmp_path / "off", BLOCK, "bin")
    assert convert_main([str(tmp_path / "off"), str(tmp_path / "native"), "--base-model",
                         str(tmp_path / "no-such-model")]) == 1
    err = capsys.readouterr().err
    assert "--base-model" in err and str(tmp_path / "no-such-model") in err
    assert not (tmp_path / "native").exists()
