"""Tool calling for chat completions: OpenAI's `tools` / `tool_choice`, vLLM's flags and behaviour.

Contract:
- `ToolSpec` / `ToolChoice` are the request fields (pydantic, the API edge). The tools reach the chat template as
  `tools=[{"type": "function", "function": {...}}]` (transformers' convention); assistant `tool_calls` and `tool`
  messages (`tool_call_id`) in the history are passed to the template as well (ChatMessage.rendered).
- `plan_tools(req, parser)` decides what a request does (`ToolPlan`):
  - `tool_choice` "none", or no tools: plain chat (the template still sees the tools);
  - a named function: the output is constrained (xgrammar) to that function's `parameters` schema and returned as
    one tool call (finish_reason "stop", as OpenAI does for a named choice);
  - "required": the output is constrained to a JSON array of one or more `{"name", "parameters"}` calls of the
    given tools (exactly one with `parallel_tool_calls: false`), returned as tool calls (finish_reason
    "tool_calls");
  - "auto" (the default when tools are given): needs `--enable-auto-tool-choice --tool-call-parser NAME` (a 400
    otherwise, as in vLLM); the free output is parsed with that parser; calls found become `tool_calls`
    (finish_reason "tool_calls"), the rest of the text stays `content`.
- Parsers (`PARSERS`): "hermes" (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks: Qwen, Hermes,
  SmolLM3 and others) and "llama3_json" (a JSON object `{"name": ..., "parameters": {...}}`, or several separated by
  `;`). `parse_tool_calls(parser, text) -> (content or None, [ToolCall])`; text that does not parse is content.
- Streams with tools buffer the choice's text and send its tool calls as one delta when it finishes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from mtlora.errors import InvalidRequestError
from mtlora_server.engine.structured import GuidedDecoding

MAX_TOOLS = 128


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FunctionSpec(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolSpec(_Strict):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Strict):
    name: str
    arguments: str = "{}"


class ToolCallIn(_Strict):
    """An assistant message's tool call in the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


@dataclass
class ToolCall:
    name: str
    arguments: str                                     # JSON text, as OpenAI returns it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


@dataclass
class ToolPlan:
    """What the route does with a request's tools: the constraint to apply and how to read the output."""

    mode: Literal["none", "named", "required", "auto"]
    guided: GuidedDecoding | None = None
    name: str | None = None                            # the named function
    parser: str | None = None                          # auto: which parser reads the output

    @property
    def parses_output(self) -> bool:
        return self.mode != "none"


def template_tools(tools: list[ToolSpec] | None) -> list[dict] | None:
    return None if not tools else [t.model_dump(exclude_none=True) for t in tools]


def plan_tools(req, parser: str | None) -> ToolPlan:
    """The ToolPlan of a chat request (400s name the field); `parser` is --tool-call-parser when auto is enabled."""
    tools, choice = req.tools, req.tool_choice
    if tools is not None and len(tools) > MAX_TOOLS:
        raise InvalidRequestError(f"at most {MAX_TOOLS} tools are allowed", param="tools")
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return ToolPlan("none")
    if choice == "none":
        return ToolPlan("none")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tool function names must be unique", param="tools")
    if isinstance(choice, NamedToolChoice):
        spec = next((t.function for t in tools if t.function.name == choice.function.name), None)
        if spec is None:
            raise InvalidRequestError(f"tool_choice names {choice.function.name!r}, which is not among the tools",
                                      param="tool_choice")
        schema = spec.parameters or {"type": "object"}
        return ToolPlan("named", GuidedDecoding("json", json.dumps(schema), "tools"), name=spec.name)
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                   "parameters": t.function.parameters or {"type": "object"}},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if req.parallel_tool_calls is False:            # OpenAI: at most one call
            schema["maxItems"] = 1
        return ToolPlan("required", GuidedDecoding("json", json.dumps(schema), "tools"))
    if parser is None:                                  # "auto" (explicit or by default)
        raise InvalidRequestError('"auto" tool choice requires mtlora-serve --enable-auto-tool-choice and '
                                  "--tool-call-parser NAME", param="tool_choice")
    return ToolPlan("auto", parser=parser)


def read_output(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of a finished choice under `plan`."""
    if plan.mode == "named":
        return None, [ToolCall(plan.name, text)]
    if plan.mode == "required":
        try:
            calls = json.loads(text)
        except (ValueError, RecursionError):            # cut by max_tokens: no complete call to return
            return text, []
        return None, [ToolCall(c["name"], json.dumps(c["parameters"])) for c in calls]
    if plan.mode == "auto":
        return parse_tool_calls(plan.parser, text)
    return text, []


# -- parsers -----------------------------------------------------------------------------------------------------
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def _hermes_bodies(text: str) -> list[str]:
    """The stripped text of each `<tool_call>` block (the last may be unclosed: cut by max_tokens). A linear scan:
    the regex it replaces (`<tool_call>\\s*(.*?)\\s*(?:</tool_call>|$)`) backtracks quadratically on long runs of
    whitespace, which a model's output (or a guided choice) can hold, and this runs on the event loop."""
    bodies, pos = [], 0
    while (start := text.find(_OPEN, pos)) != -1:
        start += len(_OPEN)
        end = text.find(_CLOSE, start)
        bodies.append(text[start:end if end != -1 else len(text)].strip())
        if end == -1:
            break
        pos = end + len(_CLOSE)
    return bodies


def _call_of(obj, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args))


def _parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    calls = []
    for body in _hermes_bodies(text):
        try:
            call = _call_of(json.loads(body), "arguments")
        except (ValueError, RecursionError):            # model output nested past the parser's limit: content
            call = None
        if call is None:
            return text, []                             # a malformed block: leave everything as content
        calls.append(call)
    if not calls:
        return text, []
    content = text[:text.index(_OPEN)].strip()
    return content or None, calls


def _parse_llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    for part in body.split(";"):
        try:
            call = _call_of(json.loads(part), "parameters")
        except (ValueError, RecursionError):
            return text, []
        if call is None:
            return text, []
        calls.append(call)
    return None, calls


PARSERS = {"hermes": _parse_hermes, "llama3_json": _parse_llama3_json}


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[ToolCall]]:
    return PARSERS[parser](text)
