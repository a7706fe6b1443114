"""Which request fields the completions and chat routes accept: strict by default (the API edge only).

Contract:
- `check_fields(data, declared, where)` runs before pydantic parses a request body (or a nested object) and
  raises InvalidRequestError (HTTP 400) naming the field for every key that is neither declared by the model nor
  a harmless passthrough:
  - `PASSTHROUGH` fields cannot change the output (`user`, `metadata`, `store`, ...): accepted and dropped;
  - `UNSUPPORTED` fields are known OpenAI / vLLM fields this server does not implement: accepted only with a value
    that asks for nothing (null, the default, an empty list), else a 400 that says so (e.g. "structured outputs
    are not supported yet");
  - anything else is a 400 "unknown field" (a typo or a feature of another server: never silently ignored).
- A null value of any known field means "absent".
- Fields a model declares are never looked up here, so implementing a field is declaring it on the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mtlora.errors import InvalidRequestError

# Fields that cannot change what is generated or returned: routing, billing, tracing and caching hints.
PASSTHROUGH = frozenset({
    "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
    "prompt_cache_retention", "prompt_cache_options",
    "prediction",                                        # a latency hint: the output is the same without it
    "request_id",                                        # vLLM's; the X-Request-Id header names requests here
})
# Keys of a chat message that are output-only or cannot change the rendered prompt.
MESSAGE_PASSTHROUGH = frozenset({"refusal", "annotations"})
STREAM_OPTIONS_PASSTHROUGH = frozenset({"include_obfuscation"})

_TOOLS = "tools are supported on /v1/chat/completions (tools, tool_choice); this field is not"
_STRUCTURED = ("not supported; use response_format (chat), or guided_json / guided_regex / guided_choice / "
               "guided_grammar / structured_outputs (both routes)")


def _empty(value) -> bool:
    return value in (None, "", [], {})


def _equals(*harmless) -> Callable[[Any], bool]:
    return lambda value: value is None or any(value == h and type(value) is type(h) for h in harmless)


@dataclass(frozen=True)
class Unsupported:
    """A known field this server does not implement; `harmless(value)` is true for values that ask nothing."""

    reason: str
    harmless: Callable[[Any], bool] = _empty


UNSUPPORTED: dict[str, Unsupported] = {
    # OpenAI
    "suffix": Unsupported("suffix (text insertion) is not supported"),
    "echo": Unsupported("echo is supported on /v1/completions only", _equals(False)),
    # (tools, tool_choice, parallel_tool_calls and response_format are declared by the chat model: on
    # /v1/completions they land here)
    "tools": Unsupported(_TOOLS),
    "tool_choice": Unsupported(_TOOLS, _equals("none", "auto")),      # without tools both mean "no tool call"
    "parallel_tool_calls": Unsupported(_TOOLS, lambda v: v is None or isinstance(v, bool)),
    "functions": Unsupported("the deprecated functions field is not supported; use tools"),
    "function_call": Unsupported("the deprecated function_call field is not supported; use tool_choice",
                                 _equals("none", "auto")),
    "response_format": Unsupported("response_format is supported on /v1/chat/completions; here use guided_json "
                                   "or structured_outputs", lambda v: v is None or v == {"type": "text"}),
    "audio": Unsupported("audio output is not supported"),
    "modalities": Unsupported("only text output is supported", _equals(["text"])),
    "reasoning_effort": Unsupported("reasoning_effort is not supported (no reasoning models are served)"),
    "verbosity": Unsupported("verbosity is not supported"),
    "web_search_options": Unsupported("web search is not supported"),
    "moderation": Unsupported("moderation is not supported"),
    # vLLM extensions
    "guided_decoding_backend": Unsupported("guided_decoding_backend: " + _STRUCTURED + " (xgrammar is the backend)",
                                           _equals("xgrammar", "auto")),
    "guided_whitespace_pattern": Unsupported("guided_whitespace_pattern: " + _STRUCTURED),
    "structural_tag": Unsupported("structural_tag: " + _STRUCTURED),
    "use_beam_search": Unsupported("beam search is not supported", _equals(False)),
    "length_penalty": Unsupported("length_penalty applies to beam search, which is not supported", _equals(1, 1.0)),
    "priority": Unsupported("priority scheduling is not supported (requests are served first come, first "
                            "served); priority must be 0", _equals(0)),
    "chat_template": Unsupported("a per-request chat_template is not supported; start the server with "
                                 "--chat-template"),
    "chat_template_kwargs": Unsupported("chat_template_kwargs is not supported yet"),
    "continue_final_message": Unsupported("continue_final_message is not supported yet", _equals(False)),
    "documents": Unsupported("documents (RAG templates) are not supported"),
    "mm_processor_kwargs": Unsupported("multimodal inputs are not supported"),
    "truncate_prompt_tokens": Unsupported("truncate_prompt_tokens is not supported; shorten the prompt"),
    "allowed_token_ids": Unsupported("allowed_token_ids is not supported yet"),
    "prompt_logprobs": Unsupported("prompt_logprobs is not supported as a field; use echo=true with logprobs "
                                   "on /v1/completions"),
    "logits_processors": Unsupported("logits_processors are not supported"),
    "return_tokens_as_token_ids": Unsupported("return_tokens_as_token_ids is not supported", _equals(False)),
    "return_token_ids": Unsupported("return_token_ids is not supported", _equals(False)),
    "spaces_between_special_tokens": Unsupported("spaces_between_special_tokens=false is not supported",
                                                 _equals(True)),
    "detokenize": Unsupported("detokenize=false is not supported", _equals(True)),
    "cache_salt": Unsupported("cache_salt (prefix-cache isolation per tenant) is not supported"),
    "kv_transfer_params": Unsupported("disaggregated prefill (kv_transfer_params) is not supported"),
    "vllm_xargs": Unsupported("vllm_xargs is not supported"),
    "include_reasoning": Unsupported("reasoning output is not supported", _equals(False)),
    "thinking_token_budget": Unsupported("reasoning output is not supported"),
}
# Chat-message keys that cannot be rendered (tool_calls / tool_call_id are declared by ChatMessage).
MESSAGE_UNSUPPORTED: dict[str, Unsupported] = {
    "function_call": Unsupported("the deprecated function_call is not supported; use tool_calls"),
    "audio": Unsupported("audio messages are not supported"),
    "reasoning_content": Unsupported("reasoning_content in messages is not supported yet"),
    "reasoning": Unsupported("reasoning in messages is not supported yet"),
}
STREAM_OPTIONS_UNSUPPORTED: dict[str, Unsupported] = {
    "continuous_usage_stats": Unsupported("continuous_usage_stats is not supported; usage comes in the last "
                                          "chunk", _equals(False)),
}


def check_fields(data: Any, declared, where: str = "", passthrough=PASSTHROUGH,
                 unsupported: dict[str, Unsupported] = UNSUPPORTED) -> Any:
    """`data` without its harmless passthrough / unsupported-but-empty keys; InvalidRequestError for the others.
    `where` prefixes the parameter name ("messages.2.")."""
    if not isinstance(data, dict):
        return data
    kept = {}
    for key, value in data.items():
        if key in declared:
            kept[key] = value
        elif key in passthrough:
            continue
        elif key in unsupported:
            rule = unsupported[key]
            if not rule.harmless(value):
                raise InvalidRequestError(f"{where}{key}: {rule.reason}", param=f"{where}{key}")
        else:
            raise InvalidRequestError(f"unknown field {where}{key!s:.100}: not part of this API (check the "
                                      "spelling; fields of other servers are refused rather than ignored)",
                                      param=f"{where}{key!s:.100}")
    return kept
