"""Logits processing (engine.sampling): presence / frequency / repetition penalties, logit_bias, bad words and
min_p against a plain reference implementation on random logits, per-row parameters mixed in one batch, edge
values, the incremental token counts, and vectorisation (the number of tensor ops does not grow with the
vocabulary)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mtlora.errors import InvalidRequestError
from mtlora_server.engine.sampling import SamplerState, bad_word_bans, filter_logits, process_logits, sample
from mtlora_server.engine.types import SamplingParams

V = 64
INF = float("inf")


# -- the oracle: plain Python, one token at a time, straight from vLLM's / OpenAI's definitions ----------------------
def reference_process(row: list[float], p: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    """bad words -> logit_bias -> repetition (prompt or output) -> frequency and presence (output)."""
    x = list(row)
    for word in p.bad_words_ids:
        prefix = word[:-1]
        if len(prefix) <= len(output) and (not prefix or output[len(output) - len(prefix):] == prefix):
            x[word[-1]] = -INF
    for token, bias in p.logit_bias.items():
        x[token] += bias
    counts = Counter(output)
    seen = set(prompt) | set(output)
    for t in range(len(x)):
        if t in seen:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * counts[t]
        x[t] -= p.presence_penalty * (1.0 if counts[t] > 0 else 0.0)
    return x


def reference_min_p_kept(row: list[float], p: SamplingParams) -> tuple[set[int], set[int]]:
    """(tokens min_p keeps, tokens within rounding of the threshold) after temperature."""
    scaled = [v / p.temperature for v in row]
    top = max(scaled)
    exps = [math.exp(v - top) if v > -INF else 0.0 for v in scaled]
    total = sum(exps)
    probs = [e / total for e in exps]
    threshold = max(probs) * p.min_p
    kept = {t for t, q in enumerate(probs) if q >= threshold}
    close = {t for t, q in enumerate(probs) if abs(q - threshold) <= 1e-5 * max(threshold, 1e-30)}
    return kept, close


# -- the table -----------------------------------------------------------------------------------------------------
PROMPT = [3, 5, 7, 7, 11]
OUTPUT = [5, 13, 13, 13, 17, 2, 19]
CASES = {
    "plain": SamplingParams(),
    "presence +2": SamplingParams(presence_penalty=2.0),
    "presence -2": SamplingParams(presence_penalty=-2.0),
    "frequency +2": SamplingParams(frequency_penalty=2.0),
    "frequency -1.5": SamplingParams(frequency_penalty=-1.5),
    "repetition 1.3": SamplingParams(repetition_penalty=1.3),
    "repetition 0.5": SamplingParams(repetition_penalty=0.5),
    "repetition 100": SamplingParams(repetition_penalty=100.0),
    "repetition 1e-6": SamplingParams(repetition_penalty=1e-6),
    "repetition 1e6": SamplingParams(repetition_penalty=1e6, presence_penalty=2.0),
    "all penalties": SamplingParams(presence_penalty=0.7, frequency_penalty=-0.3, repetition_penalty=1.7),
    "bias": SamplingParams(logit_bias={0: 100.0, 13: -100.0, 63: 3.5, 5: -0.25}),
    "bias + penalties": SamplingParams(logit_bias={13: 5.0, 40: -7.0}, frequency_penalty=1.0,
                                       repetition_penalty=2.0),
    "bad word single": SamplingParams(bad_words_ids=[[21]]),
    "bad word matching": SamplingParams(bad_words_ids=[[17, 2, 23]]),       # output ends 17, 2, 19: no
    "bad word suffix": SamplingParams(bad_words_ids=[[2, 19, 29], [19, 31], [4, 19, 37]]),   # 29, 31 banned
    "bad word too long": SamplingParams(bad_words_ids=[list(range(40, 50))]),
    "bad word + bias": SamplingParams(bad_words_ids=[[19, 41]], logit_bias={41: 100.0}, presence_penalty=-2.0),
}


def _logits(B: int, seed: int, vocab: int = V) -> torch.Tensor:
    x = torch.randn(B, vocab, generator=torch.Generator().manual_seed(seed)) * 4
    x[:, 9] = 0.0                                       # exactly zero: repetition multiplies (stays 0)
    return x


def _states(params, prompts, outputs, vocab=V):
    states = []
    for p, prompt, out in zip(params, prompts, outputs):
        st = None
        if p.has_penalties or p.logit_bias:
            st = SamplerState(p, prompt, torch.device("cpu"))
            st.update(prompt + out, len(prompt))
        states.append(st)
    return states


def _check_rows(got: torch.Tensor, logits: torch.Tensor, params, prompts, outputs, names) -> None:
    for i, name in enumerate(names):
        want = torch.tensor(reference_process(logits[i].tolist(), params[i], prompts[i], outputs[i]))
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), name
        finite = ~torch.isinf(want)
        torch.testing.assert_close(got[i][finite], want[finite].float(), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", list(CASES))
def test_each_case_matches_the_reference(name):
    p = CASES[name]
    logits = _logits(3, seed=hash(name) % 1000)
    prompts, outputs = [PROMPT, [], PROMPT], [OUTPUT, OUTPUT, []]
    got = process_logits(logits, [p] * 3, outputs, _states([p] * 3, prompts, outputs))
    _check_rows(got, logits, [p] * 3, prompts, outputs, [f"{name} row {i}" for i in range(3)])
    assert not torch.equal(got, logits) or name == "plain" or name == "bad word too long" or \
        name == "bad word matching"


def test_mixed_rows_in_one_batch_each_match_the_reference():
    names = list(CASES) * 2
    params = [CASES[n] for n in names]
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
               for _ in names]
    outputs = [OUTPUT if i % 3 else torch.randint(0, V, (i % 11,), generator=gen).tolist()
               for i in range(len(names))]
    logits = _logits(len(names), seed=6)
    got = process_logits(logits, params, outputs, _states(params, prompts, outputs))
    _check_rows(got, logits, params, prompts, outputs, names)
    # each row is the same alone as in the batch: everything is row-wise
    for i in (0, 5, 9, 17):
        alone = process_logits(logits[i:i + 1], params[i:i + 1], outputs[i:i + 1],
                               _states(params[i:i + 1], prompts[i:i + 1], outputs[i:i + 1]))
        assert torch.equal(alone[0], got[i]), names[i]


def test_input_logits_are_left_untouched():
    p = SamplingParams(logit_bias={1: 5.0}, bad_words_ids=[[2]], presence_penalty=1.0)
    logits = _logits(1, seed=7)
    before = logits.clone()
    process_logits(logits, [p], [[3]], _states([p], [[4]], [[3]]))
    assert torch.equal(logits, before)


def test_bad_word_bans_follow_vllms_rule():
    assert bad_word_bans([[5]], []) == [5]                      # single token: always
    assert bad_word_bans([[1, 5]], []) == []                    # needs one output token first
    assert bad_word_bans([[1, 5]], [1]) == [5]
    assert bad_word_bans([[1, 2, 5]], [9, 1, 2]) == [5]
    assert bad_word_bans([[1, 2, 5]], [1, 2, 9]) == []
    assert bad_word_bans([[1, 5], [2, 6], [7]], [2]) == [6, 7]


# -- min_p (after temperature) -------------------------------------------------------------------------------------
@pytest.mark.parametrize("min_p,temperature", [(0.0, 1.0), (0.05, 1.0), (0.2, 0.7), (0.5, 2.0), (1.0, 1.0),
                                               (0.1, 30.0)])
def test_min_p_keeps_what_the_reference_keeps(min_p, temperature):
    logits = _logits(4, seed=8)
    p = SamplingParams(min_p=min_p, temperature=temperature)
    out = filter_logits(logits, [p] * 4)
    for i in range(4):
        kept, close = reference_min_p_kept(logits[i].tolist(), p)
        got = set(torch.nonzero(~torch.isinf(out[i])).flatten().tolist())
        assert got - close == kept - close
        assert int(logits[i].argmax()) in got


def test_min_p_mixed_with_top_k_top_p_rows_and_ordered_before_them():
    logits = _logits(3, seed=9)
    params = [SamplingParams(min_p=0.3), SamplingParams(top_k=5), SamplingParams(min_p=0.01, top_k=2, top_p=0.9)]
    out = filter_logits(logits, params)
    kept0, _ = reference_min_p_kept(logits[0].tolist(), params[0])
    assert set(torch.nonzero(~torch.isinf(out[0])).flatten().tolist()) == kept0
    assert int((~torch.isinf(out[1])).sum()) == 5
    assert int((~torch.isinf(out[2])).sum()) <= 2


def test_min_p_one_samples_only_the_best_token():
    logits = _logits(2, seed=10)
    p = SamplingParams(min_p=1.0, temperature=1.5)
    for seed in range(5):
        gens = [torch.Generator().manual_seed(seed), None]
        assert torch.equal(sample(logits, [p, p], gens), logits.argmax(-1))


# -- state -----------------------------------------------------------------------------------------------------------
def dense_counts(st: SamplerState, vocab: int = V) -> tuple[torch.Tensor, set[int]]:
    """(output counts [V], set of seen tokens) from a SamplerState's sparse buffers."""
    ids, counts = st.seen_ids[:st.size], st.seen_counts[:st.size]
    assert ids.unique().numel() == st.size                                  # each seen token once
    assert all(st.slot_of[int(t)] == j for j, t in enumerate(ids))
    return torch.zeros(vocab).index_add_(0, ids, counts), set(ids.tolist())


def test_sampler_state_counts_incrementally_and_idempotently():
    p = SamplingParams(frequency_penalty=1.0, logit_bias={3: 1.0})
    prompt = [4, 4, 6]
    st = SamplerState(p, prompt, torch.device("cpu"))
    tokens = list(prompt)
    for tok in [9, 9, 4, 12, 9] + list(range(20, 60)):                      # past the first capacity: it grows
        tokens.append(tok)
        st.update(tokens, len(prompt))
        st.update(tokens, len(prompt))                  # a retry counts nothing twice
        counts, seen = dense_counts(st)
        assert torch.equal(counts, torch.bincount(torch.tensor(tokens[len(prompt):]), minlength=V).float())
        assert seen == set(tokens)
    tokens += [61, 61, 4]                                # several new tokens at once (after a preemption, say)
    st.update(tokens, len(prompt))
    assert torch.equal(dense_counts(st)[0], torch.bincount(torch.tensor(tokens[3:]), minlength=V).float())
    assert st.bias_ids.tolist() == [3] and st.bias_values.tolist() == [1.0]
    bias_only = SamplerState(SamplingParams(logit_bias={1: 2.0}), prompt, torch.device("cpu"))
    assert bias_only.seen_ids is None                    # no token state without penalties


# -- validation ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("presence_penalty", 2.01), ("presence_penalty", -2.5), ("presence_penalty", float("nan")),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.01),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
    ("repetition_penalty", 1e-7), ("repetition_penalty", 1.1e6),
    ("min_p", -0.1), ("min_p", 1.5),
    ("logit_bias", {1: 100.5}), ("logit_bias", {-1: 1.0}), ("logit_bias", {1: float("nan")}),
    ("bad_words_ids", [[]]), ("bad_words_ids", [[1, -2]]),
])
def test_out_of_range_values_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == ("bad_words" if field == "bad_words_ids" else field)


def test_edge_values_are_accepted_and_only_real_settings_process_logits():
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1e-6, min_p=1.0,
                   logit_bias={0: -100.0, 1: 100.0})
    SamplingParams(presence_penalty=2.0, frequency_penalty=-2.0, repetition_penalty=1e6, min_p=0.0)
    assert not SamplingParams().processes_logits
    assert not SamplingParams(min_p=0.5, temperature=0.3, top_k=3).processes_logits   # min_p: in the sampler
    assert SamplingParams(repetition_penalty=1.01).has_penalties
    assert SamplingParams(logit_bias={2: 0.0}).processes_logits and SamplingParams(bad_words_ids=[[1]]).processes_logits


# -- vectorisation -----------------------------------------------------------------------------------------------------
class _CountOps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _ops_for(vocab: int) -> int:
    names = list(CASES)
    params = [CASES[n] for n in names]
    prompts, outputs = [PROMPT] * len(names), [OUTPUT] * len(names)
    logits = _logits(len(names), seed=11, vocab=vocab)
    states = _states(params, prompts, outputs, vocab)
    min_p = [SamplingParams(min_p=0.1, top_k=7, top_p=0.8, temperature=0.9)] * len(names)
    with _CountOps() as counter:
        process_logits(logits, params, outputs, states)
        filter_logits(logits, min_p)
    return counter.calls


def test_no_python_loop_over_the_vocabulary():
    small, large = _ops_for(64), _ops_for(50_000)
    assert small == large, f"{small} tensor ops for V=64 but {large} for V=50000"
