"""Structured-output request fields (the API edge): OpenAI's chat `response_format` and vLLM's extensions.

Contract:
- Chat completions: `response_format` {"type": "text"} (no constraint), {"type": "json_object"} (any JSON object),
  {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}} (the reply follows the schema).
- Completions and chat: vLLM's `guided_json` (schema as an object or a JSON string), `guided_regex`,
  `guided_choice` (list of strings), `guided_grammar` (EBNF), and the newer `structured_outputs` object with the
  same members (`json`, `regex`, `choice`, `grammar`, `json_object`).
- `guided_decoding(req)` returns the one `GuidedDecoding` a request asks for, or None; asking for two is a 400
  naming the second field. `compile_guided(ctx, guided)` compiles it with the engine's xgrammar backend off the
  event loop (a bad schema, regex or grammar is a 400 naming the field) and returns what `GenerationRequest.grammar`
  takes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from mtlora.errors import InvalidRequestError
from mtlora_server.engine.structured import GuidedDecoding

MAX_CHOICES = 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class JsonSchemaFormat(_Strict):
    name: str = Field("response", max_length=256)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = None
    json_object: StrictBool | None = None


class GuidedFields(BaseModel):
    """Mixed into the request models: vLLM's guided-decoding fields."""

    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None


def _schema_text(schema: str | dict, param: str) -> str:
    if isinstance(schema, dict):
        return json.dumps(schema)
    try:
        json.loads(schema)
    except ValueError:
        raise InvalidRequestError("the JSON schema is not valid JSON", param=param) from None
    except RecursionError:
        raise InvalidRequestError("the JSON schema is nested too deeply", param=param) from None
    return schema


def guided_decoding(req) -> GuidedDecoding | None:
    """The request's single output constraint, from whichever field carries it."""
    found: list[GuidedDecoding] = []
    fmt: ResponseFormat | None = getattr(req, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        found.append(GuidedDecoding("json_object", param="response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InvalidRequestError("response_format type json_schema needs json_schema.schema",
                                      param="response_format.json_schema")
        found.append(GuidedDecoding("json", json.dumps(fmt.json_schema.schema_), "response_format.json_schema"))
    so = req.structured_outputs or StructuredOutputs()
    for value, kind, param in ((req.guided_json, "json", "guided_json"), (so.json_, "json", "structured_outputs.json"),
                               (req.guided_regex, "regex", "guided_regex"),
                               (so.regex, "regex", "structured_outputs.regex"),
                               (req.guided_choice, "choice", "guided_choice"),
                               (so.choice, "choice", "structured_outputs.choice"),
                               (req.guided_grammar, "grammar", "guided_grammar"),
                               (so.grammar, "grammar", "structured_outputs.grammar")):
        if value is None:
            continue
        if kind == "json":
            value = _schema_text(value, param)
        elif kind == "choice":
            if any(c == "" for c in value):
                raise InvalidRequestError("choices must not be empty strings", param=param)
            value = json.dumps(value)
        elif not value:
            raise InvalidRequestError(f"{param} must not be empty", param=param)
        found.append(GuidedDecoding(kind, value, param))
    if so.json_object:
        found.append(GuidedDecoding("json_object", param="structured_outputs.json_object"))
    if len(found) > 1:
        raise InvalidRequestError(f"only one output constraint per request; got {found[0].param} and "
                                  f"{found[1].param}", param=found[1].param)
    if found and req.ignore_eos:
        raise InvalidRequestError("ignore_eos cannot be combined with a structured-output constraint (the grammar "
                                  "ends the output)", param="ignore_eos")
    return found[0] if found else None


async def compile_guided(ctx, guided: GuidedDecoding | None):
    """Compiled grammar for `guided` (None: none), compiled in a worker thread (xgrammar, no torch)."""
    if guided is None:
        return None
    backend = getattr(ctx.engine, "grammar", None)
    if backend is None:
        raise InvalidRequestError("structured outputs are not supported by this engine", param=guided.param)
    return await asyncio.to_thread(backend.compile, guided)
