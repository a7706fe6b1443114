"""The logits-processing request fields at the API edge (fake engine): presence_penalty, frequency_penalty,
repetition_penalty, logit_bias, min_p and bad_words are accepted by completions and chat, reach the engine as
SamplingParams, and bad values are a 400 naming the field."""

from __future__ import annotations

import pytest

from fakes import FakeEngine, api_client

ROUTES = {"/v1/completions": {"prompt": "hi", "max_tokens": 3},
          "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}}


async def _post(path: str, extra: dict):
    engine = FakeEngine()
    async with api_client(engine) as client:
        r = await client.post(path, json={**ROUTES[path], **extra})
    return r, engine


@pytest.mark.parametrize("path", list(ROUTES))
async def test_fields_reach_the_engine(path):
    r, engine = await _post(path, {"presence_penalty": 1.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2,
                                   "logit_bias": {"65": -100, "7": 2.5}, "min_p": 0.1,
                                   "bad_words": ["ab", " c"]})
    assert r.status_code == 200, r.text
    sp = engine.seen[0].sampling
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty, sp.min_p) == (1.5, -0.5, 1.2, 0.1)
    assert sp.logit_bias == {65: -100.0, 7: 2.5}
    tok = engine.tokenizer                                  # bytes + 3: " ab" is 3 tokens, so only "ab" counts
    assert sp.bad_words_ids == [tok.encode("ab", add_special_tokens=False), tok.encode("c", add_special_tokens=False)]


@pytest.mark.parametrize("path", list(ROUTES))
async def test_absent_or_null_fields_are_the_defaults(path):
    r, engine = await _post(path, {"presence_penalty": None, "logit_bias": None, "bad_words": None, "min_p": None})
    assert r.status_code == 200, r.text
    sp = engine.seen[0].sampling
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty, sp.min_p) == (0.0, 0.0, 1.0, 0.0)
    assert sp.logit_bias == {} and sp.bad_words_ids == [] and not sp.processes_logits


BAD = [
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", "1"),
    ("frequency_penalty", 3), ("frequency_penalty", True),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("repetition_penalty", 1e-9), ("repetition_penalty", 1e7),
    ("min_p", 1.01), ("min_p", -0.5),
    ("logit_bias", {"abc": 1}), ("logit_bias", {"-1": 1}), ("logit_bias", {"1.5": 1}), ("logit_bias", {"": 1}),
    ("logit_bias", {"1" * 11: 1}), ("logit_bias", {"5": 100.5}), ("logit_bias", {"5": -101}),
    ("logit_bias", {"5": "1"}), ("logit_bias", {"5": True}), ("logit_bias", {"5": None}), ("logit_bias", [1, 2]),
    ("logit_bias", {"259": 1.0}), ("logit_bias", {"9999999999": 1.0}),          # outside the vocabulary (259)
    ("bad_words", ["ok", ""]), ("bad_words", ["   "]), ("bad_words", "word"), ("bad_words", [3]),
    ("bad_words", ["w"] * 257),
]


@pytest.mark.parametrize("path", list(ROUTES))
@pytest.mark.parametrize("field,value", BAD)
async def test_bad_values_are_400_naming_the_field(path, field, value):
    r, engine = await _post(path, {field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field or err["param"].startswith(field + "."), err
    assert not engine.seen


async def test_edge_values_are_accepted():
    r, engine = await _post("/v1/completions", {"presence_penalty": -2, "frequency_penalty": 2,
                                                "repetition_penalty": 1e6, "min_p": 1,
                                                "logit_bias": {"0": -100, "258": 100, "007": 1}})
    assert r.status_code == 200, r.text
    assert engine.seen[0].sampling.logit_bias == {0: -100.0, 258: 100.0, 7: 1.0}
