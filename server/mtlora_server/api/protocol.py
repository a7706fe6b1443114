"""Pydantic request/response models of the OpenAI-compatible API (the API edge only).

Contract:
- Request models validate shapes and ranges; anything invalid becomes HTTP 400 naming the field (see `errors`).
- `to_sampling_params()` converts a request into the engine's internal `SamplingParams` dataclass; nothing past
  the route handlers sees a pydantic object.
- Completions and chat are strict (api.fields): a field that is neither implemented (declared here) nor a harmless
  passthrough (`user`, `metadata`, ...) is a 400 naming it, also inside messages and stream_options; known fields
  that are not implemented say so ("suffix (text insertion) is not supported"). Structured-output fields come
  from `api.guided`, tool fields from `api.tools`, logits-processing fields are declared here. Other request
  models ignore unknown fields. NaN/Inf floats are rejected, and `null` for a field with a default means that default (OpenAI
  documents them nullable).
- Every field that reaches a tensor is typed strictly and bounded here: booleans are JSON booleans only
  (`"stream": "yes"` is a 400), integers are JSON integers only (no strings, floats or booleans) within explicit
  bounds (a huge integer is a 400 naming the field, never an overflow in the engine), floats are finite and in
  range. A temperature below `MIN_TEMPERATURE` (1e-5, as vLLM) means greedy. Checks that need the vocabulary
  (prompt ids, stop_token_ids, detokenize ids) are made by `ServingContext.check_token_ids` in the routes.
Field names and defaults follow OpenAI's API and vLLM's server.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, field_validator, model_validator
from pydantic_core import PydanticUndefined

from mtlora.errors import InvalidRequestError
from mtlora_server.api.guided import GuidedFields, ResponseFormat
from mtlora_server.api.fields import (
    MESSAGE_PASSTHROUGH,
    MESSAGE_UNSUPPORTED,
    STREAM_OPTIONS_PASSTHROUGH,
    STREAM_OPTIONS_UNSUPPORTED,
    check_fields,
)
from mtlora_server.api.tools import ToolCallIn, ToolChoice, ToolSpec
from mtlora_server.engine.types import (MAX_LOGIT_BIAS, MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_TEMPERATURE,
                                       MIN_REPETITION_PENALTY, MIN_TEMPERATURE, SEED_MAX, SEED_MIN, SamplingParams)

# Bounds that keep one request from exhausting the server; values beyond them are a 400, not an OOM.
MAX_N = 16
MAX_STOP = 16
MAX_LOGPROBS = 20
MAX_BAD_WORDS = 256
MAX_PROMPTS = 1024             # prompts in one completions request: each is an engine request (default max_waiting)
INT32_MAX = 2**31 - 1          # token counts and ids: far beyond any context or vocabulary, far below overflow

Float = Annotated[float, Strict()]                  # a JSON number (integers too), never a string or a boolean
TokenId = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
Count = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """OpenAI's API documents most fields as nullable: `"stream": null` means the default, not a 400. Fields
        that take None themselves keep it (completions' `"max_tokens": null` fills the context)."""
        if isinstance(data, dict):
            fields = cls.model_fields
            data = {k: v for k, v in data.items()
                    if not (v is None and k in fields and fields[k].default is not PydanticUndefined
                            and type(None) not in get_args(fields[k].annotation))}
        return data


class StreamOptions(ApiModel):
    model_config = ConfigDict(extra="forbid")          # the parent's check names the key (api.fields)
    include_usage: StrictBool = False


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise InvalidRequestError(f"at most {MAX_STOP} stop strings are allowed", param="stop")
    if any(s == "" for s in stops):
        raise InvalidRequestError("stop strings must not be empty", param="stop")
    return stops


class _SamplingFields(ApiModel, GuidedFields):
    """Sampling fields shared by completions and chat completions."""

    model: str | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    temperature: Float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1, le=1_000_000)
    min_tokens: Count = 0
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP)
    ignore_eos: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # logits processing (vLLM's / OpenAI's definitions: engine.sampling); token ids are checked against the
    # vocabulary and bad_words tokenised by ServingContext.sampling_params
    presence_penalty: Float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: Float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: Float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    logit_bias: dict[str, Any] | None = None
    min_p: Float = Field(0.0, ge=0.0, le=1.0)
    bad_words: list[str] | None = Field(None, max_length=MAX_BAD_WORDS)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias: dict[str, Any] | None) -> dict[str, Any] | None:
        """OpenAI's shape: token ids as JSON object keys (strings of digits) -> a number in [-100, 100]."""
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= len(str(INT32_MAX))):
                raise ValueError(f"key {key[:50]!r} is not a token id (a string of at most 10 digits)")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not \
                    -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:     # False for NaN too
                raise ValueError(f"the bias of token {key} must be a number in [{-MAX_LOGIT_BIAS:g}, "
                                 f"{MAX_LOGIT_BIAS:g}]")
        return bias

    @field_validator("bad_words")
    @classmethod
    def _bad_words(cls, words: list[str] | None) -> list[str] | None:
        if any(not w.strip() for w in words or []):
            raise ValueError("bad words must not be empty or only whitespace")
        return words

    @model_validator(mode="before")
    @classmethod
    def _strict(cls, data):
        """Unknown and unimplemented fields are a 400 naming them (api.fields), nested objects included."""
        data = check_fields(data, cls.model_fields)
        if isinstance(data, dict) and isinstance(data.get("stream_options"), dict):
            data["stream_options"] = check_fields(data["stream_options"], StreamOptions.model_fields,
                                                  "stream_options.", STREAM_OPTIONS_PASSTHROUGH,
                                                  STREAM_OPTIONS_UNSUPPORTED)
        if isinstance(data, dict) and isinstance(data.get("messages"), list):
            data["messages"] = [check_fields(m, ChatMessage.model_fields, f"messages.{i}.", MESSAGE_PASSTHROUGH,
                                             MESSAGE_UNSUPPORTED) for i, m in enumerate(data["messages"])]
        return data

    def _sampling(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=min(self.min_tokens, max_tokens),
            temperature=_temperature(self.temperature),
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            seed=self.seed,
            stop=_stop_list(self.stop),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias={int(k): float(v) for k, v in (self.logit_bias or {}).items()},
            min_p=self.min_p,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _temperature(value: float | None) -> float:
    """The engine's temperature: 1 when absent, 0 (greedy) below MIN_TEMPERATURE, where logits / T overflows."""
    if value is None:
        return 1.0
    return 0.0 if value < MIN_TEMPERATURE else value


# -- completions ------------------------------------------------------------------------------------------------
# Token ids are range-checked against the vocabulary by the route (ServingContext.check_token_ids), which names
# the prompt; any size of integer is fine until then (Python ints). Left to right, token ids first: a million-id
# prompt validates in milliseconds instead of first collecting a million "not a string" errors.
PromptType = Annotated[Union[str, list[StrictInt], list[list[StrictInt]], list[str]],
                       Field(union_mode="left_to_right")]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    max_tokens: Count | None = 16
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    add_special_tokens: StrictBool = True          # vLLM's: BOS etc. before a text prompt
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be an empty list")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list) and any(not p for p in prompt):
            raise ValueError("token-id prompts must not be empty")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}")
        return prompt

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """Internal sampling parameters; semantic errors raise InvalidRequestError naming the field."""
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of is not supported (use n)", param="best_of")
        if max_tokens == 0 and not self.echo:
            raise InvalidRequestError("max_tokens may be 0 only with echo=true", param="max_tokens")
        prompt_logprobs = self.logprobs if (self.echo and self.logprobs is not None) else None
        return self._sampling(max_tokens, self.logprobs, prompt_logprobs)


# -- chat completions -------------------------------------------------------------------------------------------
class ContentPart(ApiModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(ApiModel):
    model_config = ConfigDict(extra="forbid")          # ChatCompletionRequest's check names the key (api.fields)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None          # assistant: calls it made (replayed history)
    tool_call_id: str | None = None                      # tool: which call this message answers

    def rendered(self) -> dict[str, Any]:
        """The message as the chat template expects it: role + plain-text content, and tool calls / the answered
        call's id in transformers' convention (arguments as a dict when they are a JSON object)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name                      # templates that know it render it
        return out


def _arguments(text: str):
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):                # not JSON, or nested past the parser's limit: kept as text
        return text
    return value if isinstance(value, dict) else text


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: StrictBool = True
    response_format: ResponseFormat | None = None
    add_special_tokens: StrictBool = False         # vLLM's: the chat template writes its own special tokens
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs=true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(max_tokens, logprobs, None)


# -- tokenizer endpoints (vLLM's shapes) --------------------------------------------------------------------------
class TokenizeRequest(ApiModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeRequest(ApiModel):
    model: str | None = None
    tokens: list[StrictInt]              # range-checked against the vocabulary by the route


# -- adapter management (vLLM's names) ---------------------------------------------------------------------------
class LoadLoraAdapterRequest(ApiModel):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(ApiModel):
    lora_name: str = Field(min_length=1, max_length=256)


# -- responses ----------------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "mtlora"
    root: str
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
