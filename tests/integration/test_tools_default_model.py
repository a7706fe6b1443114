"""Tool calling on the real default model (SmolLM2-135M-Instruct) through the official `openai` client against a
real `mtlora-serve` process: a named and a "required" tool choice return calls that parse and follow the function's
schema, the tool result goes back in the history and the model answers."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from serve_helpers import serve_process

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(default_model_dir):
    with serve_process(["--model", str(default_model_dir), "--dtype", "float32", "--served-model-name", "smol",
                        "--kv-cache-memory", "64MiB"], startup_timeout=300) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_named_and_required_tool_calls_on_the_default_model(client):
    messages = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    named = client.chat.completions.create(model="smol", messages=messages, tools=[WEATHER], max_tokens=48,
                                           temperature=0, tool_choice={"type": "function",
                                                                       "function": {"name": "get_weather"}})
    call = named.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    required = client.chat.completions.create(model="smol", messages=messages, tools=[WEATHER], max_tokens=64,
                                              temperature=0, tool_choice="required", parallel_tool_calls=False)
    assert required.choices[0].finish_reason == "tool_calls"
    (call2,) = required.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call2.function.arguments), WEATHER["function"]["parameters"])
    history = messages + [named.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = client.chat.completions.create(model="smol", messages=history, tools=[WEATHER], tool_choice="none",
                                            max_tokens=24, temperature=0)
    assert answer.choices[0].message.content
