"""/v1/completions over the fake engine: prompt forms, sampling conversion, n, echo + logprobs, stop, streaming."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from fakes import FakeEngine, api_client


def sse_events(text: str) -> list:
    data = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


async def post(engine, body, **server_args):
    async with api_client(engine, **server_args) as client:
        return await client.post("/v1/completions", json=body)


async def test_request_fields_reach_the_engine_as_sampling_params():
    engine = FakeEngine(adapters={"math": "/m"})
    body = {"model": "math", "prompt": "hi", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 7,
            "seed": 3, "stop": "zz", "n": 2, "user": "u1"}
    r = await post(engine, body)
    assert r.status_code == 200, r.text
    (req,) = engine.seen
    sp = req.sampling
    assert req.adapter == "math" and req.prompt_token_ids == engine.tokenizer.encode("hi")
    assert (sp.n, sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.stop) == \
        (2, 5, 0.5, 0.9, 7, 3, ["zz"])
    assert sp.logprobs is None and sp.prompt_logprobs is None


async def test_base_model_name_selects_no_adapter_and_model_may_be_omitted():
    engine = FakeEngine(adapters={"math": "/m"})
    await post(engine, {"model": "tiny-base", "prompt": "a"})
    await post(engine, {"prompt": "a"})
    r = await post(engine, {"prompt": "a"}, served_model_name="public")
    assert [req.adapter for req in engine.seen] == [None, None, None]
    assert r.json()["model"] == "public"
    assert (await post(engine, {"model": "public", "prompt": "a"}, served_model_name="public")).status_code == 200


@pytest.mark.parametrize("prompt,expected", [
    ("ab", 1), (["ab", "cd", "ef"], 3), ([10, 11, 12], 1), ([[10, 11], [12], [13, 14, 15]], 3)])
async def test_prompt_forms(prompt, expected):
    engine = FakeEngine()
    r = await post(engine, {"prompt": prompt, "max_tokens": 3, "n": 2, "temperature": 0})
    body = r.json()
    assert r.status_code == 200
    assert len(engine.seen) == expected
    assert [c["index"] for c in body["choices"]] == list(range(2 * expected))
    assert body["usage"]["prompt_tokens"] == sum(len(req.prompt_token_ids) for req in engine.seen)
    assert body["usage"]["completion_tokens"] == 3 * 2 * expected
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert all(c["finish_reason"] == "length" and len(c["text"]) == 3 for c in body["choices"])


async def test_adapters_change_the_output_and_greedy_is_deterministic():
    engine = FakeEngine(adapters={"a": "/a", "b": "/b"})
    texts = {}
    for model in ("tiny-base", "a", "b", "a"):
        r = await post(engine, {"model": model, "prompt": "same", "max_tokens": 8, "temperature": 0})
        texts.setdefault(model, set()).add(r.json()["choices"][0]["text"])
    assert len(texts["a"]) == 1                                  # same adapter, same greedy text
    assert len({next(iter(v)) for v in texts.values()}) == 3     # three models, three texts


async def test_echo_with_logprobs_has_prompt_entries_first_null():
    engine = FakeEngine()
    r = await post(engine, {"prompt": "abc", "max_tokens": 2, "logprobs": 2, "echo": True})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    prompt_len = len(engine.tokenizer.encode("abc"))
    assert choice["text"].startswith("abc") and len(choice["text"]) == 5
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == prompt_len + 2
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1] == -1.0
    gen = lp["token_logprobs"][prompt_len:]
    assert gen == pytest.approx([math.log(0.5)] * 2)
    assert all(len(top) == 2 and max(top.values()) == v for top, v in zip(lp["top_logprobs"][prompt_len:], gen))
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert engine.seen[0].sampling.prompt_logprobs == 2


async def test_max_tokens_zero_with_echo_scores_the_prompt():
    engine = FakeEngine()
    r = await post(engine, {"prompt": [[10, 11, 12], [13, 14]], "max_tokens": 0, "logprobs": 0, "echo": True})
    body = r.json()
    assert r.status_code == 200, r.text
    assert [len(c["logprobs"]["token_logprobs"]) for c in body["choices"]] == [3, 2]
    assert body["usage"]["completion_tokens"] == 0
    assert all(c["finish_reason"] == "length" for c in body["choices"])


async def test_logprobs_without_echo_cover_only_generated_tokens():
    r = await post(FakeEngine(), {"prompt": "abc", "max_tokens": 3, "logprobs": 0})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and all(len(t) == 1 for t in lp["top_logprobs"])
    assert lp["text_offset"] == [0, 1, 2]


async def test_stop_string_is_cut_and_reported():
    engine = FakeEngine()
    full = (await post(engine, {"prompt": "q", "max_tokens": 10, "temperature": 0})).json()["choices"][0]["text"]
    stop = full[4]                       # one character: the fake engine does not hold back partial stops
    choice = (await post(engine, {"prompt": "q", "max_tokens": 10, "temperature": 0, "stop": [stop]})).json()
    choice = choice["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == full[: full.find(stop)]


async def test_streaming_completion_matches_non_streaming():
    engine = FakeEngine()
    body = {"prompt": ["x", "y"], "max_tokens": 4, "temperature": 0, "n": 2}
    whole = (await post(engine, body)).json()
    r = await post(engine, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    texts, finish = {}, {}
    for ev in events[:-1]:
        assert ev["object"] == "text_completion" and "usage" not in ev
        (c,) = ev["choices"]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        if c["finish_reason"]:
            finish[c["index"]] = c["finish_reason"]
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert finish == {i: "length" for i in range(4)}
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


async def test_streaming_echo_logprobs_offsets_continue():
    r = await post(FakeEngine(), {"prompt": "ab", "max_tokens": 2, "logprobs": 1, "echo": True, "stream": True})
    events = sse_events(r.text)
    offsets = [o for ev in events for o in ev["choices"][0]["logprobs"]["text_offset"]]
    tokens = [t for ev in events for t in ev["choices"][0]["logprobs"]["tokens"]]
    text = "".join(ev["choices"][0]["text"] for ev in events)
    assert events[0]["choices"][0]["text"] == "ab"
    assert tokens[:3] == ["<s>", "a", "b"] and len(tokens) == 5
    assert offsets == [0, 0, 1, 2, 3]             # the BOS the echoed text does not show has no width
    assert all(text[o:].startswith(t) for o, t in zip(offsets[1:], tokens[1:]))


@pytest.mark.parametrize("stream", [False, True])
async def test_text_offset_lines_up_with_the_echoed_prompt_when_the_tokenizer_adds_bos(stream):
    """Issue 14 item 7: the fake tokenizer prepends <s>, which the echoed prompt does not contain."""
    prompt = "hello world"
    body = {"prompt": prompt, "max_tokens": 3, "logprobs": 0, "echo": True, "temperature": 0, "stream": stream}
    r = await post(FakeEngine(), body)
    assert r.status_code == 200, r.text
    if stream:
        events = sse_events(r.text)
        text = "".join(ev["choices"][0]["text"] for ev in events)
        tokens = [t for ev in events for t in ev["choices"][0]["logprobs"]["tokens"]]
        offsets = [o for ev in events for o in ev["choices"][0]["logprobs"]["text_offset"]]
    else:
        choice = r.json()["choices"][0]
        text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert tokens[0] == "<s>" and offsets[0] == 0 and text.startswith(prompt)
    assert len(tokens) == len(prompt) + 1 + 3
    for token, offset in zip(tokens[1:], offsets[1:]):        # every other token sits where its text is
        assert text[offset:offset + len(token)] == token
    assert offsets[len(prompt) + 1] == len(prompt)             # the completion starts right after the prompt
    # mtlora-eval's scoring of a continuation by character span now covers exactly its tokens
    assert [t for t, o in zip(tokens, offsets) if 6 <= o < 11] == list("world")


async def test_seeded_sampling_is_reproducible():
    engine = FakeEngine()
    body = {"prompt": "s", "max_tokens": 8, "temperature": 1.0, "seed": 42}
    a = (await post(engine, body)).json()["choices"][0]["text"]
    b = (await post(engine, body)).json()["choices"][0]["text"]
    c = (await post(engine, {**body, "seed": 43})).json()["choices"][0]["text"]
    assert a == b != c


class _Barrier(FakeEngine):
    """No first output until `expected` requests have been admitted: a server that submits a batch's prompts one
    first token after another never gets there."""

    def __init__(self, expected: int):
        super().__init__()
        self.expected, self.all_in = expected, asyncio.Event()

    async def generate(self, req):
        gen = super().generate(req)
        first = await gen.__anext__()                       # admits req (FakeEngine._admit)
        if len(self.seen) >= self.expected:
            self.all_in.set()
        await self.all_in.wait()
        yield first
        async for out in gen:
            yield out


async def test_a_batch_of_prompts_is_submitted_at_once():
    engine = _Barrier(expected=6)
    async with api_client(engine) as client:
        r = await asyncio.wait_for(client.post("/v1/completions", json={"prompt": [f"p{i}" for i in range(6)],
                                                                         "max_tokens": 2}), timeout=30)
    assert r.status_code == 200, r.text
    assert sorted(c["index"] for c in r.json()["choices"]) == list(range(6))
    assert engine.active == {}
