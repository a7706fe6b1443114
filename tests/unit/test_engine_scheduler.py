"""KV block pool accounting and the continuous-batching scheduler (decodes first, chunking, admission control,
preemption by recompute, limits)."""

from __future__ import annotations

import pytest
import torch

from mtlora.errors import EngineOverloadedError
from mtlora.reference import ReferenceModel
from mtlora.testing import make_tiny_model_dir
from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.kv_cache import KVCacheFullError, KVCachePool
from mtlora_server.engine.scheduler import Scheduler, Sequence
from mtlora_server.engine.testing import run_to_completion, tiny_engine_args
from mtlora_server.engine.types import GenerationRequest, SamplingParams


def _pool(num_blocks=8, block_size=4):
    return KVCachePool(2, 2, 8, num_blocks, block_size, torch.float32)


def test_pool_allocate_free_and_errors():
    pool = _pool()
    a = pool.allocate(5)
    assert pool.num_free == 3 and pool.num_used == 5 and len(set(a)) == 5
    with pytest.raises(KVCacheFullError):
        pool.allocate(4)
    assert pool.num_free == 3                            # a failed allocation changes nothing
    pool.free(a[:2])
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(a[:1])
    pool.free(a[2:])
    assert pool.num_free == 8


def test_pool_from_budget_and_write_gather():
    per_block = KVCachePool.bytes_per_block(2, 2, 8, 4, torch.float32)
    assert per_block == 2 * 2 * 4 * 2 * 8 * 4
    pool = KVCachePool.from_budget(2, 2, 8, 4, torch.float32, torch.device("cpu"), budget_bytes=per_block * 10 + 7)
    assert pool.num_total == 10
    blocks = pool.allocate(2)
    k = torch.randn(6, 2, 8)
    slots = torch.tensor([blocks[p // 4] * 4 + p % 4 for p in range(6)])
    pool.write(1, slots, k, -k)
    keys, values = pool.gather(1, slots[None])                        # [kv, 1, 6, hd]
    torch.testing.assert_close(keys[:, 0].transpose(0, 1), k)
    torch.testing.assert_close(values[:, 0].transpose(0, 1), -k)
    assert pool.gather(0, slots[None])[0].abs().sum() == 0              # other layers untouched


def _seq(i, n, computed=0):
    return Sequence(i, list(range(3, 3 + n)), n, num_computed=computed)


def test_decodes_first_and_long_prompt_is_chunked():
    pool = _pool(num_blocks=64)
    sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=10, max_waiting=10)
    sched.add([_seq(0, 3), _seq(1, 2)])
    first = sched.schedule().chunks
    assert [(c.seq.seq_id, c.start, c.length) for c in first] == [(0, 0, 3), (1, 0, 2)]
    for c in first:                                       # pretend both sampled a token
        c.seq.num_computed = c.start + c.length
        c.seq.token_ids.append(7)
    long = _seq(2, 25)
    sched.add([long])
    step = sched.schedule().chunks
    # Decodes (1 token each) come first, the long prompt gets the rest of the 10-token budget.
    assert [(c.seq.seq_id, c.start, c.length) for c in step] == [(0, 3, 1), (1, 2, 1), (2, 0, 8)]
    assert not step[2].samples
    long.num_computed = 8
    step = sched.schedule().chunks
    assert [(c.seq.seq_id, c.length) for c in step] == [(0, 1), (1, 1), (2, 8)]


def test_admission_waits_for_memory_and_finish_frees():
    pool = _pool(num_blocks=4)                            # 16 tokens
    sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64, max_waiting=10)
    a, b = _seq(0, 12), _seq(1, 8)
    sched.add([a, b])
    step = sched.schedule().chunks
    assert [c.seq for c in step] == [a] and list(sched.waiting) == [b]
    sched.finish(a)
    assert pool.num_free == 4
    assert [c.seq for c in sched.schedule().chunks] == [b]


def test_preemption_when_blocks_run_out():
    pool = _pool(num_blocks=3)                            # 12 tokens
    sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64, max_waiting=10)
    a, b = _seq(0, 4), _seq(1, 4)
    sched.add([a, b])
    for c in sched.schedule().chunks:
        c.seq.num_computed = 4
        c.seq.token_ids.append(9)
    assert pool.num_free == 1
    step = sched.schedule().chunks
    # a (older) takes the last free block; b then needs one too and, being the newest, is preempted itself.
    assert [c.seq for c in step] == [a] and pool.num_free == 1
    assert list(sched.waiting) == [b] and b.blocks == [] and b.num_computed == 0
    assert sched.num_preemptions == 1
    a.num_computed += 1
    a.token_ids += [9] * 4                                # a grows to 9 tokens: needs a 3rd block
    a.num_computed = 8
    step = sched.schedule().chunks
    assert [c.seq for c in step] == [a] and len(a.blocks) == 3
    sched.finish(a)
    assert [c.seq for c in sched.schedule().chunks] == [b]       # re-admitted; it re-prefills prompt + output
    assert b.num_tokens == 5 and sched.running == [b]


def test_limits_max_num_seqs_and_waiting_cap():
    pool = _pool(num_blocks=64)
    sched = Scheduler(pool, max_num_seqs=2, max_num_batched_tokens=64, max_waiting=3)
    sched.add([_seq(i, 2) for i in range(3)])
    with pytest.raises(EngineOverloadedError):
        sched.add([_seq(9, 2)])
    assert len(sched.schedule().chunks) == 2 and len(sched.waiting) == 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("sched-model"), seed=7)


def test_preemption_by_recompute_keeps_outputs_exact(model_dir):
    """A pool too small for all requests at once forces preemptions; greedy outputs still equal the oracle."""
    core = EngineCore(tiny_engine_args(model_dir, kv_cache_memory=8 * 2 * 2 * 16 * 2 * 16 * 4,  # 8 blocks
                                       max_num_batched_tokens=32))
    assert core.pool.num_total == 8
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 259, (n,), generator=gen).tolist() for n in (20, 15, 30, 9)]
    reqs = [GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    res = run_to_completion(core, reqs)
    assert core.scheduler.num_preemptions > 0
    ref = ReferenceModel(model_dir)
    for i, p in enumerate(prompts):
        assert res[f"r{i}"].tokens[0] == ref.greedy(p, 20)
    assert core.pool.num_free == core.pool.num_total


def test_a_prefill_preempted_midway_still_returns_every_prompt_logprob(model_dir):
    """A long prompt asking for prompt logprobs is preempted in the middle of its chunked prefill (a small pool,
    16-token chunks): its re-prefill keeps producing the missing entries, so it gets all of them, equal to a run
    with room to spare (they used to stop at the preemption point)."""
    gen = torch.Generator().manual_seed(5)
    a, b = (torch.randint(3, 259, (n,), generator=gen).tolist() for n in (46, 64))

    def run(blocks):
        core = EngineCore(tiny_engine_args(model_dir, kv_cache_memory=blocks * 2 * 2 * 16 * 2 * 16 * 4,
                                           max_num_batched_tokens=16))
        reqs = [GenerationRequest("a", a, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)),
                GenerationRequest("b", b, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                         prompt_logprobs=1))]
        return core, run_to_completion(core, reqs)

    small, got = run(7)
    assert small.scheduler.num_preemptions > 0
    big, want = run(64)
    assert big.scheduler.num_preemptions == 0
    lp = got["b"].prompt_logprobs
    assert len(lp) == len(b) and lp[0] is None and all(x is not None for x in lp[1:])
    torch.testing.assert_close(torch.tensor([x.logprob for x in lp[1:]]),
                               torch.tensor([x.logprob for x in want["b"].prompt_logprobs[1:]]), atol=1e-5, rtol=0)
    assert got["b"].tokens == want["b"].tokens and got["a"].tokens == want["a"].tokens
