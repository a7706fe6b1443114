"""Structured outputs (engine/structured.py, api/guided.py): which request field asks for which constraint, what is
refused, and end to end on the tiny random model — the replies follow JSON schemas, regexes and choices, bad
constraints are 400s naming the field, and constrained and free requests share batches without changing the free
ones' tokens."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import pytest

from mtlora.errors import InvalidRequestError
from mtlora_server.api import ServerArgs, build_app
from mtlora_server.api.guided import guided_decoding
from mtlora_server.api.protocol import ChatCompletionRequest
from structured_cases import SCHEMAS

MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("fields,kind,param", [
    ({"guided_json": {"type": "object"}}, "json", "guided_json"),
    ({"guided_json": '{"type": "object"}'}, "json", "guided_json"),
    ({"guided_regex": "a+"}, "regex", "guided_regex"),
    ({"guided_choice": ["a", "b"]}, "choice", "guided_choice"),
    ({"guided_grammar": 'root ::= "a"'}, "grammar", "guided_grammar"),
    ({"structured_outputs": {"json": {"type": "object"}}}, "json", "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a"}}, "regex", "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["x"]}}, "choice", "structured_outputs.choice"),
    ({"structured_outputs": {"json_object": True}}, "json_object", "structured_outputs.json_object"),
    ({"response_format": {"type": "json_object"}}, "json_object", "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     "json", "response_format.json_schema"),
    ({"response_format": {"type": "text"}}, None, None),
    ({}, None, None),
])
def test_which_field_asks_for_which_constraint(fields, kind, param):
    guided = guided_decoding(ChatCompletionRequest(messages=MSG, **fields))
    assert (guided.kind, guided.param) == (kind, param) if kind else guided is None


@pytest.mark.parametrize("fields,param", [
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": ["a", ""]}, "guided_choice"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_regex": "a", "ignore_eos": True}, "ignore_eos"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
])
def test_refused_constraints_name_the_field(fields, param):
    with pytest.raises(InvalidRequestError) as err:
        guided_decoding(ChatCompletionRequest(messages=MSG, **fields))
    assert err.value.param == param


@pytest.fixture
async def client(tiny_model_dir):
    from mtlora_server.engine.args import EngineArgs
    from mtlora_server.engine.engine import Engine

    engine = Engine.from_args(EngineArgs(model=str(tiny_model_dir), dtype="float32", device="cpu",
                                         kv_cache_memory=1 << 22, max_num_seqs=32))
    await engine.start()
    app = build_app(engine, ServerArgs())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
        yield c
    await engine.shutdown()


async def _complete(client, **body):
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 48, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"]


async def test_replies_follow_every_json_schema(client):
    async def one(i, schema):
        r = await client.post("/v1/chat/completions", json={
            "messages": MSG, "max_tokens": 96, "temperature": 0.8, "seed": i,
            "response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    await asyncio.gather(*(one(i, s) for i, s in enumerate(SCHEMAS)))


async def test_regex_choice_grammar_and_json_object(client):
    (c,) = await _complete(client, guided_regex="[0-9]{3}-[a-c]{2}", temperature=1.0, seed=3)
    assert re.fullmatch("[0-9]{3}-[a-c]{2}", c["text"]) and c["finish_reason"] == "stop"
    texts = {c["text"] for c in await _complete(client, guided_choice=["yes", "no", "maybe"], n=6,
                                                 temperature=1.0, seed=1)}
    assert texts <= {"yes", "no", "maybe"}
    (c,) = await _complete(client, guided_grammar='root ::= "a" ("b" | "c")*  "d"', max_tokens=12, temperature=1.0,
                           seed=2)
    assert re.fullmatch("a[bc]*d", c["text"]) or c["finish_reason"] == "length"
    (c,) = await _complete(client, structured_outputs={"json_object": True}, max_tokens=200, temperature=0.0)
    assert c["finish_reason"] == "length" or isinstance(json.loads(c["text"]), dict)


@pytest.mark.parametrize("body,param", [
    ({"guided_regex": "[0-9"}, "guided_regex"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}, "guided_json"),
    ({"guided_grammar": "root ::= "}, "guided_grammar"),
    ({"guided_grammar": "root ::= root"}, "guided_grammar"),                 # compiles, but admits no output
    ({"guided_json": {"$ref": "#/definitions/x", "definitions": {"x": {"$ref": "#/definitions/x"}}}}, "guided_json"),
])
async def test_invalid_constraints_are_400_and_the_server_serves_on(client, body, param):
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    await _complete(client, max_tokens=2)


async def test_constrained_and_free_requests_share_batches(client):
    free = {"max_tokens": 24, "temperature": 0.0}
    (alone,) = await _complete(client, **free)
    results = await asyncio.gather(*([_complete(client, guided_choice=["yes", "no"], max_tokens=8)] * 4 +
                                     [_complete(client, **free)] * 4))
    assert [r[0]["text"] for r in results[4:]] == [alone["text"]] * 4
    assert {r[0]["text"] for r in results[:4]} <= {"yes", "no"}


async def test_a_finished_grammar_stops_the_choice_even_when_eos_is_not_allowed_to(client):
    """min_tokens / ignore_eos keep a sequence going past EOS, but nothing can follow a finished grammar: the
    choice stops with the constrained text (each used to fail with a 500 on the next step's mask). The API refuses
    ignore_eos beside the guided fields, but a named tool choice (a JSON-schema grammar) takes it."""
    (c,) = await _complete(client, guided_choice=["ab"], max_tokens=10, min_tokens=5)
    assert c["finish_reason"] == "stop" and c["text"] == "ab", c
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}}}
    r = await client.post("/v1/chat/completions", json={
        "messages": MSG, "max_tokens": 40, "temperature": 0.0, "ignore_eos": True, "tools": [tool],
        "tool_choice": {"type": "function", "function": {"name": "f"}}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] != "length":                      # a tiny random model may not close the object
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "f" and set(json.loads(call["function"]["arguments"])) == {"a"}
    await _complete(client, max_tokens=2)


async def test_logit_processing_that_bans_every_allowed_token_is_a_400_for_that_request_only(client):
    """bad_words that forbid the only continuation the constraint allows: a 400 naming the conflict (was a 500:
    "the output grammar rejected token 0"); the server serves on."""
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 6, "temperature": 0.0,
                                                   "guided_choice": ["ab"], "bad_words": ["b"]})
    assert r.status_code == 400, r.text
    assert "forbids every token its output constraint allows" in r.json()["error"]["message"]
    await _complete(client, max_tokens=2)


async def test_a_constraint_too_costly_to_mask_fails_its_request_alone(client, monkeypatch):
    """A row whose grammar mask takes longer than FILL_LIMIT_S (an ambiguous grammar late in a long output) fails
    its request with a 400, while a free request in the same batches is served (limit forced to -1 here)."""
    import mtlora_server.engine.structured as structured

    monkeypatch.setattr(structured, "FILL_LIMIT_S", -1.0)
    slow, free = await asyncio.gather(
        client.post("/v1/completions", json={"prompt": "x", "max_tokens": 8, "guided_choice": ["ab", "cd"]}),
        client.post("/v1/completions", json={"prompt": "x", "max_tokens": 8, "temperature": 0.0}))
    assert slow.status_code == 400 and "too costly to evaluate" in slow.json()["error"]["message"], slow.text
    assert free.status_code == 200, free.text
