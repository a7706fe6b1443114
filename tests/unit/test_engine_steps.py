"""Steps as plain data: the scheduler's SchedulerOutput names the positions whose logits / hidden states / cached
tails a step must produce, and ModelRunner.execute returns them per chunk as a RunnerOutput whose named rows match
a direct reference forward (mtlora.reference) of every sequence."""

from __future__ import annotations

import pytest
import torch

from mtlora.reference import ReferenceModel
from mtlora.testing import make_tiny_model_dir
from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.kv_cache import KVCachePool
from mtlora_server.engine.model import LlamaDecoder, rms_norm
from mtlora_server.engine.runner import ModelRunner
from mtlora_server.engine.scheduler import Chunk, SchedulerOutput, Sequence
from mtlora_server.engine.testing import tiny_engine_args
from mtlora_server.engine.types import GenerationRequest, SamplingParams

BS = 4          # block size
ATOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("steps-model"), seed=5)


def _ids(n, seed):
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _logits_of_hidden(model, hidden):                    # hidden: [n, d] pre-norm final hidden states
    return torch.nn.functional.linear(rms_norm(hidden, model.final_norm, model.cfg.rms_norm_eps), model.lm_head)


def test_execute_names_rows_of_a_mixed_step(model_dir):
    """One step: a fresh prompt with prompt logprobs and block-end hidden states, a continuing chunk after a
    'cached' prefix whose tail logits are wanted, a decode, and a prefill chunk that wants nothing (no sample)."""
    model = LlamaDecoder.from_dir(model_dir, torch.float32, "cpu", max_len=128)
    c = model.cfg
    pool = KVCachePool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 64, BS, torch.float32)
    runner = ModelRunner(model, pool, None, torch.device("cpu"))
    toks = {name: _ids(n, seed) for seed, (name, n) in enumerate({"fresh": 13, "tail": 14, "dec": 10,
                                                                  "mid": 21}.items())}
    seqs = {name: Sequence(i, ids, len(ids), blocks=pool.allocate(-(-len(ids) // BS)))
            for i, (name, ids) in enumerate(toks.items())}
    ref = ReferenceModel(model_dir)
    want = {name: ref.logits(ids) for name, ids in toks.items()}                 # [n, V] each
    # Step 1: prefill what step 2 continues; keep the hidden state at the 'tail' sequence's block end 7.
    first = runner.execute(SchedulerOutput([
        Chunk(seqs["tail"], 0, 8, hidden_positions=[3, 7]),
        Chunk(seqs["dec"], 0, 9),
        Chunk(seqs["mid"], 0, 5)]))
    assert [o.sample_row for o in first.chunks] == [None, None, None] and first.logits.shape[0] == 0
    tail = first.chunks[0].hidden[7]                                             # [d]
    torch.testing.assert_close(_logits_of_hidden(model, first.chunks[0].hidden[3][None])[0], want["tail"][3],
                               atol=ATOL, rtol=0)
    # Step 2, chunks in an order unlike the runner's internal layout.
    chunks = [
        Chunk(seqs["mid"], 5, 10, hidden_positions=[7, 11]),                    # no logits, no sample
        Chunk(seqs["tail"], 8, 6, logit_positions=[8, 9, 10, 11, 12, 13], tail_hidden=tail),
        Chunk(seqs["dec"], 9, 1, logit_positions=[9]),
        Chunk(seqs["fresh"], 0, 13, logit_positions=list(range(12)) + [12], hidden_positions=[3, 7, 11]),
    ]
    out = runner.execute(SchedulerOutput(chunks))
    assert out.logits.shape == (6 + 1 + 13 + 1, c.vocab_size)                  # L rows, then one tail row
    mid, tl, dec, fresh = out.chunks
    assert mid.sample_row is None and mid.prompt_logits is None and mid.tail_logits is None
    assert sorted(mid.hidden) == [7, 11] and sorted(fresh.hidden) == [3, 7, 11] and tl.hidden == {}
    torch.testing.assert_close(tl.prompt_logits, want["tail"][8:13], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits[tl.sample_row], want["tail"][13], atol=ATOL, rtol=0)
    torch.testing.assert_close(tl.tail_logits[0], want["tail"][7], atol=ATOL, rtol=0)
    assert dec.prompt_logits is None and dec.tail_logits is None
    torch.testing.assert_close(out.logits[dec.sample_row], want["dec"][9], atol=ATOL, rtol=0)
    torch.testing.assert_close(fresh.prompt_logits, want["fresh"][:12], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits[fresh.sample_row], want["fresh"][12], atol=ATOL, rtol=0)
    for o, name in ((mid, "mid"), (fresh, "fresh")):
        for p, h in o.hidden.items():
            torch.testing.assert_close(_logits_of_hidden(model, h[None])[0], want[name][p], atol=ATOL, rtol=0)
    assert len({o.sample_row for o in (tl, dec, fresh)}) == 3


def test_scheduler_plans_prompt_logprobs_block_ends_and_cached_tail(model_dir):
    """Through the engine: an echo request repeating a cached prompt is scheduled with the cache's tail hidden
    state and prompt-logprob entries, and exactly the positions it still needs; the RunnerOutput rows it gets match
    the reference, beside another request's decode in the same step."""
    core = EngineCore(tiny_engine_args(model_dir, block_size=BS, enable_prefix_caching=True))
    steps = []
    execute = core.runner.execute

    def recording(scheduled, *args, **kwargs):
        result = execute(scheduled, *args, **kwargs)
        steps.append((scheduled, result))
        return result

    core.runner.execute = recording
    prompt, other = _ids(20, 11), _ids(6, 12)
    echo = SamplingParams(max_tokens=1, prompt_logprobs=2, temperature=0.0)
    core.add_request(GenerationRequest("a", prompt, echo))
    core.add_request(GenerationRequest("o", other, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)))
    core.step()
    (first, _), = steps
    a, o = first.chunks
    assert a.logit_positions == list(range(20)) and a.hidden_positions == [3, 7, 11, 15, 19]
    assert a.tail_hidden is None and not a.cached_prompt_logprobs                 # a miss: nothing cached
    assert o.logit_positions == [5] and o.hidden_positions == []                 # no prompt logprobs asked
    while core.requests.get("a"):
        core.step()
    core.add_request(GenerationRequest("b", prompt, echo))
    core.step()
    scheduled, result = steps[-1]
    by_req = {c.seq.owner.request.request_id: (c, r) for c, r in zip(scheduled.chunks, result.chunks)}
    dec, dec_out = by_req["o"]
    assert dec.length == 1 and dec.logit_positions == [dec.start]
    hit, hit_out = by_req["b"]
    assert (hit.start, hit.length) == (16, 4)                                   # 4 cached blocks, the last token
    assert hit.tail_hidden is not None and len(hit.cached_prompt_logprobs) == 16
    assert hit.logit_positions == [16, 17, 18, 19] and hit.hidden_positions == [19]
    want = ReferenceModel(model_dir).logits(prompt)
    torch.testing.assert_close(hit_out.tail_logits[0], want[15], atol=ATOL, rtol=0)
    torch.testing.assert_close(hit_out.prompt_logits, want[16:19], atol=ATOL, rtol=0)
    torch.testing.assert_close(result.logits[hit_out.sample_row], want[19], atol=ATOL, rtol=0)
    assert dec_out.sample_row is not None and dec_out.sample_row != hit_out.sample_row
