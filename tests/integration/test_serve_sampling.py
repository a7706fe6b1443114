"""Logits-processing fields over the REAL engine (tiny random model, in-process app): the official `openai` client
sends logit_bias and frequency_penalty and they change the output as defined; bad_words are tokenised at the API
edge and never generated; token ids outside the vocabulary are a 400 naming the field."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from serve_helpers import served_in_process

PROMPT = "The tiny model says"


@pytest.fixture
async def served(tiny_model_dir):
    async with served_in_process(tiny_model_dir) as served:
        yield served


async def test_openai_client_logit_bias_and_frequency_penalty(served):
    import openai

    engine, app, _ = served
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test/v1", timeout=60)
    client = openai.AsyncOpenAI(api_key="unused", base_url="http://test/v1", http_client=http)
    extra = {"ignore_eos": True}
    plain = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                            logprobs=0, extra_body=extra)
    tokens = plain.choices[0].logprobs.tokens
    # token strings are lossy for non-ASCII bytes: ban the most frequent ASCII one, whose string is exact
    common = Counter(t for t in tokens if len(t) == 1 and t.isascii()).most_common(1)[0][0]
    common_id = engine.tokenizer.encode(common, add_special_tokens=False)
    assert len(common_id) == 1

    biased = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0,
                                             logit_bias={str(common_id[0]): -100}, extra_body=extra)
    assert common not in biased.choices[0].logprobs.tokens
    assert biased.choices[0].text != plain.choices[0].text

    forced = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=4, temperature=0, logit_bias={"68": 100},
                                                  extra_body=extra)
    assert forced.choices[0].message.content == "AAAA"                     # byte 65 is token 68

    assert max(Counter(tokens).values()) > 1, "the tiny model should repeat itself within 24 tokens"
    penalised = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                                logprobs=0, frequency_penalty=2.0, presence_penalty=0.5,
                                                extra_body=extra)
    assert penalised.choices[0].text != plain.choices[0].text
    assert max(Counter(penalised.choices[0].logprobs.tokens).values()) <= max(Counter(tokens).values())

    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model="tiny", prompt=PROMPT, logit_bias={"999999": -100})
    assert err.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                             frequency_penalty=2.5)
    assert err.value.body["param"] == "frequency_penalty"
    await http.aclose()


async def test_bad_words_are_never_generated(served):
    _, _, client = served
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    plain = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    word = next(plain[i:i + 2] for i in range(len(plain) - 1)          # ASCII: one byte, one token
                if plain[i:i + 2].isascii() and plain[i:i + 2].isprintable() and " " not in plain[i:i + 2])
    r = await client.post("/v1/completions", json={**body, "bad_words": [word]})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert word not in text and text != plain
    r = await client.post("/v1/completions", json={**body, "bad_words": [""]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words"
