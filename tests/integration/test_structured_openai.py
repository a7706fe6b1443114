"""Structured outputs and tool calling through the official `openai` client against a real `mtlora-serve` process
(tiny random model): 20 JSON schemas via chat `response_format`, every reply parses and validates; vLLM's
`guided_choice` / `guided_regex` on completions via `extra_body`; a bad schema is a 400 the client raises as
BadRequestError; named and "required" tool choices return calls the client parses, streamed ones too."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from serve_helpers import serve_process
from structured_cases import SCHEMAS


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    with serve_process(["--model", str(tiny_model_dir), "--served-model-name", "tiny-llama", "--dtype", "float32",
                        "--kv-cache-memory", "4MiB", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_twenty_json_schemas_every_reply_parses_and_validates(client):
    def ask(i: int) -> None:
        reply = client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "Answer in JSON."}], max_tokens=96,
            temperature=0.8, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i],
                                                                    "strict": True}})
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[i])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(ask, range(len(SCHEMAS))))


def test_vllm_extensions_on_completions(client):
    reply = client.completions.create(model="tiny-llama", prompt="Pick:", max_tokens=8, n=4, temperature=1.0,
                                      seed=0, extra_body={"guided_choice": ["left", "right"]})
    assert {c.text for c in reply.choices} <= {"left", "right"}
    reply = client.completions.create(model="tiny-llama", prompt="Code:", max_tokens=12, temperature=1.0, seed=0,
                                      extra_body={"guided_regex": "[A-Z]{2}[0-9]{4}"})
    assert re.fullmatch("[A-Z]{2}[0-9]{4}", reply.choices[0].text)


def test_a_bad_schema_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, response_format={"type": "json_schema", "json_schema": {
                                           "name": "bad", "schema": {"type": "object", "properties": {"a": {
                                               "type": "nope"}}}}})
    assert err.value.body["param"] == "response_format.json_schema"


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
    "additionalProperties": False}}}


def test_tool_calls_through_the_openai_client(client):
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    named = client.chat.completions.create(model="tiny-llama", messages=msgs, tools=[WEATHER], max_tokens=64,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    required = client.chat.completions.create(model="tiny-llama", messages=msgs, tools=[WEATHER], max_tokens=64,
                                              tool_choice="required", temperature=0.7, seed=1,
                                              parallel_tool_calls=False)
    assert required.choices[0].finish_reason == "tool_calls" and required.choices[0].message.tool_calls
    history = msgs + [named.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    follow = client.chat.completions.create(model="tiny-llama", messages=history, tools=[WEATHER], max_tokens=4,
                                            tool_choice="auto")
    assert follow.choices[0].message.content is not None or follow.choices[0].message.tool_calls
    stream = client.chat.completions.create(model="tiny-llama", messages=msgs, tools=[WEATHER], max_tokens=64,
                                            stream=True, tool_choice="required", parallel_tool_calls=False)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    streamed = [t for d in deltas if d.tool_calls for t in d.tool_calls]
    assert streamed and streamed[0].function.name == "get_weather"
