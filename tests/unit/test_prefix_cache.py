"""Automatic prefix caching: pool reference counts and eviction, and engine results with the cache equal to the
results without it (greedy tokens, sampled and prompt logprobs) while the hit counters show the reuse."""

from __future__ import annotations

import random

import pytest
import torch

from mtlora.testing import make_tiny_model_dir
from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.kv_cache import KVCacheFullError, KVCachePool
from mtlora_server.engine.prefix_cache import PrefixCache
from mtlora_server.engine.scheduler import Sequence
from mtlora_server.engine.testing import TINY_ADAPTERS, run_to_completion, tiny_engine_args, write_tiny_adapters
from mtlora_server.engine.types import GenerationRequest, SamplingParams


# -- pool ------------------------------------------------------------------------------------------------------
def test_pool_refcounts_and_lru_eviction_of_cached_blocks():
    pool = KVCachePool(1, 1, 4, 4, 2, torch.float32)
    evicted = []
    pool.on_evict = evicted.append
    a = pool.allocate(2)
    pool.mark_cached(a[0])
    pool.share(a[0])                                     # a second sequence holds the cached block
    pool.free(a)
    assert pool.num_used == 1 and pool.num_free == 3 and pool.num_evictable == 0
    pool.free([a[0]])
    assert pool.num_used == 0 and pool.num_free == 4 and pool.num_evictable == 1
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([a[0]])
    pool.share(a[0])                                     # a hit on an unreferenced cached block revives it
    assert pool.num_evictable == 0 and pool.num_used == 1
    pool.free([a[0]])
    fresh = pool.allocate(3)                             # plain free blocks go first: nothing evicted yet
    assert evicted == [] and a[0] not in fresh
    assert pool.allocate(1) == [a[0]] and evicted == [a[0]]
    with pytest.raises(KVCacheFullError):
        pool.allocate(1)
    with pytest.raises(RuntimeError, match="neither referenced nor cached"):
        KVCachePool(1, 1, 4, 2, 2, torch.float32).share(0)


class _Owner:
    class params:                                        # noqa: N801 (a stand-in for SamplingParams)
        prompt_logprobs = None


def _seq(i, ids, salt=0):
    s = Sequence(i, list(ids), len(ids), cache_salt=salt)
    s.owner = _Owner()
    return s


def test_match_needs_whole_blocks_same_salt_and_leaves_the_last_token():
    pool = KVCachePool(1, 1, 4, 16, 4, torch.float32)
    cache = PrefixCache(pool)
    a = _seq(0, range(10, 22))                           # 12 tokens = 3 full blocks
    a.blocks, a.num_computed = pool.allocate(3), 12
    cache.register(a, None, None)
    assert cache.num_cached_blocks == 3
    cases = [  # (tokens, salt) -> blocks reused
        (list(range(10, 22)), 0, 2),                     # identical: the last block is recomputed (last token)
        (list(range(10, 22)) + [5], 0, 3),
        (list(range(10, 18)) + [0, 0, 0, 0, 1], 0, 2),   # diverges inside block 2
        ([9] + list(range(11, 22)) + [1], 0, 0),         # diverges in block 0: later blocks never match
        (list(range(10, 22)) + [5], 7, 0),               # another adapter's K/V
    ]
    for tokens, salt, want in cases:
        hit = cache.match(_seq(1, tokens, salt))
        assert hit.num_blocks == want and hit.blocks == a.blocks[:want], (tokens, salt)


# -- engine ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-cache")
    model_dir = make_tiny_model_dir(root / "model", seed=3)
    core0 = EngineCore(tiny_engine_args(model_dir))
    paths = write_tiny_adapters(root, core0.hf_config)
    return model_dir, paths


def _core(env, cache=True, **kw):
    model_dir, paths = env
    return EngineCore(tiny_engine_args(model_dir, adapters=paths, enable_prefix_caching=cache, block_size=4, **kw))


def _ids(seed, n):
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _req(rid, ids, adapter=None, max_tokens=5, **kw):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)
    return GenerationRequest(rid, ids, params, adapter=adapter)


def _lp(entries):
    return torch.tensor([e.logprob for e in entries if e is not None])


def _same(a, b):
    assert a.tokens == b.tokens
    for i in a.logprobs:
        torch.testing.assert_close(_lp(a.logprobs[i]), _lp(b.logprobs[i]), atol=1e-5, rtol=0)
    if a.prompt_logprobs is not None:
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs) and b.prompt_logprobs[0] is None
        torch.testing.assert_close(_lp(a.prompt_logprobs), _lp(b.prompt_logprobs), atol=1e-5, rtol=0)
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
            assert [v for _, v in x.top] == pytest.approx([v for _, v in y.top], abs=1e-5)


@pytest.mark.parametrize("adapter", [None, *TINY_ADAPTERS])
def test_shared_prefix_hits_and_equals_uncached(env, adapter):
    shared = _ids(1, 26)
    reqs = [_req("first", shared + _ids(2, 5), adapter, logprobs=2),
            _req("second", shared + _ids(3, 7), adapter, logprobs=2)]
    off = _core(env, cache=False)
    want = {r.request_id: run_to_completion(off, [r])[r.request_id] for r in reqs}
    on = _core(env)
    got = {r.request_id: run_to_completion(on, [r])[r.request_id] for r in reqs}
    for rid in want:
        _same(want[rid], got[rid])
    assert on.prefix_cache.hits == 24                    # 6 full blocks of the 26 shared tokens
    assert on.pool.num_used == 0 and on.pool.num_free == on.pool.num_total


def test_prompt_logprobs_from_cache_equal_uncached(env):
    """Echo-style requests (max_tokens 0, prompt logprobs): the MMLU harness pattern of one context, four endings."""
    context = _ids(4, 30)
    endings = [[40], [41], [42], [43, 44]]
    off, on = _core(env, cache=False), _core(env)
    for k in (2, 1, 3, 0):                               # smaller k reuses stored entries, larger k cannot
        for e in endings:
            r = _req(f"k{k}-{e}", context + e, "mt_both", max_tokens=0, prompt_logprobs=k)
            a, b = run_to_completion(off, [r])[r.request_id], run_to_completion(on, [r])[r.request_id]
            _same(a, b)
            assert all(len(x.top) == k for x in b.prompt_logprobs[1:])
    # Every prompt has 7 full blocks before its last token, all reused (the last through its kept hidden state):
    # k=2 three hits, k=1 four, k=3 three (the stored top-2 entries are too short for the first), k=0 four.
    assert on.prefix_cache.hits == (3 + 4 + 3 + 4) * 28


def test_identical_prompts_submitted_together_wait_for_one_prefill(env):
    core = _core(env)
    ids = _ids(5, 33)
    reqs = [_req(f"r{i}", ids, "mt_ffn", max_tokens=4) for i in range(3)]
    res = run_to_completion(core, reqs)
    assert res["r0"].tokens == res["r1"].tokens == res["r2"].tokens
    assert core.prefix_cache.hits == 2 * 32              # r1 and r2 were deferred one step and reused 8 blocks
    n = run_to_completion(core, [_req("n", _ids(6, 21), None, max_tokens=3, n=3)])["n"]
    assert n.tokens[0] == n.tokens[1] == n.tokens[2]


def test_reloaded_adapter_does_not_reuse_stale_blocks(env):
    model_dir, paths = env
    core = _core(env)
    ids = _ids(7, 30)
    run_to_completion(core, [_req("a", ids, "lora")])
    core.remove_adapter("lora")
    config, tensors = core.read_adapter(paths["hydra"])
    core.install_adapter("lora", config, tensors)       # same name and slot, different weights
    hits = core.prefix_cache.hits
    got = run_to_completion(core, [_req("b", ids, "lora", logprobs=1)])["b"]
    assert core.prefix_cache.hits == hits
    ref = run_to_completion(_core(env, cache=False), [_req("b", ids, "hydra", logprobs=1)])["b"]
    _same(ref, got)


def test_random_traffic_with_eviction_equals_uncached(env):
    """A pool too small to keep everything: shared few-shot prefixes, evictions, preemption, aborts."""
    rng = random.Random(0)
    prefixes = [_ids(100 + i, rng.randrange(8, 30)) for i in range(4)]
    names = [None, *TINY_ADAPTERS]
    reqs = []
    for i in range(40):
        ids = prefixes[rng.randrange(4)] + _ids(200 + i, rng.randrange(1, 9))
        reqs.append(_req(f"q{i}", ids, names[i % 3], max_tokens=rng.randrange(1, 16),
                         prompt_logprobs=rng.choice([None, 1])))
    # 24 blocks of 4 tokens (2 layers x K,V x 2 heads x 16 dims x fp32 = 2 KiB a block): evicts and preempts.
    off, on = _core(env, cache=False), _core(env, kv_cache_memory=24 * 2048, max_num_seqs=6)
    assert on.pool.num_total == 24
    want = run_to_completion(off, reqs)
    got = {}
    for start in range(0, len(reqs), 10):                # waves, so later waves find (some) cached prefixes
        got.update(run_to_completion(on, reqs[start:start + 10]))
    for rid in want:
        _same(want[rid], got[rid])
    assert on.prefix_cache.hits > 0 and on.prefix_cache.evictions > 0 and on.scheduler.num_preemptions > 0
    assert on.pool.num_used == 0 and on.pool.num_free == on.pool.num_total
