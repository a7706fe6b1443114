"""Async client for an OpenAI-compatible `/v1/completions` endpoint, with retries.

Contract:
- `CompletionClient.complete(model, prompt, max_tokens, stop)` -> generated text (greedy, temperature 0).
- `CompletionClient.loglikelihood(model, context, continuation)` -> sum of the continuation tokens' logprobs,
  scored with `echo=true, max_tokens=0, logprobs=1` on `context + continuation`.
- `CompletionClient.served_models()` -> the ids of `GET /v1/models`, or None when the server does not list them.
- 429 (honouring `Retry-After`), 5xx, time-outs and connection errors are retried with exponential backoff;
  other 4xx and malformed replies raise `ServerReplyError` at once (retrying them cannot help).
- The caller gets either a value or a `ServerReplyError` naming the status and the server's message; nothing is
  ever turned into a silent empty answer.
- `base_url` may be the server root (`http://host:8000`) or, as OpenAI clients spell it, end in `/v1`
  (`server_root` strips it); the request paths always carry `/v1` themselves.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import httpx

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 500, 502, 503, 504}


class ServerReplyError(Exception):
    """A request that failed for good: HTTP error after retries, or a reply that does not fit the API."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class RetryPolicy:
    """Exponential backoff: base * 2**attempt, capped, unless the server says how long (Retry-After)."""

    max_retries: int = 5
    base_s: float = 0.5
    cap_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.cap_s * 4)  # trust the server, within reason
        return min(self.base_s * (2**attempt), self.cap_s)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date (RFC 9110 10.2.3); None when absent or unparsable."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def server_root(base_url: str) -> str:
    """`http://h:8000/v1/` -> `http://h:8000`: accept the OpenAI spelling of a base URL as well as the root."""
    url = base_url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return str(body["error"].get("message", body["error"]))
        return str(body)[:300]
    except ValueError:
        return resp.text[:300]


@dataclass
class CompletionClient:
    """One shared `httpx.AsyncClient`; use as `async with CompletionClient(...) as c:`."""

    base_url: str
    api_key: str | None = None
    timeout_s: float = 600.0   # as the openai client: a request may legitimately wait long in a busy queue
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    transport: httpx.AsyncBaseTransport | None = None  # tests pass httpx.MockTransport
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # tests record the backoff delays
    # Idle connections are dropped before the server's keep-alive time-out (uvicorn: 5 s, as httpx's default):
    # with equal times the server could close a connection just as the client reused it (a ReadError retry).
    keepalive_expiry_s: float = 2.0
    n_requests: int = 0  # HTTP attempts, retries included
    n_retries: int = 0

    async def __aenter__(self) -> "CompletionClient":
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.AsyncClient(
            base_url=server_root(self.base_url), headers=headers, timeout=self.timeout_s,
            transport=self.transport, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64,
                                keepalive_expiry=self.keepalive_expiry_s),
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.aclose()

    async def post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST with retries; returns the decoded JSON object or raises ServerReplyError."""
        last = "no attempt made"
        for attempt in range(self.retry.max_retries + 1):
            retry_after = None
            self.n_requests += 1
            try:
                resp = await self._http.post(path, json=payload)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code == 200:
                    try:
                        body = resp.json()
                    except ValueError as e:
                        raise ServerReplyError(f"reply is not JSON: {resp.text[:200]!r}", 200) from e
                    if not isinstance(body, dict):
                        raise ServerReplyError(f"reply is not a JSON object: {str(body)[:200]}", 200)
                    return body
                last = f"HTTP {resp.status_code}: {_error_message(resp)}"
                if resp.status_code not in RETRY_STATUS:
                    raise ServerReplyError(last, resp.status_code)
                retry_after = parse_retry_after(resp.headers.get("retry-after"))
            if attempt == self.retry.max_retries:
                break
            delay = self.retry.delay(attempt, retry_after)
            self.n_retries += 1
            log.warning("retrying %s in %.2fs after %s", path, delay, last)   # visible: it costs time
            await self.sleep(delay)
        raise ServerReplyError(f"gave up after {self.retry.max_retries + 1} attempts; last: {last}")

    async def served_models(self) -> list[str] | None:
        """The ids `GET /v1/models` lists (one attempt, no retries); None when the server does not say."""
        try:
            resp = await self._http.get("/v1/models")
            data = resp.json().get("data", []) if resp.status_code == 200 else None
            return None if data is None else [m.get("id") for m in data]
        except (httpx.HTTPError, ValueError, AttributeError, TypeError):
            return None

    async def complete(self, model: str, prompt: str, max_tokens: int, stop: list[str] | None = None) -> str:
        payload: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        if stop:
            payload["stop"] = stop
        body = await self.post_json("/v1/completions", payload)
        text = _first_choice(body).get("text")
        if not isinstance(text, str):
            _bad(body, "choices[0].text is not a string")
        return text

    async def loglikelihood(self, model: str, context: str, continuation: str) -> float:
        """Sum of logprobs of the tokens that make up `continuation` when appended to `context`."""
        payload = {"model": model, "prompt": context + continuation, "max_tokens": 0, "echo": True,
                   "logprobs": 1, "temperature": 0.0}
        body = await self.post_json("/v1/completions", payload)
        return continuation_logprob(body, len(context), len(context + continuation))


def _bad(body: Any, why: str):
    raise ServerReplyError(f"malformed reply ({why}): {str(body)[:200]}", 200)


def _first_choice(body: dict[str, Any]) -> dict[str, Any]:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        _bad(body, "no choices[0]")
    return choices[0]


def continuation_logprob(body: dict[str, Any], start: int, end: int) -> float:
    """Sum the logprobs of echoed tokens whose text lies in [start, end) of prompt+continuation.

    Tokens are found via `logprobs.text_offset` (character offsets into the echoed text). A token that straddles
    `start` (the tokenizer merged the context's last characters with the continuation) is counted, since its
    probability is conditioned on the same context; the harness tokenizes the two parts separately instead.
    """
    lp = _first_choice(body).get("logprobs")
    if not isinstance(lp, dict):
        _bad(body, "choices[0].logprobs missing; does the server support echo+logprobs?")
    offsets, values, tokens = lp.get("text_offset"), lp.get("token_logprobs"), lp.get("tokens")
    if not isinstance(offsets, list) or not isinstance(values, list) or len(offsets) != len(values):
        _bad(body, "logprobs.text_offset and logprobs.token_logprobs missing or of different lengths")
    if isinstance(tokens, list) and len(tokens) != len(offsets):
        _bad(body, "logprobs.tokens and logprobs.text_offset differ in length")
    text = _first_choice(body).get("text")
    total, found = 0.0, 0
    for i, (off, val) in enumerate(zip(offsets, values)):
        # a token ends where the next begins; the last one where the echoed text ends
        tok_end = offsets[i + 1] if i + 1 < len(offsets) else (len(text) if isinstance(text, str) else end)
        if not isinstance(off, int):
            _bad(body, f"text_offset[{i}] is not an integer")
        if tok_end > start and off < end:
            if not isinstance(val, (int, float)):
                _bad(body, f"token_logprobs[{i}] is {val!r} for a continuation token")
            total += float(val)
            found += 1
    if found == 0:
        _bad(body, f"no echoed token covers the continuation at characters {start}..{end}")
    return total
