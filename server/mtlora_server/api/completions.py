"""POST /v1/completions: prompts -> engine requests -> OpenAI `text_completion` responses (whole or streamed).

Contract: each prompt of a batch is one engine request with n sequences; choice index = prompt_index * n + seq.
Errors in the input surface before any byte is sent (see `streams.open_streams`). `echo` prepends the prompt text
(and, with `logprobs`, the prompt's logprobs, the first being null); `text_offset` locates each token in the
returned text (a BOS the echoed prompt does not show has no width: serving.align_offsets); `usage` is always
reported (in streams as a final chunk when `stream_options.include_usage`, else absent from chunks as in OpenAI's API).
Tokenisation runs off the event loop once a prompt is more than small (api.tokenization); a prompt longer than the
context is refused from its token count before anything else is done per token, and a token-id prompt is only
decoded when `echo` needs its text. The response id is `cmpl-<X-Request-Id>`; `usage.prompt_tokens_details.
cached_tokens` counts the prompt tokens the prefix cache supplied.
"""

from __future__ import annotations

import asyncio
import time

from fastapi.responses import JSONResponse
from starlette.requests import Request

from mtlora_server.api.guided import compile_guided, guided_decoding
from mtlora_server.api.protocol import CompletionRequest
from mtlora_server.api.serving import CompletionLogprobs, ServingContext, request_ids, sse, usage
from mtlora_server.api.streams import (
    CancellingStreamingResponse,
    close_all,
    merge,
    open_streams,
    run_until_disconnect,
    sse_events,
)
from mtlora_server.engine.types import GenerationRequest


def _items(req: CompletionRequest) -> list:
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


async def _prompt(ctx: ServingContext, req: CompletionRequest, item, param: str) -> tuple[list[int], str]:
    """(token ids, prompt text) of one prompt, its length checked before any per-token work."""
    if isinstance(item, str):
        return await ctx.encode_prompt(item, req.max_tokens, param, req.add_special_tokens), item
    ids = list(item)
    if ids:
        ctx.check_length(len(ids), req.max_tokens, param)
    ctx.check_token_ids(ids, param)
    return ids, (await ctx.decode(ids) if req.echo else "")      # the text only serves echo


async def _engine_requests(ctx: ServingContext, req: CompletionRequest, engine_id: str):
    adapter = ctx.resolve_model(req.model)
    grammar = await compile_guided(ctx, guided_decoding(req))      # one compiled constraint for every prompt
    items = _items(req)
    prompts, requests = [], []
    for i, item in enumerate(items):
        if i and i % 64 == 0:
            await asyncio.sleep(0)                                 # a long prompt list: let other requests run
        param = "prompt" if len(items) == 1 else f"prompt.{i}"
        ids, text = await _prompt(ctx, req, item, param)
        prompts.append((ids, text))
        max_tokens = req.max_tokens if req.max_tokens is not None else ctx.default_max_tokens(len(ids), param)
        ctx.check_prompt(ids, max_tokens, param)
        requests.append(GenerationRequest(request_id=f"{engine_id}-{i}", prompt_token_ids=ids,
                                          sampling=await ctx.sampling_params(req, max_tokens), adapter=adapter,
                                          grammar=grammar))
    return adapter, prompts, requests


async def create_completion(ctx: ServingContext, req: CompletionRequest, http_request: Request):
    base_id, engine_id = request_ids(http_request, "cmpl")
    adapter, prompts, requests = await _engine_requests(ctx, req, engine_id)
    # the first output can be long in coming (queued, long prefill): a client that leaves meanwhile aborts it
    streams = await run_until_disconnect(http_request,
                                         open_streams(ctx.engine, requests, ctx.metrics, ctx.label(adapter)))
    model = req.model or ctx.served_name
    if req.stream:
        events = _stream(ctx, req, base_id, model, prompts, streams)
        return CancellingStreamingResponse(sse_events(streams, events), media_type="text/event-stream")
    return JSONResponse(await run_until_disconnect(http_request, _collect(ctx, req, base_id, model, prompts,
                                                                          streams)))


class _Choice:
    def __init__(self, index: int, text: str, logprobs: CompletionLogprobs | None):
        self.index, self.text, self.logprobs = index, text, logprobs
        self.finish_reason = None
        self.stop_reason = None
        self.num_tokens = 0


def _echo_part(ctx, req, ids, text, first) -> tuple[str, CompletionLogprobs | None]:
    """Echoed prompt text and, when asked, a logprobs object that already holds the prompt's entries."""
    logprobs = CompletionLogprobs(ctx) if req.logprobs is not None else None
    if not req.echo:
        return "", logprobs
    if logprobs is not None:
        prompt_lps = first.prompt_logprobs or [None] * len(ids)
        for token_id, lp in zip(ids, prompt_lps):
            logprobs.add(token_id, lp)
    return text, logprobs


async def _collect(ctx, req, base_id, model, prompts, streams) -> dict:
    choices: dict[int, _Choice] = {}
    try:
        for p, (ids, text) in enumerate(prompts):
            for s in range(req.n):
                echo, logprobs = _echo_part(ctx, req, ids, text, streams[p].first)
                choices[p * req.n + s] = _Choice(p * req.n + s, echo, logprobs)
        async for p, out in merge(streams):
            for d in out.deltas:
                choice = choices[p * req.n + d.index]
                choice.text += d.text
                choice.num_tokens += len(d.token_ids)
                if choice.logprobs is not None and d.logprobs:
                    for token_id, lp in zip(d.token_ids, d.logprobs):
                        choice.logprobs.add(token_id, lp)
                if d.finish_reason is not None:
                    choice.finish_reason, choice.stop_reason = d.finish_reason, d.stop_reason
    finally:
        await close_all(streams)
    ordered = [choices[i] for i in sorted(choices)]
    return {
        "id": base_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": c.index, "text": c.text,
                     "logprobs": c.logprobs.as_dict(c.text) if c.logprobs else None,
                     "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in ordered],
        "usage": usage(sum(len(ids) for ids, _ in prompts), sum(c.num_tokens for c in ordered),
                       _cached(streams)),
    }


async def _stream(ctx, req, base_id, model, prompts, streams):
    created = int(time.time())
    completion_tokens = 0

    def chunk(index, text, logprobs, finish_reason=None, stop_reason=None):
        return sse({"id": base_id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                 "finish_reason": finish_reason, "stop_reason": stop_reason}]})
    offsets: dict[int, int] = {}
    if req.echo:
        for p, (ids, text) in enumerate(prompts):
            for s in range(req.n):
                echo, logprobs = _echo_part(ctx, req, ids, text, streams[p].first)
                offsets[p * req.n + s] = len(echo)
                yield chunk(p * req.n + s, echo, logprobs.as_dict(echo) if logprobs else None)
    async for p, out in merge(streams):
        for d in out.deltas:
            index = p * req.n + d.index
            completion_tokens += len(d.token_ids)
            logprobs = None
            if req.logprobs is not None:
                lp = CompletionLogprobs(ctx)
                for token_id, tlp in zip(d.token_ids, d.logprobs or []):
                    lp.add(token_id, tlp)
                logprobs = lp.as_dict(d.text, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(d.text)
            if d.text or d.token_ids or d.finish_reason is not None:
                yield chunk(index, d.text, logprobs, d.finish_reason, d.stop_reason)
    if req.include_usage:
        yield sse({"id": base_id, "object": "text_completion", "created": created, "model": model,
                   "choices": [], "usage": usage(sum(len(ids) for ids, _ in prompts), completion_tokens,
                                                 _cached(streams))})


def _cached(streams) -> int:
    """Prompt tokens of these engine requests that the prefix cache supplied."""
    return sum(s.first.num_cached_tokens for s in streams if s.first is not None)
