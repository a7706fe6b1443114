"""Logits processing through the engine core with the tiny model: logit_bias, bad words, penalties and min_p change
(or keep) the output as they should, penalised and plain requests share batches without touching each other, a
sampling retry after a fault counts no token twice, and token ids outside the vocabulary are refused."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from mtlora.errors import InvalidRequestError
from mtlora.testing import make_tiny_model_dir
from mtlora_server.engine import faults
from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.testing import Finished, run_to_completion, tiny_engine_args
from mtlora_server.engine.types import GenerationRequest, SamplingParams

PROMPT = [1] + [ord(c) + 3 for c in "The tiny model says hello again and again"]
N = 32


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return EngineCore(tiny_engine_args(make_tiny_model_dir(tmp_path_factory.mktemp("penalty-model"), seed=4)))


def _req(rid: str, prompt=PROMPT, **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", N)
    params.setdefault("ignore_eos", True)
    return GenerationRequest(rid, list(prompt), SamplingParams(**params))


def _tokens(core, *requests) -> dict[str, list[int]]:
    results = run_to_completion(core, list(requests))
    failures = core.take_failures()
    assert not failures, failures
    return {rid: res.tokens[0] for rid, res in results.items()}


@pytest.fixture(scope="module")
def greedy(core) -> list[int]:
    return _tokens(core, _req("g"))["g"]


def test_a_large_negative_logit_bias_removes_the_token(core, greedy):
    common = Counter(greedy).most_common(1)[0][0]
    out = _tokens(core, _req("b", logit_bias={common: -100.0}),
                  _req("s", logit_bias={common: -100.0}, temperature=1.0, seed=3))
    assert out["b"] != greedy
    assert common not in out["b"] and common not in out["s"]
    assert out["b"][:greedy.index(common)] == greedy[:greedy.index(common)]   # same until the banned choice


def test_a_large_positive_logit_bias_forces_the_token(core):
    out = _tokens(core, _req("f", logit_bias={65: 100.0}, max_tokens=5))
    assert out["f"] == [65] * 5


def test_penalties_change_greedy_output(core, greedy):
    assert max(Counter(greedy).values()) > 1, "the tiny model should repeat itself within 32 tokens"
    out = _tokens(core, _req("r", repetition_penalty=3.0), _req("f", frequency_penalty=2.0),
                  _req("p", presence_penalty=2.0), _req("neg", presence_penalty=-2.0))
    for rid in ("r", "f", "p"):
        assert out[rid] != greedy, rid
        assert max(Counter(out[rid]).values()) <= max(Counter(greedy).values()), rid
    assert max(Counter(out["neg"]).values()) >= max(Counter(greedy).values())


def test_bad_words_are_never_generated(core, greedy):
    k = next(i for i in range(1, N - 1) if greedy[i] != greedy[i + 1])
    pair = [greedy[k], greedy[k + 1]]
    out = _tokens(core, _req("one", bad_words_ids=[[greedy[0]]]), _req("pair", bad_words_ids=[pair]))
    assert greedy[0] not in out["one"]
    assert all(out["pair"][i:i + 2] != pair for i in range(N - 1))
    assert out["pair"][:k + 1] == greedy[:k + 1]                 # the first token of the pair is still allowed


def test_min_p_one_is_greedy_and_min_p_zero_changes_nothing(core, greedy):
    out = _tokens(core, _req("one", temperature=1.5, seed=5, min_p=1.0),
                  _req("zero", temperature=1.0, seed=5, min_p=0.0), _req("plain", temperature=1.0, seed=5))
    assert out["one"] == greedy
    assert out["zero"] == out["plain"]


MIXED = dict(
    bias=dict(logit_bias={70: 4.0, 80: -100.0}),
    rep=dict(repetition_penalty=1.8, temperature=0.8, seed=11),
    freq=dict(frequency_penalty=1.2, presence_penalty=0.5, temperature=1.0, seed=12, top_k=20),
    words=dict(bad_words_ids=[[72], [75, 76]], min_p=0.05, temperature=1.2, seed=13),
    extreme=dict(repetition_penalty=1e-6, presence_penalty=-2.0, frequency_penalty=-2.0, temperature=100.0,
                 logit_bias={66: 100.0, 67: -100.0}, min_p=0.5, seed=14),
    extreme2=dict(repetition_penalty=1e6, presence_penalty=2.0, frequency_penalty=2.0, temperature=1e-5,
                  logit_bias={66: -100.0}),
)
PLAIN = dict(g=dict(), s=dict(temperature=0.9, seed=21, top_p=0.9), s2=dict(temperature=1.1, seed=22))


def test_mixed_batch_gives_every_request_the_tokens_it_gets_alone(core):
    alone = {}
    for rid, params in {**MIXED, **PLAIN}.items():
        alone.update(_tokens(core, _req(rid, **params)))
    together = _tokens(core, *[_req(rid, **p) for rid, p in {**MIXED, **PLAIN}.items()])
    assert together == alone


def _check_counts(core) -> None:
    """Every live penalised sequence's counts are exactly those of the output tokens it has counted so far."""
    for state in core.requests.values():
        for seq in state.seqs:
            st = seq.sampler_state
            if st is not None and st.seen_ids is not None:
                counted = seq.output_ids[:st.num_counted]
                assert st.num_counted <= len(seq.output_ids)
                got = dict(zip(st.seen_ids[:st.size].tolist(), st.seen_counts[:st.size].tolist()))
                assert {t: c for t, c in got.items() if c} == dict(Counter(counted))
                assert set(got) == set(seq.token_ids[:seq.prompt_len]) | set(counted)


def test_a_sampling_retry_counts_no_token_twice(core):
    alone = _tokens(core, *[_req(rid, **p) for rid, p in MIXED.items()])
    calls = itertools.count()
    fault = faults.inject("sample", when=lambda r: r.request_id == "bad" and next(calls) >= 10)
    results = {rid: Finished() for rid in [*MIXED, "bad"]}
    try:
        for rid, p in MIXED.items():
            core.add_request(_req(rid, **p))
        core.add_request(_req("bad", frequency_penalty=1.0))
        while core.has_work():
            for out in core.step():
                results[out.request_id].add(out)
            _check_counts(core)
    finally:
        faults.clear()
    failures = core.take_failures()
    assert list(failures) == ["bad"] and fault.fired == 2          # the batch, then the bad row alone
    assert {rid: results[rid].tokens[0] for rid in MIXED} == alone


@pytest.mark.parametrize("make,field", [
    (lambda v: dict(logit_bias={v: 1.0}), "logit_bias"),
    (lambda v: dict(logit_bias={10**6: -1.0}), "logit_bias"),
    (lambda v: dict(bad_words_ids=[[5, v]]), "bad_words"),
])
def test_token_ids_outside_the_vocabulary_are_refused(core, make, field):
    with pytest.raises(InvalidRequestError) as err:
        core.add_request(_req("oov", **make(core.model_config.vocab_size)))
    assert err.value.param == field
    assert "oov" not in core.requests
