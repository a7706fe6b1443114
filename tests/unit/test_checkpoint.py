"""Native checkpoints: bit-exact round trips, atomic replacement, and a table of bad inputs whose errors must name
the file and the field/tensor at fault."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mtlora import inject
from mtlora.checkpoint import CONFIG_NAME, WEIGHTS_NAME, count_parameters, load_adapter, save_adapter
from mtlora.config import AdapterConfig
from mtlora.errors import CheckpointError, ConfigError, IncompatibleAdapterError
from mtlora.reference import random_adapter_tensors
from mtlora.testing import tiny_llama_config, tiny_llama_model

MCFG = tiny_llama_config()
CONFIGS = {
    "mtlora": AdapterConfig(method="mtlora", placement="both", rank=4, num_experts=3, routing_group_size=16),
    "hydralora": AdapterConfig(method="hydralora", target_modules=["q_proj", "k_proj", "down_proj"], rank=2,
                               num_experts=2),
    "lora": AdapterConfig(method="lora", target_modules=["v_proj"], rank=8, alpha=4.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_round_trip_bit_exact(tmp_path, method, dtype):
    config = CONFIGS[method]
    tensors = random_adapter_tensors(config, MCFG, seed=1, dtype=dtype)
    save_adapter(tmp_path / "ad", config, tensors)
    loaded_cfg, loaded = load_adapter(tmp_path / "ad", model_config=MCFG)
    assert loaded_cfg == config
    assert sorted(loaded) == sorted(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], t), name
    # The config file is plain, versioned JSON.
    assert json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())["format_version"] == config.format_version


def test_load_converts_dtype_and_loads_into_model(tmp_path):
    config = CONFIGS["mtlora"]
    save_adapter(tmp_path / "ad", config, random_adapter_tensors(config, MCFG))
    _, tensors = load_adapter(tmp_path / "ad", model_config=MCFG, dtype=torch.bfloat16)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    model = tiny_llama_model()
    inject.attach(model, config)
    inject.load_adapter_state(model, tensors)
    for name, value in inject.adapter_state_dict(model).items():
        assert torch.equal(value, tensors[name].float())


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside-fallback"])
def test_save_replaces_existing_directory_atomically(tmp_path, monkeypatch, exchange):
    if not exchange:  # platforms without renameat2(RENAME_EXCHANGE) take the fallback path
        monkeypatch.setattr("mtlora.checkpoint._rename_exchange", lambda a, b: False)
    config = CONFIGS["lora"]
    first, second = (random_adapter_tensors(config, MCFG, seed=s) for s in (1, 2))
    save_adapter(tmp_path / "ad", config, first)
    (tmp_path / "ad" / "stale.txt").write_text("from the old version")
    save_adapter(tmp_path / "ad", config, second)
    _, loaded = load_adapter(tmp_path / "ad")
    assert all(torch.equal(loaded[k], second[k]) for k in second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]      # no temp or backup dirs left behind
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_save_refuses_bad_tensors_and_leaves_nothing(tmp_path):
    config = CONFIGS["lora"]
    tensors = random_adapter_tensors(config, MCFG)
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        save_adapter(tmp_path / "ad", config, tensors)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_count_parameters_matches_attached_model(method):
    model = tiny_llama_model()
    adapters = inject.attach(model, CONFIGS[method])
    want = sum(p.numel() for a in adapters.values() for p in a.parameters())
    assert count_parameters(CONFIGS[method], MCFG) == want
    if method == "mtlora":  # by hand: 2 layers x 2 sites x (A 4*64 + B 3*64*4 + R (64/16*3)*64)
        assert want == 2 * 2 * (4 * 64 + 3 * 64 * 4 + 12 * 64)


def test_fingerprint_checked_against_base(tmp_path):
    from mtlora import base

    config = AdapterConfig(**{**CONFIGS["lora"].to_dict(), "base_fingerprint": base.config_fingerprint(MCFG)})
    save_adapter(tmp_path / "ad", config, random_adapter_tensors(config, MCFG))
    load_adapter(tmp_path / "ad", model_config=MCFG)                  # same base: fine
    other = tiny_llama_config(rope_theta=1234.0)  # same shapes, different architecture fields
    if base.config_fingerprint(other) == base.config_fingerprint(MCFG):
        other = tiny_llama_config(vocab_size=300)
    with pytest.raises(IncompatibleAdapterError) as err:
        load_adapter(tmp_path / "ad", model_config=other)
    assert CONFIG_NAME in str(err.value) and "base_fingerprint" in str(err.value)


# -- bad inputs ----------------------------------------------------------------------------------------------------
def _edit_json(fn):
    def mutate(d: Path):
        data = json.loads((d / CONFIG_NAME).read_text())
        fn(data)
        (d / CONFIG_NAME).write_text(json.dumps(data))
    return mutate


def _edit_tensors(fn):
    from safetensors.torch import load_file, save_file

    def mutate(d: Path):
        tensors = load_file(str(d / WEIGHTS_NAME))
        fn(tensors)
        save_file(tensors, str(d / WEIGHTS_NAME))
    return mutate


def _truncate(d: Path):
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _garble_header(d: Path):
    data = bytearray((d / WEIGHTS_NAME).read_bytes())
    data[8:40] = b"#" * 32
    (d / WEIGHTS_NAME).write_bytes(bytes(data))


A0 = "layers.0.mlp.lora_A"
B1 = "layers.1.self_attn.lora_B"
R0 = "layers.0.mlp.router"
BAD = [  # (id, mutate(dir), model_config, error class, substrings that must appear in the message)
    ("missing-config", lambda d: (d / CONFIG_NAME).unlink(), None, CheckpointError, [CONFIG_NAME, "not found"]),
    ("missing-weights", lambda d: (d / WEIGHTS_NAME).unlink(), None, CheckpointError, [WEIGHTS_NAME, "not found"]),
    ("corrupt-json", lambda d: (d / CONFIG_NAME).write_text('{"method": "mtlora",'), None, CheckpointError,
     [CONFIG_NAME, "invalid JSON", "line 1"]),
    ("json-not-object", lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), None, CheckpointError,
     [CONFIG_NAME, "JSON object"]),
    ("unknown-method", _edit_json(lambda c: c.update(method="dora")), None, ConfigError,
     [CONFIG_NAME, "method", "dora"]),
    ("unknown-field", _edit_json(lambda c: c.update(lora_magic=1)), None, ConfigError, [CONFIG_NAME, "lora_magic"]),
    ("bad-rank", _edit_json(lambda c: c.update(rank=0)), None, ConfigError, [CONFIG_NAME, "rank"]),
    ("string-dropout", _edit_json(lambda c: c.update(dropout="0.1")), None, ConfigError, [CONFIG_NAME, "dropout"]),
    ("missing-method", _edit_json(lambda c: c.pop("method")), None, ConfigError, [CONFIG_NAME, "method"]),
    ("newer-version", _edit_json(lambda c: c.update(format_version=99)), None, ConfigError,
     [CONFIG_NAME, "format_version"]),
    ("string-version", _edit_json(lambda c: c.update(format_version="1")), None, ConfigError,
     [CONFIG_NAME, "format_version"]),
    ("bool-alpha", _edit_json(lambda c: c.update(alpha=True)), None, ConfigError, [CONFIG_NAME, "alpha"]),
    ("string-group-size", _edit_json(lambda c: c.update(routing_group_size="16")), None, ConfigError,
     [CONFIG_NAME, "routing_group_size"]),
    ("bool-group-size", _edit_json(lambda c: c.update(routing_group_size=True)), None, ConfigError,
     [CONFIG_NAME, "routing_group_size"]),
    ("string-target-modules", _edit_json(lambda c: c.update(method="lora", placement=None, num_experts=1,
                                                            routing_group_size=None, target_modules="q_proj")),
     None, ConfigError, [CONFIG_NAME, "target_modules", "list"]),
    ("truncated-safetensors", _truncate, None, CheckpointError, [WEIGHTS_NAME, "truncated"]),
    ("garbled-safetensors", _garble_header, None, CheckpointError, [WEIGHTS_NAME, "corrupt"]),
    ("nan", _edit_tensors(lambda t: t[A0].view(-1).__setitem__(3, float("nan"))), None, CheckpointError,
     [WEIGHTS_NAME, A0, "NaN"]),
    ("inf", _edit_tensors(lambda t: t[B1].view(-1).__setitem__(0, float("-inf"))), None, CheckpointError,
     [WEIGHTS_NAME, B1, "Inf"]),
    ("missing-tensor", _edit_tensors(lambda t: t.pop(R0)), None, CheckpointError, [WEIGHTS_NAME, R0, "missing"]),
    ("extra-tensor", _edit_tensors(lambda t: t.update({"layers.0.mlp.lora_C": torch.zeros(2)})), None,
     CheckpointError, [WEIGHTS_NAME, "layers.0.mlp.lora_C"]),
    ("extra-site", _edit_tensors(lambda t: t.update({"layers.0.self_attn.q_proj.lora_A": torch.zeros(4, 64)})),
     None, CheckpointError, [WEIGHTS_NAME, "layers.0", "self_attn.q_proj"]),
    ("rank-mismatch", _edit_tensors(lambda t: t.update({A0: torch.zeros(5, 64)})), None, CheckpointError,
     [WEIGHTS_NAME, A0, "rank=4"]),
    ("router-shape", _edit_tensors(lambda t: t.update({R0: torch.zeros(3, 64)})), None, CheckpointError,
     [WEIGHTS_NAME, R0, "groups*num_experts=12"]),
    ("int-tensor", _edit_tensors(lambda t: t.update({A0: torch.zeros(4, 64, dtype=torch.int32)})), None,
     CheckpointError, [WEIGHTS_NAME, A0, "dtype"]),
    ("wrong-base-width", None, tiny_llama_config(hidden_size=32, intermediate_size=64), IncompatibleAdapterError,
     [WEIGHTS_NAME, "layers.0", "shape"]),
    ("wrong-base-depth", None, tiny_llama_config(num_hidden_layers=3), IncompatibleAdapterError,
     [WEIGHTS_NAME, "layers.2.", "missing"]),
    ("group-does-not-divide-base", None, tiny_llama_config(hidden_size=72, num_attention_heads=4,
                                                           num_key_value_heads=2), IncompatibleAdapterError,
     [CONFIG_NAME, "routing_group_size 16", "72"]),
]


@pytest.mark.parametrize("mutate,model_config,exc,needles", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_file_and_field(tmp_path, mutate, model_config, exc, needles):
    config = CONFIGS["mtlora"]
    save_adapter(tmp_path / "ad", config, random_adapter_tensors(config, MCFG))
    if mutate is not None:
        mutate(tmp_path / "ad")
    with pytest.raises(exc) as err:
        load_adapter(tmp_path / "ad", model_config=model_config)
    message = str(err.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert str(tmp_path / "ad") in message      # the full path, not just a base name


def test_missing_or_file_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_adapter(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_adapter(tmp_path / "file")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_adapter(tmp_path / "file", CONFIGS["lora"], random_adapter_tensors(CONFIGS["lora"], MCFG))


def test_dtype_overflow_is_an_error(tmp_path):
    config = CONFIGS["lora"]
    tensors = random_adapter_tensors(config, MCFG)
    tensors["layers.1.self_attn.v_proj.lora_A"][0, 0] = 1e6
    save_adapter(tmp_path / "ad", config, tensors)
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.v_proj\.lora_A overflows"):
        load_adapter(tmp_path / "ad", dtype=torch.float16)
    assert math.isfinite(load_adapter(tmp_path / "ad", dtype=torch.bfloat16)[1][
        "layers.1.self_attn.v_proj.lora_A"][0, 0].item())
    tensors["layers.1.self_attn.v_proj.lora_A"][0, 0] = torch.finfo(torch.float32).max   # rounds up to bf16 Inf
    save_adapter(tmp_path / "edge", config, tensors)
    with pytest.raises(CheckpointError, match=r"lora_A overflows torch.bfloat16"):
        load_adapter(tmp_path / "edge", dtype=torch.bfloat16)


@pytest.mark.parametrize("source,target,overflows", [
    (torch.float32, torch.float32, False), (torch.bfloat16, torch.bfloat16, False),
    (torch.bfloat16, torch.float32, False), (torch.float16, torch.float32, False),
    (torch.float16, torch.bfloat16, False), (torch.float32, torch.bfloat16, True),
    (torch.float32, torch.float16, True), (torch.bfloat16, torch.float16, True)])
def test_only_narrowing_loads_check_for_overflow(source, target, overflows):
    """A same-type or widening load skips the second pass over the tensors (their values were checked finite)."""
    from mtlora.checkpoint import can_overflow

    assert can_overflow(source, target) is overflows


def _t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize("tensors,bad", [
    ({}, None),
    ({"a": _t([1.0, 2.0]), "b": torch.zeros(0)}, None),
    ({"a": _t([1.0, 2.0]), "b": _t([0.0, math.nan])}, "b"),
    ({"a": _t([math.inf, 1.0]), "b": _t([math.nan])}, "a"),                       # the first one, in order
    ({"a": _t([-math.inf, 3.0])}, "a"),
    ({"a": _t([math.inf, -math.inf])}, "a"),                                      # the sum is NaN, not 0
    ({"a": _t([1e308, 1e308], torch.float64)}, None),                              # finite values, sum overflows
    ({"a": _t([1e308, math.inf], torch.float64)}, "a"),
    ({"a": _t([3e38, 3e38, 3e38], torch.bfloat16)}, None),                         # float64 sum: no overflow
    ({"a": _t([60000.0, 60000.0], torch.float16), "b": _t([1.0, math.nan], torch.float16)}, "b"),
])
def test_first_non_finite(tensors, bad):
    """The summed fast path agrees with an elementwise isfinite check, overflowing sums and NaN from +-Inf
    included."""
    from mtlora.checkpoint import first_non_finite

    assert first_non_finite(tensors) == bad
    assert bad == next((n for n, t in tensors.items() if not torch.isfinite(t).all()), None)
