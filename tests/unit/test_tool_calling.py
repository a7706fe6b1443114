"""Tool calling (api/tools.py): what each tool_choice does, the parsers, the history the chat template sees, and
end to end on the tiny random model — named and "required" choices are grammar-constrained so the calls always
parse and follow the function's schema, "auto" reads the output with --tool-call-parser, streams carry the calls."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from mtlora.errors import InvalidRequestError
from mtlora_server.api import ServerArgs, build_app
from mtlora_server.api.protocol import ChatCompletionRequest
from mtlora_server.api.tools import parse_tool_calls, plan_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"enum": ["Paris", "Oslo"]},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
MSG = [{"role": "user", "content": "weather?"}]


def _req(**kw):
    return ChatCompletionRequest(messages=MSG, **kw)


@pytest.mark.parametrize("kw,parser,mode", [
    ({}, None, "none"),
    ({"tools": [WEATHER], "tool_choice": "none"}, None, "none"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, None, "named"),
    ({"tools": [WEATHER, TIME], "tool_choice": "required"}, None, "required"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "hermes", "auto"),
    ({"tools": [WEATHER]}, "llama3_json", "auto"),
])
def test_what_each_tool_choice_does(kw, parser, mode):
    assert plan_tools(_req(**kw), parser).mode == mode


@pytest.mark.parametrize("kw,param", [
    ({"tools": [WEATHER]}, "tool_choice"),                                   # auto without the server flags
    ({"tool_choice": "required"}, "tool_choice"),                             # no tools
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),      # duplicate names
])
def test_refused_tool_requests_name_the_field(kw, param):
    with pytest.raises(InvalidRequestError) as err:
        plan_tools(_req(**kw), None)
    assert err.value.param == param


@pytest.mark.parametrize("parser,text,content,calls", [
    ("hermes", 'Sure.<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', "Sure.", [("f", {"a": 1})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": '
               '{"b": "x"}}</tool_call>', None, [("f", {}), ("g", {"b": "x"})]),
    ("hermes", "no calls here", "no calls here", []),
    ("hermes", "<tool_call>{broken</tool_call>", "<tool_call>{broken</tool_call>", []),
    ("hermes", 'a <tool_call> {"name": "f", "arguments": {}}  ', "a", [("f", {})]),        # unclosed: cut off
    ("hermes", "<tool_call>" + "[" * 100_000 + "</tool_call>", "<tool_call>" + "[" * 100_000 + "</tool_call>",
     []),                                                                          # nested past json's limit
    ("hermes", "<tool_call>x" + " " * 50_000 + "y", "<tool_call>x" + " " * 50_000 + "y", []),   # was quadratic
    ("llama3_json", '{"name": "f", "parameters": {"a": 2}}', None, [("f", {"a": 2})]),
    ("llama3_json", '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"c": 3}}', None,
     [("f", {}), ("g", {"c": 3})]),
    ("llama3_json", "Hello", "Hello", []),
    ("llama3_json", "{" * 100_000, "{" * 100_000, []),
])
def test_parsers(parser, text, content, calls):
    got_content, got = parse_tool_calls(parser, text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls


def test_history_with_tool_calls_reaches_the_template():
    req = ChatCompletionRequest(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    rendered = [m.rendered() for m in req.messages]
    assert rendered[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert rendered[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


@pytest.fixture
async def client(tiny_model_dir):
    from mtlora_server.engine.args import EngineArgs
    from mtlora_server.engine.engine import Engine

    engine = Engine.from_args(EngineArgs(model=str(tiny_model_dir), dtype="float32", device="cpu",
                                         kv_cache_memory=1 << 22))
    await engine.start()
    app = build_app(engine, ServerArgs(enable_auto_tool_choice=True, tool_call_parser="hermes"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
        yield c
    await engine.shutdown()


async def _chat(client, **body):
    r = await client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 120, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.parametrize("seed", range(3))
async def test_named_choice_returns_one_valid_call(client, seed):
    choice = await _chat(client, tools=[WEATHER, TIME], temperature=1.0, seed=seed,
                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    assert choice["message"]["content"] is None and call["id"].startswith("call_")


@pytest.mark.parametrize("seed", range(3))
async def test_required_choice_returns_valid_calls_of_the_given_tools(client, seed):
    choice = await _chat(client, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0, seed=seed,
                         parallel_tool_calls=seed != 0)
    if seed == 0:
        assert len(choice["message"]["tool_calls"]) == 1
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"]
    specs = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in choice["message"]["tool_calls"]:
        jsonschema.validate(json.loads(call["function"]["arguments"]), specs[call["function"]["name"]])


async def test_auto_choice_without_a_call_is_plain_content(client):
    choice = await _chat(client, tools=[WEATHER], max_tokens=8, temperature=0.0)
    assert "tool_calls" not in choice["message"] and isinstance(choice["message"]["content"], str)


async def test_streamed_tool_calls_arrive_as_a_delta(client):
    body = {"messages": MSG, "max_tokens": 120, "tools": [WEATHER], "stream": True, "temperature": 0.5, "seed": 4,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
    assert len(calls) == 1 and calls[0][0]["index"] == 0 and calls[0][0]["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0][0]["function"]["arguments"]), WEATHER["function"]["parameters"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_a_tool_history_renders_and_serves(client):
    messages = MSG + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = await client.post("/v1/chat/completions", json={"messages": messages, "tools": [WEATHER], "max_tokens": 4,
                                                       "tool_choice": "none"})
    assert r.status_code == 200, r.text
