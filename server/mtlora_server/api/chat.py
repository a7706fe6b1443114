"""POST /v1/chat/completions: messages rendered with the base tokenizer's chat template -> `chat.completion`.

Contract: the prompt is `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` encoded without
extra special tokens (the template adds its own); a template error is a 400 naming `messages`. Templating and
tokenisation run off the event loop once the messages are more than small (api.tokenization); a prompt longer
than the context is refused from its token count. Without
max_tokens / max_completion_tokens the completion may fill the remaining context. Streams send the assistant
role first, then content deltas, then a finish chunk per choice, an optional usage chunk and `data: [DONE]`.
The response id is `chatcmpl-<X-Request-Id>`; usage.prompt_tokens_details.cached_tokens counts the prompt tokens
the prefix cache supplied.
"""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse
from starlette.requests import Request

from mtlora.errors import InvalidRequestError
from mtlora_server.api.guided import compile_guided, guided_decoding
from mtlora_server.api.protocol import ChatCompletionRequest, ChatMessage
from mtlora_server.api.serving import ServingContext, chat_logprob_entries, request_ids, sse, usage
from mtlora_server.api.tools import ToolPlan, plan_tools, read_output, template_tools
from mtlora_server.api.streams import (
    CancellingStreamingResponse,
    close_all,
    merge,
    open_streams,
    run_until_disconnect,
    sse_events,
)
from mtlora_server.engine.types import GenerationRequest


def _text_size(value) -> int:
    """Characters of text in a rendered message (strings inside content parts included)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_text_size(v) for v in value)
    return 0


async def render_chat(ctx: ServingContext, messages: list[ChatMessage], add_generation_prompt: bool = True,
                      tools: list[dict] | None = None) -> str:
    rendered = [m.rendered() for m in messages]
    try:
        text = await ctx.tokens.render_chat(rendered, add_generation_prompt, _text_size(rendered) + _text_size(tools),
                                            tools)
    except Exception as exc:  # jinja TemplateError, no template at all, ...
        raise InvalidRequestError(f"the chat template rejected these messages: {exc}", param="messages") from None
    if not isinstance(text, str):
        raise InvalidRequestError("the chat template did not render to text", param="messages")
    return text


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, http_request: Request):
    base_id, engine_id = request_ids(http_request, "chatcmpl")
    adapter = ctx.resolve_model(req.model)
    max_tokens = req.requested_max_tokens
    args = ctx.args
    plan = plan_tools(req, args.tool_call_parser if args.enable_auto_tool_choice else None)
    guided = guided_decoding(req)
    if plan.guided is not None and guided is not None:
        raise InvalidRequestError(f"tool_choice {plan.mode!r} constrains the output itself; drop {guided.param}",
                                  param=guided.param)
    ids = await ctx.encode_prompt(await render_chat(ctx, req.messages, req.add_generation_prompt,
                                                    template_tools(req.tools)), max_tokens,
                                  "messages", add_special_tokens=req.add_special_tokens)
    if max_tokens is None:
        max_tokens = ctx.default_max_tokens(len(ids))
    ctx.check_prompt(ids, max_tokens, "messages")
    request = GenerationRequest(request_id=f"{engine_id}-0", prompt_token_ids=ids,
                                sampling=await ctx.sampling_params(req, max_tokens), adapter=adapter,
                                grammar=await compile_guided(ctx, plan.guided or guided))
    # the first output can be long in coming (queued, long prefill): a client that leaves meanwhile aborts it
    streams = await run_until_disconnect(http_request,
                                         open_streams(ctx.engine, [request], ctx.metrics, ctx.label(adapter)))
    model = req.model or ctx.served_name
    if req.stream:
        events = _stream(ctx, req, base_id, model, len(ids), streams, plan)
        return CancellingStreamingResponse(sse_events(streams, events), media_type="text/event-stream")
    return JSONResponse(await run_until_disconnect(http_request, _collect(ctx, req, base_id, model, len(ids),
                                                                          streams, plan)))


def _message(plan: ToolPlan, text: str, finish: str | None) -> tuple[dict, str | None]:
    """(assistant message, finish_reason) of a finished choice: tool calls read from the text under `plan`."""
    content, calls = read_output(plan, text) if plan.parses_output else (text, [])
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [c.as_dict() for c in calls]
        if finish == "stop" and plan.mode != "named":   # OpenAI: "stop" for a named choice, else "tool_calls"
            finish = "tool_calls"
    return message, finish


async def _collect(ctx, req, base_id, model, prompt_len, streams, plan: ToolPlan) -> dict:
    texts = [""] * req.n
    logprobs: list[list[dict]] = [[] for _ in range(req.n)]
    finish = [None] * req.n
    stop_reason = [None] * req.n
    num_tokens = 0
    top_n = req.top_logprobs or 0
    try:
        async for _, out in merge(streams):
            for d in out.deltas:
                texts[d.index] += d.text
                num_tokens += len(d.token_ids)
                if req.logprobs and d.logprobs:
                    logprobs[d.index].extend(chat_logprob_entries(ctx, d.logprobs, top_n))
                if d.finish_reason is not None:
                    finish[d.index], stop_reason[d.index] = d.finish_reason, d.stop_reason
    finally:
        await close_all(streams)
    choices = []
    for i in range(req.n):
        message, reason = _message(plan, texts[i], finish[i])
        choices.append({"index": i, "message": message, "logprobs": {"content": logprobs[i]} if req.logprobs else None,
                        "finish_reason": reason, "stop_reason": stop_reason[i]})
    return {"id": base_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_len, num_tokens, streams[0].first.num_cached_tokens)}


async def _stream(ctx, req, base_id, model, prompt_len, streams, plan: ToolPlan):
    created = int(time.time())
    top_n = req.top_logprobs or 0
    num_tokens = 0

    def chunk(choices, **extra):
        body = {"id": base_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices}
        if req.include_usage:
            body["usage"] = None
        body.update(extra)
        return sse(body)
    held = [""] * req.n
    for i in range(req.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    async for _, out in merge(streams):
        for d in out.deltas:
            num_tokens += len(d.token_ids)
            if not (d.text or d.finish_reason is not None or (req.logprobs and d.token_ids)):
                continue                 # tokens that decode to no text yet (a partial UTF-8 character)
            lps = {"content": chat_logprob_entries(ctx, d.logprobs or [], top_n)} if req.logprobs else None
            delta, reason = ({"content": d.text} if d.text else {}), d.finish_reason
            if plan.parses_output:       # tool calls: the choice's text is read once it has finished
                held[d.index] += d.text
                delta = {}
                if d.finish_reason is not None:
                    message, reason = _message(plan, held[d.index], d.finish_reason)
                    delta = {k: v for k, v in message.items() if k != "role" and v is not None}
                    for k, call in enumerate(delta.get("tool_calls", [])):
                        call["index"] = k
            yield chunk([{"index": d.index, "delta": delta, "logprobs": lps, "finish_reason": reason,
                          "stop_reason": d.stop_reason}])
    if req.include_usage:
        yield chunk([], usage=usage(prompt_len, num_tokens, streams[0].first.num_cached_tokens))
