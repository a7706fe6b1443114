"""Tiny random LLaMA models for tests, examples and smoke runs (no downloads).

`tiny_llama_config(**overrides)` builds a transformers LlamaConfig small enough for a test to run in well under a
second; `make_tiny_model_dir(path)` writes a complete Hugging Face model directory (config.json, safetensors and a
working tokenizer) that every loader in this project accepts, so the server and trainer can be driven end to end.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    model.eval()
    return model


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_TO_CHAR = _bytes_to_unicode()


def _byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 3 specials + 256 byte tokens (259 ids), fully offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for byte in range(256):                     # ids 3..258 are the bytes 0..255, in order
        vocab[_BYTE_TO_CHAR[byte]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return fast


def make_tiny_model_dir(path: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random LLaMA model + tokenizer as a Hugging Face directory; returns the path."""
    path = Path(path)
    model = tiny_llama_model(seed=seed, **overrides)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(path, safe_serialization=True)
    _byte_tokenizer().save_pretrained(path)
    return path
