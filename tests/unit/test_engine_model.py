"""The engine's own LLaMA decoder against transformers (fp32, 1e-4), through the paged KV pool and runner."""

from __future__ import annotations

import json

import pytest
import torch

from mtlora.errors import CheckpointError, ConfigError
from mtlora.testing import make_tiny_model_dir
from mtlora_server.engine.kv_cache import KVCachePool
from mtlora_server.engine.model import LlamaDecoder, ModelConfig
from mtlora_server.engine.runner import ModelRunner
from mtlora_server.engine.scheduler import Chunk, Sequence

VARIANTS = {
    "gqa": {},
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa": dict(num_key_value_heads=1),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "dynamic_within": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


def _runner(model_dir, num_blocks=64):
    model = LlamaDecoder.from_dir(model_dir, torch.float32, "cpu", max_len=256)
    c = model.cfg
    pool = KVCachePool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_blocks, 16, torch.float32)
    return ModelRunner(model, pool, None, torch.device("cpu")), pool


def _hf(model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    model_dir = make_tiny_model_dir(tmp_path, seed=3, **VARIANTS[variant])
    runner, pool = _runner(model_dir)
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(3, 259, (40,), generator=gen).tolist()
    b = torch.randint(3, 259, (13,), generator=gen).tolist()
    sa = Sequence(0, a, len(a), blocks=pool.allocate(3))
    sb = Sequence(1, b, len(b), blocks=pool.allocate(1))
    # Chunked prefill of `a`; its second chunk shares a step (and the padded attention) with all of `b`.
    first = runner.run([Chunk(sa, 0, 19)], [list(range(19))])
    second = runner.run([Chunk(sa, 19, 21), Chunk(sb, 0, 13)], [list(range(19, 40)), list(range(13))])
    hf = _hf(model_dir)
    with torch.no_grad():
        ref_a = hf(torch.tensor([a])).logits[0]
        ref_b = hf(torch.tensor([b])).logits[0]
    torch.testing.assert_close(torch.cat([first, second[:21]]), ref_a, atol=1e-4, rtol=0)
    torch.testing.assert_close(second[21:], ref_b, atol=1e-4, rtol=0)


def test_mixed_decode_and_prefill_step_matches_transformers(tmp_path):
    """One step holding two decodes (different lengths), a fresh prompt and a continuing chunk: the decodes and
    the prefill chunks attend in separate groups, and every row still equals transformers."""
    model_dir = make_tiny_model_dir(tmp_path, seed=6)
    runner, pool = _runner(model_dir)
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 259, (n,), generator=gen).tolist() for n in (9, 23, 14, 30)]
    s = [Sequence(i, ids, len(ids), blocks=pool.allocate(2)) for i, ids in enumerate(seqs)]
    runner.run([Chunk(s[0], 0, 8), Chunk(s[1], 0, 22), Chunk(s[3], 0, 11)], [[], [], []])
    out = runner.run([Chunk(s[3], 11, 19), Chunk(s[0], 8, 1), Chunk(s[2], 0, 14), Chunk(s[1], 22, 1)],
                     [list(range(11, 30)), [8], list(range(14)), [22]])
    hf = _hf(model_dir)
    with torch.no_grad():
        ref = [hf(torch.tensor([ids])).logits[0] for ids in seqs]
    torch.testing.assert_close(out[:19], ref[3][11:], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[19], ref[0][8], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[20:34], ref[2], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[34], ref[1][22], atol=1e-4, rtol=0)


def test_decode_steps_match_transformers_cache(tmp_path):
    """Decode one token at a time through the pool; also dynamic NTK beyond max_position_embeddings, where the
    engine's per-position frequencies equal what HF applies in cached decoding."""
    model_dir = make_tiny_model_dir(tmp_path, seed=4, max_position_embeddings=16,
                                    rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    runner, pool = _runner(model_dir)
    ids = torch.randint(3, 259, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    seq = Sequence(0, ids, len(ids), blocks=pool.allocate(2))
    mine = [runner.run([Chunk(seq, 0, 4)], [[3]])[0]]
    for p in range(4, 30):
        mine.append(runner.run([Chunk(seq, p, 1)], [[p]])[0])
    hf = _hf(model_dir)
    out = hf(torch.tensor([ids[:4]]), use_cache=True)
    ref, past = [out.logits[0, -1]], out.past_key_values
    with torch.no_grad():
        for p in range(4, 30):
            out = hf(torch.tensor([[ids[p]]]), past_key_values=past, use_cache=True)
            ref.append(out.logits[0, -1])
            past = out.past_key_values
    torch.testing.assert_close(torch.stack(mine), torch.stack(ref).detach(), atol=1e-4, rtol=0)


def test_logits_only_where_asked(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path)
    runner, pool = _runner(model_dir)
    ids = list(range(3, 23))
    seq = Sequence(0, ids, len(ids), blocks=pool.allocate(2))
    out = runner.run([Chunk(seq, 0, 20)], [[19]])
    assert out.shape == (1, 260)
    seq2 = Sequence(1, ids, len(ids), blocks=pool.allocate(2))
    none = runner.run([Chunk(seq2, 0, 20)], [[]])
    assert none.shape == (0, 260)


def test_fused_weights_are_concatenations(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path)
    model = LlamaDecoder.from_dir(model_dir)
    hf = _hf(model_dir)
    layer = hf.model.layers[1]
    a = layer.self_attn
    torch.testing.assert_close(model.layers[1]["qkv"],
                               torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
    torch.testing.assert_close(model.layers[1]["gate_up"],
                               torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]))


@pytest.mark.parametrize("patch,field", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0, "long_factor": [1.0] * 8, "short_factor": [1.0] * 8,
                       "original_max_position_embeddings": 128}}, "rope_scaling"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_unsupported_config_names_field(tmp_path, patch, field):
    model_dir = make_tiny_model_dir(tmp_path)
    data = json.loads((model_dir / "config.json").read_text())
    data.pop("rope_parameters", None) if "rope_scaling" in patch else None
    data.update(patch)
    (model_dir / "config.json").write_text(json.dumps(data))
    with pytest.raises((ConfigError, CheckpointError)) as info:   # base.load_config checks the head arithmetic
        ModelConfig.from_dir(model_dir)
    assert info.value.field == field and "config.json" in str(info.value)


def test_engine_reads_the_model_through_mtlora_base(tmp_path):
    """One base-model truth: a sharded checkpoint (with its index) gives the engine the same weights and logits
    as one file, a stray unlisted file is not globbed in, a missing shard is an error naming the file; RoPE
    settings are the ones mtlora.base reads."""
    from safetensors.torch import save_file

    from mtlora.base import INDEX_FILE, load_config, rope_parameters

    one = make_tiny_model_dir(tmp_path / "one", seed=5, rope_scaling={"rope_type": "linear", "factor": 2.0})
    sharded = tmp_path / "sharded"
    _hf(one).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / INDEX_FILE).is_file()
    a, b = LlamaDecoder.from_dir(one), LlamaDecoder.from_dir(sharded)
    assert a.cfg == b.cfg
    rope = rope_parameters(load_config(one))
    assert b.cfg.rope_theta == rope["rope_theta"] and b.cfg.rope_scaling["factor"] == rope["factor"]
    for name in ("qkv", "o", "gate_up", "down", "in_norm", "post_norm"):
        assert torch.equal(a.layers[1][name], b.layers[1][name]), name
    assert torch.equal(a.embed, b.embed) and torch.equal(a.lm_head, b.lm_head)
    save_file({"model.embed_tokens.weight": torch.zeros_like(a.embed)}, str(sharded / "stale.safetensors"))
    assert torch.equal(LlamaDecoder.from_dir(sharded).embed, a.embed)
    shard = sorted(json.loads((sharded / INDEX_FILE).read_text())["weight_map"].values())[0]
    (sharded / shard).unlink()
    with pytest.raises(CheckpointError, match="missing") as info:
        LlamaDecoder.from_dir(sharded)
    assert shard in str(info.value)


@pytest.mark.parametrize("head_dim", [16, 12])          # 16: the scale is a power of two (applied to q); 12: not
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_masked_sdpa(head_dim, dtype):
    """The decode attention (scaled q or scores, additive mask, softmax in the compute dtype) == SDPA's math on the
    same padded keys, GQA (2 KV heads, 3 query heads each), sequences of different lengths."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(head_dim)
    B, kvh, G, kmax = 5, 2, 3, 9
    q = torch.randn(B, kvh * G, head_dim, generator=g).to(dtype)
    keys, values = (torch.randn(kvh, B, kmax, head_dim, generator=g).to(dtype) for _ in range(2))
    lens = torch.tensor([9, 1, 4, 7, 2])
    mask = (torch.arange(kmax)[None] < lens[:, None])[:, None, None, :]               # [B, 1, 1, Kmax]
    got = LlamaDecoder._decode_attention(SimpleNamespace(scale=head_dim ** -0.5), q, keys, values, mask)
    k = keys.float().repeat_interleave(G, dim=0).transpose(0, 1)                       # [B, H, Kmax, hd]
    v = values.float().repeat_interleave(G, dim=0).transpose(0, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q.float()[:, :, None], k, v, attn_mask=mask)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), want.reshape(B, -1), **tol)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN (mkldnn)")
def test_prepacked_bf16_weights_give_the_same_logits(tmp_path):
    """prepack_weights() swaps every projection and the (tied) lm_head for oneDNN-prepacked weights: prefill and
    a mixed decode step give the same bf16 logits as the dense weights, and the embedding stays dense."""
    model_dir = make_tiny_model_dir(tmp_path, seed=4)
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.randint(3, 259, (n,), generator=gen).tolist() for n in (19, 6))
    outs = []
    for packed in (False, True):
        model = LlamaDecoder.from_dir(model_dir, torch.bfloat16, "cpu", max_len=256)
        if packed:
            assert model.prepack_weights()
            assert all(w[k].is_mkldnn for w in model.layers for k in ("qkv", "o", "gate_up", "down"))
            assert model.lm_head.is_mkldnn and not model.embed.is_mkldnn
        c = model.cfg
        pool = KVCachePool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 16, 16, torch.bfloat16)
        runner = ModelRunner(model, pool, None, torch.device("cpu"))
        sa, sb = Sequence(0, list(a), 19, blocks=pool.allocate(2)), Sequence(1, list(b), 6, blocks=pool.allocate(1))
        first = runner.run([Chunk(sa, 0, 19), Chunk(sb, 0, 6)], [list(range(19)), list(range(6))])
        sa.token_ids.append(7)
        sb.token_ids.append(9)
        second = runner.run([Chunk(sa, 19, 1), Chunk(sb, 6, 1)], [[19], [6]])
        outs.append(torch.cat([first, second]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN (mkldnn)")
def test_bf16_cpu_engine_prepacks_and_generates_the_same_tokens(tmp_path, monkeypatch):
    """A bf16 CPU engine (eager decode) runs prepacked weights; greedy continuations of a batch equal those of the
    same engine with prepacking turned off."""
    from mtlora_server.engine.core import EngineCore
    from mtlora_server.engine.testing import run_to_completion, tiny_engine_args
    from mtlora_server.engine.types import GenerationRequest, SamplingParams

    model_dir = make_tiny_model_dir(tmp_path, seed=5)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 259, (n,), generator=gen).tolist() for n in (5, 17, 30)]

    def tokens(core):
        reqs = [GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
                for i, p in enumerate(prompts)]
        return {rid: res.tokens[0] for rid, res in run_to_completion(core, reqs).items()}

    packed = EngineCore(tiny_engine_args(model_dir, dtype="bfloat16"))
    assert packed.model.lm_head.is_mkldnn
    got = tokens(packed)
    monkeypatch.setattr(LlamaDecoder, "prepack_weights", lambda self: False)
    dense = EngineCore(tiny_engine_args(model_dir, dtype="bfloat16"))
    assert not dense.model.lm_head.is_mkldnn
    assert got == tokens(dense)
