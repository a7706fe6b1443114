"""Sampling and logprob helpers: greedy/top-k/top-p/seed semantics, min_tokens masking, logprob values."""

from __future__ import annotations

import math

import pytest
import torch

from mtlora_server.engine.sampling import apply_min_tokens, logprobs_of, prompt_logprobs, sample
from mtlora_server.engine.types import SamplingParams

V = 50


def _logits(B: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def _gen(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name,params", [
    ("greedy", SamplingParams(temperature=0.0)),
    ("top_k=1", SamplingParams(temperature=1.0, top_k=1)),
    ("top_k=1 hot", SamplingParams(temperature=5.0, top_k=1)),
    ("top_p tiny", SamplingParams(temperature=1.0, top_p=1e-6)),
    ("temperature -> 0", SamplingParams(temperature=1e-5)),
])
def test_cases_equal_argmax(name, params):
    logits = _logits(16, seed=1)
    for seed in (None, 3):
        got = sample(logits, [params] * 16, [_gen(seed)] * 16 if seed is None else
                     [_gen(seed + i) for i in range(16)])
        assert torch.equal(got, logits.argmax(-1)), name


def test_temperature_one_is_not_greedy():
    logits = torch.zeros(1, V)                                   # uniform: greedy would always give 0
    draws = {int(sample(logits, [SamplingParams(temperature=1.0)], [_gen(s)])[0]) for s in range(20)}
    assert len(draws) > 5


def test_top_k_restricts_to_k_best():
    logits = _logits(1, seed=2)
    best = set(torch.topk(logits[0], 3).indices.tolist())
    p = SamplingParams(temperature=10.0, top_k=3)
    draws = {int(sample(logits, [p], [_gen(s)])[0]) for s in range(60)}
    assert draws <= best and len(draws) >= 2


def test_top_p_keeps_smallest_prefix_reaching_mass():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.79 keeps exactly the first two tokens, 0.81 three
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, top_p=0.79)
    draws = [int(sample(logits, [p], [_gen(s)])[0]) for s in range(200)]
    assert set(draws) == {0, 1}
    p = SamplingParams(temperature=1.0, top_p=0.81)
    assert set(int(sample(logits, [p], [_gen(s)])[0]) for s in range(300)) == {0, 1, 2}


def test_same_seed_same_tokens_alone_or_in_any_batch():
    logits = _logits(6, seed=4)
    p = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7)
    alone = [int(sample(logits[2:3], [p], [_gen(7)])[0])]
    others = [SamplingParams(temperature=1.3), SamplingParams(temperature=0.0), SamplingParams(top_p=0.5, seed=1)]
    params = [others[0], others[1], p, others[2], others[0], p]
    gens = [None, None, _gen(7), _gen(1), None, None]
    for _ in range(3):   # other rows (seeded or not) draw in between; row 2 must not notice
        batch = sample(logits, params, gens)
        gens[5] = _gen(99)
        alone.append(int(sample(logits[2:3], [p], [_gen(7)])[0]))
        assert int(batch[2]) == alone[0]
        gens[2] = _gen(7)
    assert len(set(alone)) == 1
    # a generator gives a sequence: drawing twice advances it exactly as drawing in a batch does
    g_alone, g_batch = _gen(5), _gen(5)
    seq_alone = [int(sample(logits[0:1], [p], [g_alone])[0]) for _ in range(10)]
    seq_batch = [int(sample(logits[[1, 0]], [others[0], p], [None, g_batch])[1]) for _ in range(10)]
    assert seq_alone == seq_batch


def test_different_seeds_differ():
    logits = torch.zeros(1, V)
    p = SamplingParams(temperature=1.0)
    a = [int(sample(logits, [p], [g])[0]) for g in [_gen(1)] * 10]
    b = [int(sample(logits, [p], [g])[0]) for g in [_gen(2)] * 10]
    assert a != b


def test_min_tokens_masking():
    logits = torch.zeros(3, V)
    logits[:, 2] = 10.0                                          # EOS id 2 would win greedily
    masked = apply_min_tokens(logits, [[2, 5], None, []])
    assert masked[0, 2] == -math.inf and masked[0, 5] == -math.inf
    assert torch.equal(masked[1:], logits[1:]) and logits[0, 2] == 10.0   # pure: input untouched
    got = sample(masked, [SamplingParams(temperature=0.0)] * 3, [None] * 3)
    assert int(got[0]) != 2 and got[1:].tolist() == [2, 2]
    draws = sample(masked[[0] * 30], [SamplingParams(temperature=1.0)] * 30, [None] * 30)
    assert 2 not in draws.tolist() and 5 not in draws.tolist()


def test_logprobs_equal_log_softmax():
    logits = _logits(4, seed=5)
    chosen = torch.tensor([3, 0, 49, 7])
    out = logprobs_of(logits, chosen, [0, 3, 5, None])
    lp = torch.log_softmax(logits, -1)
    for row, item in enumerate(out):
        assert item.token_id == int(chosen[row])
        assert math.isclose(item.logprob, float(lp[row, chosen[row]]), abs_tol=1e-6)
    assert out[0].top == [] and out[3].top == []
    vals, ids = torch.topk(lp[2], 5)
    assert [t for t, _ in out[2].top] == ids.tolist()
    assert all(math.isclose(a, b, abs_tol=1e-6) for (_, a), b in zip(out[2].top, vals.tolist()))
    assert [v for _, v in out[1].top] == sorted((v for _, v in out[1].top), reverse=True)


def test_prompt_logprobs_shift_by_one():
    logits, ids = _logits(5, seed=6), torch.tensor([1, 9, 4, 4, 30])
    out = prompt_logprobs(logits, ids, 2)
    lp = torch.log_softmax(logits, -1)
    assert out[0] is None and len(out) == 5
    for i in range(1, 5):
        assert out[i].token_id == int(ids[i])
        assert math.isclose(out[i].logprob, float(lp[i - 1, ids[i]]), abs_tol=1e-6)
        assert [t for t, _ in out[i].top] == torch.topk(lp[i - 1], 2).indices.tolist()
    assert prompt_logprobs(logits[:1], ids[:1], 2) == [None]


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="one params"):
        sample(_logits(2), [SamplingParams()], [None, None])
    with pytest.raises(ValueError, match="batch size"):
        logprobs_of(_logits(2), torch.tensor([1]), [0, 0])
