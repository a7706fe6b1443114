"""/v1/chat/completions over the fake engine: template rendering, token limits, logprobs, streaming."""

from __future__ import annotations

import math

from fakes import FakeEngine, api_client
from test_api_completions import sse_events

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]


async def post(engine, body):
    async with api_client(engine) as client:
        return await client.post("/v1/chat/completions", json=body)


async def test_messages_are_rendered_with_the_chat_template():
    engine = FakeEngine(adapters={"a": "/a"})
    r = await post(engine, {"model": "a", "messages": MSGS, "max_tokens": 3})
    body = r.json()
    expected = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert engine.seen[0].prompt_token_ids == engine.tokenizer.encode(expected, add_special_tokens=False)
    assert engine.seen[0].adapter == "a"
    assert body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and len(msg["content"]) == 3
    assert body["usage"]["prompt_tokens"] == len(engine.seen[0].prompt_token_ids)


async def test_max_completion_tokens_wins_and_default_fills_the_context():
    engine = FakeEngine(max_model_len=64)
    await post(engine, {"messages": MSGS, "max_tokens": 9, "max_completion_tokens": 4})
    await post(engine, {"messages": MSGS})
    assert engine.seen[0].sampling.max_tokens == 4
    assert engine.seen[1].sampling.max_tokens == 64 - len(engine.seen[1].prompt_token_ids)


async def test_logprobs_and_top_logprobs():
    engine = FakeEngine()
    r = await post(engine, {"messages": MSGS, "max_tokens": 3, "logprobs": True, "top_logprobs": 2, "n": 2})
    for choice in r.json()["choices"]:
        content = choice["logprobs"]["content"]
        assert len(content) == 3
        for entry in content:
            assert entry["logprob"] == math.log(0.5)
            assert entry["bytes"] == list(entry["token"].encode())
            assert [t["logprob"] for t in entry["top_logprobs"]] == [math.log(0.5), math.log(0.25)]
        assert "".join(e["token"] for e in content) == choice["message"]["content"]
    assert engine.seen[0].sampling.logprobs == 2


async def test_streaming_chat():
    engine = FakeEngine()
    body = {"messages": MSGS, "max_tokens": 5, "temperature": 0, "stop": ["~~"]}
    whole = (await post(engine, body)).json()
    events = sse_events((await post(engine, {**body, "stream": True,
                                             "stream_options": {"include_usage": True}})).text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(ev["object"] == "chat.completion.chunk" for ev in events)
    text = "".join(ev["choices"][0]["delta"].get("content", "") for ev in events[1:-1])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"] == whole["usage"] and events[-1]["choices"] == []
    assert all(ev["usage"] is None for ev in events[:-1])


async def test_template_error_is_400_naming_messages():
    engine = FakeEngine()
    engine.tokenizer.chat_template = "{{ raise_error('nope') }}"      # undefined function -> template error
    r = await post(engine, {"messages": MSGS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
