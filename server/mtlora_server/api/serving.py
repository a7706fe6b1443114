"""What completions and chat share: model -> adapter resolution, prompt checks, SSE framing, logprob rendering.

Contract:
- `ServingContext.resolve_model(name)` maps the request's `model` to an adapter name (None for the base model)
  or raises AdapterNotFoundError (404).
- `check_prompt(ids, max_tokens)` raises ContextLengthError when prompt + max_tokens exceed the context (checked
  first: it costs nothing) and InvalidRequestError for token ids outside the vocabulary; `default_max_tokens`
  fills in an absent value.
- Tokenizer work goes through `ctx.tokens` (api.tokenization: off the event loop once an input is more than
  small): `await encode_prompt(text, max_tokens, param)` refuses a prompt that cannot fit from its token count
  alone, `await encode(...)`, `await decode(...)`. A text the tokenizer cannot encode is a 400 naming `param`.
- `await sampling_params(req, max_tokens)`: the request's SamplingParams with what needs the tokenizer: logit_bias
  ids inside the vocabulary (else 400 naming logit_bias), and `bad_words` tokenised as vLLM does (each word
  stripped of leading spaces, encoded without special tokens, and again with one leading space when that gives a
  different first token and as many tokens) into `bad_words_ids`.
- `sse(obj)` frames one server-sent event; streams end with `data: [DONE]`.
- `request_ids(http_request, prefix)`: the response `id` is `<prefix>-<X-Request-Id>` (api.app's middleware
  supplies the id); engine request ids start with it, plus a random part when the client chose the id (two
  clients may send the same one).
- `usage(...)` carries `prompt_tokens_details.cached_tokens`: prompt tokens whose K/V came from the prefix cache.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field

from mtlora.errors import AdapterNotFoundError, ContextLengthError, InvalidRequestError
from mtlora_server.api.limits import DEFAULT_MAX_REQUEST_BODY_SIZE
from mtlora_server.api.metrics import Metrics
from mtlora_server.api.tokenization import Encoded, TokenizerWork
from mtlora_server.engine.types import SamplingParams, TokenLogprob

DONE = "data: [DONE]\n\n"


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class ServerArgs:
    """API-layer settings (the CLI fills them; tests build them directly)."""

    served_model_name: str | None = None
    api_key: str | None = None
    enable_adapter_loading: bool = False
    adapter_root: str | None = None
    max_request_body_size: int = DEFAULT_MAX_REQUEST_BODY_SIZE
    allowed_origins: list[str] = field(default_factory=list)    # CORS; empty: no CORS middleware
    allow_credentials: bool = False
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    tool_call_parser: str | None = None      # with enable_auto_tool_choice: how "auto" tool calls are read
    enable_auto_tool_choice: bool = False


@dataclass
class ServingContext:
    engine: object
    args: ServerArgs
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))
    tokens: TokenizerWork = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = TokenizerWork(self.engine.tokenizer)

    @property
    def served_name(self) -> str:
        return self.args.served_model_name or self.engine.base_model_name

    def base_names(self) -> set[str]:
        return {self.served_name, self.engine.base_model_name}

    def adapter_names(self) -> set[str]:
        return {a.name for a in self.engine.list_adapters()}

    def resolve_model(self, name: str | None) -> str | None:
        """Adapter to use (None: the base) for the request's `model` field."""
        if name is None or name in self.base_names():
            return None
        if name in self.adapter_names():
            return name
        raise AdapterNotFoundError(name)

    def label(self, adapter: str | None) -> str:
        return adapter or self.served_name

    @property
    def vocab_size(self) -> int:
        size = getattr(self.engine, "vocab_size", None)
        if size is None:
            size = len(self.engine.tokenizer)
        return int(size)

    async def _encode(self, text: str, add_special_tokens: bool, param: str, limit: int | None) -> Encoded:
        try:
            return await self.tokens.encode(text, add_special_tokens, limit)
        except Exception as exc:  # e.g. lone surrogates the tokenizer cannot encode
            raise InvalidRequestError(f"{param} cannot be tokenized: {exc}", param=param) from None

    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        return (await self._encode(text, add_special_tokens, param, None)).ids

    async def encode_prompt(self, text: str, max_tokens: int | None, param: str = "prompt",
                            add_special_tokens: bool = True) -> list[int]:
        """The prompt's ids; a prompt longer than the context is refused from its count (ids never built)."""
        encoded = await self._encode(text, add_special_tokens, param, self.engine.max_model_len)
        if encoded.ids is None:
            self.check_length(encoded.count, max_tokens, param)
        return encoded.ids

    async def tokenize_json(self, text: str, add_special_tokens: bool, param: str, token_strs: bool) -> bytes:
        """The /tokenize response body for `text` (rendered off the loop when big)."""
        try:
            return await self.tokens.tokenize_json(text, add_special_tokens, self.engine.max_model_len, token_strs)
        except Exception as exc:  # e.g. lone surrogates the tokenizer cannot encode
            raise InvalidRequestError(f"{param} cannot be tokenized: {exc}", param=param) from None

    async def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return await self.tokens.decode(list(ids), skip_special_tokens)

    async def sampling_params(self, req, max_tokens: int) -> SamplingParams:
        """`req.to_sampling_params(max_tokens)` plus the checks and tokenisation that need the tokenizer."""
        params = req.to_sampling_params(max_tokens)
        self.check_token_ids(list(params.logit_bias), "logit_bias")
        if not req.bad_words:
            return params
        return dataclasses.replace(params, bad_words_ids=await self.bad_words_ids(req.bad_words))

    async def bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's tokenisation of `bad_words` (SamplingParams.update_from_tokenizer): with and without a leading
        space, so a word is banned both at the start of the text and inside it."""
        out: list[list[int]] = []
        for i, word in enumerate(words):
            plain = await self.encode(word.lstrip(), add_special_tokens=False, param="bad_words")
            if not plain:
                raise InvalidRequestError(f"bad_words.{i} ({word[:50]!r}) tokenises to no tokens", param="bad_words")
            out.append(plain)
            spaced = await self.encode(" " + word.lstrip(), add_special_tokens=False, param="bad_words")
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                out.append(spaced)
        self.check_token_ids([t for ids in out for t in ids], "bad_words")
        return out

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)

    def check_length(self, count: int, max_tokens: int | None, param: str = "prompt") -> None:
        """ContextLengthError when `count` prompt tokens + max_tokens (None: at least one) exceed the context."""
        if max_tokens is None:
            self.default_max_tokens(count, param)
            return
        limit = self.engine.max_model_len
        if count + max_tokens > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{count + max_tokens} tokens ({count} in the prompt, {max_tokens} for the completion). "
                "Please reduce the prompt or max_tokens.",
                param="max_tokens" if count < limit else param,
            )

    def check_prompt(self, ids: list[int], max_tokens: int, param: str = "prompt") -> None:
        if not ids:
            raise InvalidRequestError("the prompt is empty", param=param)
        self.check_length(len(ids), max_tokens, param)
        self.check_token_ids(ids, param)

    def default_max_tokens(self, count: int, param: str = "messages") -> int:
        """The room the context leaves after `count` prompt tokens (ContextLengthError when none)."""
        room = self.engine.max_model_len - count
        if room < 1:
            raise ContextLengthError(
                f"This model's maximum context length is {self.engine.max_model_len} tokens; the prompt alone has "
                f"{count}.", param=param)
        return room

    def token_str(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)


def request_ids(http_request, prefix: str) -> tuple[str, str]:
    """(response id, engine request id base) for a request of the route `prefix` ("cmpl", "chatcmpl")."""
    state = http_request.scope.get("state") or {}
    rid = state.get("request_id")
    if rid is None:                                 # no id middleware (not built by build_app)
        rid = uuid.uuid4().hex
    response_id = f"{prefix}-{rid}"
    if state.get("request_id_given"):
        return response_id, f"{response_id}.{uuid.uuid4().hex[:8]}"
    return response_id, response_id


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


ALIGN_SLACK = 16      # characters a token's text may start after the previous token's end (dropped spaces, ...)


def align_offsets(tokens: list[str], text: str, base: int = 0) -> list[int]:
    """Where each token's string starts in `text` (plus `base`), left to right. A token whose string is not found
    within ALIGN_SLACK characters of the previous token's end (a BOS the echoed prompt does not show, one byte of a
    multi-byte character) is zero-width there, so offsets never run past the text or out of order."""
    pos, offsets = 0, []
    for token in tokens:
        at = text.find(token, pos, pos + len(token) + ALIGN_SLACK) if token else -1
        offsets.append(base + (at if at >= 0 else pos))
        if at >= 0:
            pos = at + len(token)
    return offsets


class CompletionLogprobs:
    """OpenAI's legacy logprobs object. `as_dict(text, base)`: text_offset[i] is where token i starts in the
    returned text, found by aligning the token strings with `text` (which starts at character `base` of the
    choice's whole text) rather than by adding up token lengths: a special token the echoed prompt does not show
    (BOS) takes no room."""

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []

    def add(self, token_id: int, lp: TokenLogprob | None) -> None:
        text = self.ctx.token_str(token_id)
        self.tokens.append(text)
        if lp is None:                      # the first prompt token has no logprob
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
            return
        self.token_logprobs.append(lp.logprob)
        top: dict[str, float] = {}
        for tid, value in lp.top:
            top.setdefault(self.ctx.token_str(tid), value)
        top.setdefault(text, lp.logprob)     # like OpenAI/vLLM: the sampled token is always present
        self.top_logprobs.append(top)

    def as_dict(self, text: str, base: int = 0) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": align_offsets(self.tokens, text, base)}


def chat_logprob_entries(ctx: ServingContext, logprobs: list[TokenLogprob], top_n: int) -> list[dict]:
    """OpenAI's chat logprobs `content` entries."""
    def entry(token_id: int, value: float) -> dict:
        text = ctx.token_str(token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8", errors="replace"))}

    out = []
    for lp in logprobs:
        item = entry(lp.token_id, lp.logprob)
        item["top_logprobs"] = [entry(tid, v) for tid, v in lp.top[:top_n]]
        out.append(item)
    return out
