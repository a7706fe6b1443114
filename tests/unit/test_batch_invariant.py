"""Batch-invariant mode (engine/invariant.py): a greedy or seeded request gives bit-identical tokens, logprobs and
prompt logprobs alone and inside 32 mixed requests (every adapter method, a shared prefix from the prefix cache,
prompts chunked by a small token budget), in fp32 and bf16; the attention it uses agrees with plain attention; the
probe rejects row-dependent ops; and the default mode really does move with the batch (so the test can fail)."""

from __future__ import annotations

import random

import pytest
import torch

from mtlora.errors import ConfigError
from mtlora.testing import make_tiny_model_dir
from mtlora_server.engine import invariant
from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.testing import run_to_completion, tiny_engine_args, write_tiny_adapters
from mtlora_server.engine.types import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-invariant")
    model_dir = make_tiny_model_dir(root / "model", seed=3)
    adapters = write_tiny_adapters(root / "adapters", EngineCore(tiny_engine_args(model_dir)).hf_config)
    return model_dir, adapters


def _core(env, dtype: str, invariant_mode: bool) -> EngineCore:
    model_dir, adapters = env
    return EngineCore(tiny_engine_args(model_dir, dtype=dtype, adapters=adapters, batch_invariant=invariant_mode,
                                       kv_cache_memory=64 << 20, max_num_batched_tokens=160, max_num_seqs=64))


def _workload(adapters: list[str]):
    """(greedy target, seeded target, 32 others): lengths 5..120, every adapter and the base, one sharing the
    greedy target's first 40 tokens (a prefix-cache hit), one with the same prompt on the same adapter."""
    rng = random.Random(0)
    names = [None, *adapters]

    def params(seed=None, **kw):
        return SamplingParams(max_tokens=20, temperature=0.0 if seed is None else 0.9, seed=seed, top_p=0.95,
                              logprobs=2, ignore_eos=True, **kw)

    def prompt(n):
        return [rng.randrange(3, 250) for _ in range(n)]

    target = GenerationRequest("target", prompt(90), params(prompt_logprobs=1), adapter="mt_both")
    seeded = GenerationRequest("seeded", prompt(50), params(seed=7), adapter="hydra")
    others = [GenerationRequest(f"o{i}", prompt(rng.randrange(5, 120)), params(seed=i if i % 3 else None),
                                adapter=names[i % len(names)]) for i in range(32)]
    others[4].prompt_token_ids = target.prompt_token_ids[:40] + others[4].prompt_token_ids
    others[4].adapter = target.adapter
    others[9].prompt_token_ids = list(target.prompt_token_ids)
    others[9].adapter = target.adapter
    return target, seeded, others


def _numbers(result):
    return (result.tokens, [[(lp.token_id, lp.logprob, lp.top) for lp in lps] for lps in result.logprobs.values()],
            [None if lp is None else (lp.logprob, lp.top) for lp in (result.prompt_logprobs or [])])


def _alone_and_mixed(env, dtype, invariant_mode):
    target, seeded, others = _workload(list(env[1]))
    alone = {r.request_id: _numbers(run_to_completion(_core(env, dtype, invariant_mode), [r])[r.request_id])
             for r in (target, seeded)}
    mixed = run_to_completion(_core(env, dtype, invariant_mode), others[:7] + [target] + others[7:20] + [seeded]
                              + others[20:])
    return alone, {rid: _numbers(mixed[rid]) for rid in alone}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_request_is_bit_identical_alone_and_inside_32_mixed_requests(env, dtype):
    alone, mixed = _alone_and_mixed(env, dtype, invariant_mode=True)
    for rid in alone:
        assert mixed[rid] == alone[rid], f"{rid} ({dtype}) differs between alone and mixed"


def test_without_the_mode_the_same_workload_moves_with_the_batch(env):
    """The check above can fail: the default fp32 path gives slightly different logprobs for the same workload."""
    alone, mixed = _alone_and_mixed(env, "float32", invariant_mode=False)
    assert any(mixed[rid] != alone[rid] for rid in alone)


def test_the_mode_stays_close_to_the_default_numerics(env):
    target, _, _ = _workload(list(env[1]))
    fast = run_to_completion(_core(env, "float32", False), [target])["target"]
    exact = run_to_completion(_core(env, "float32", True), [target])["target"]
    assert fast.tokens == exact.tokens
    got = torch.tensor([lp.logprob for lp in exact.logprobs[0]])
    want = torch.tensor([lp.logprob for lp in fast.logprobs[0]])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# -- attention ---------------------------------------------------------------------------------------------------
def _plain_attention(q, keys, values, mask, scale):
    """Straight from the formula, one (sequence, head) at a time. q: [G, Q, H, hd]; keys/values: [KV, G, K, hd]."""
    G, Q, H, hd = q.shape
    gh = H // keys.shape[0]
    out = torch.empty(G, Q, H, hd, dtype=torch.float64)
    for g in range(G):
        for h in range(H):
            s = q[g, :, h].double() @ keys[h // gh, g].double().T * scale             # [Q, K]
            s = s.masked_fill(~mask[g, 0], float("-inf"))
            out[g, :, h] = torch.softmax(s, -1) @ values[h // gh, g].double()
    return out


@pytest.mark.parametrize("G,Q,H,KV,hd,K,tile", [(1, 1, 4, 2, 16, 7, 1), (3, 1, 9, 3, 64, 130, 4),
                                                  (2, 17, 4, 4, 8, 64, 2), (4, 5, 6, 2, 16, 200, 8)])
def test_invariant_attention_equals_plain_attention(G, Q, H, KV, hd, K, tile):
    gen = torch.Generator().manual_seed(G * 100 + K)
    q = torch.randn(G, Q, H, hd, generator=gen)
    keys, values = torch.randn(2, KV, G, K, hd, generator=gen)
    lengths = torch.randint(1, K + 1, (G,), generator=gen)
    pos = lengths[:, None] - Q + torch.arange(Q)[None, :]                                  # [G, Q] query positions
    mask = (torch.arange(K)[None, None, :] <= pos[:, :, None]) | (torch.arange(K) == 0)   # never an empty row
    mask = mask[:, None]                                                                   # [G, 1, Q, K]
    got = invariant.invariant_attention(q, keys, values, mask, hd ** -0.5, tile)
    torch.testing.assert_close(got.double(), _plain_attention(q, keys, values, mask, hd ** -0.5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_attention_ignores_neighbours_and_key_padding(dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 9, 64, generator=gen).to(dtype)
    keys, values = torch.randn(2, 3, 1, 100, 64, generator=gen).to(dtype)
    alone = invariant.invariant_attention(q, keys, values, torch.ones(1, 1, 1, 100, dtype=torch.bool), 0.125, 4)
    G, K = 6, 333                                       # five other sequences, longer keys, our row in the middle
    qs = torch.randn(G, 1, 9, 64, generator=gen).to(dtype)
    ks, vs = torch.randn(2, 3, G, K, 64, generator=gen).to(dtype)
    qs[2], ks[:, 2, :100], vs[:, 2, :100] = q[0], keys[:, 0], values[:, 0]
    lengths = torch.tensor([5, 333, 100, 64, 65, 250])
    mask = (torch.arange(K)[None, :] < lengths[:, None])[:, None, None, :]
    mixed = invariant.invariant_attention(qs, ks, vs, mask, 0.125, 4)
    assert torch.equal(mixed[2], alone[0])


# -- the probe ---------------------------------------------------------------------------------------------------
def test_row_invariance_check_tells_row_dependent_ops_apart():
    x = torch.randn(400, 8)
    assert invariant._row_invariant(lambda a: 2 * a + 1, x, 1, [1, 2, 3, 64])                   # row-wise
    assert not invariant._row_invariant(lambda a: a + a.shape[0], x, 1, [1, 2, 3, 64])             # depends on M
    assert not invariant._row_invariant(lambda a: a + torch.arange(a.shape[0])[:, None], x, 1, [1, 2, 64])  # place


def test_probe_refuses_a_machine_without_invariant_matmuls(monkeypatch):
    monkeypatch.setattr(invariant, "_row_invariant", lambda *a: False)
    with pytest.raises(ConfigError, match="batch-invariant"):
        invariant.probe_row_tile({"w": torch.randn(4, 8)}, 16, torch.float32, torch.device("cpu"), 64)


@pytest.mark.parametrize("rows,tile,want", [(1, 1, 1), (1, 4, 4), (5, 4, 8), (8, 4, 8), (3, 0, 3)])
def test_pad_rows_to_whole_tiles(rows, tile, want):
    x = torch.randn(rows, 3)
    padded = invariant.pad_rows(x, tile)
    assert padded.shape == (want, 3) and torch.equal(padded[:rows], x) and not padded[rows:].any()
