"""Running engine requests from a route: start, observe, merge, cancel.

Contract:
- `open_streams(engine, requests, ...)` starts every request and waits for each one's first `RequestOutput`, so
  bad input (unknown adapter, context too long, queue full) surfaces as an exception *before* any response byte is
  sent; on such an error the already-started requests are closed (aborted) again.
- An `EngineStream` yields the request's outputs, feeds the metrics (TTFT, inter-token latency, queue time,
  end-to-end latency of requests the engine finished, token and finish counters) and, on `close()`, closes the
  engine iterator and aborts the request unless it finished. `close()` is shielded from cancellation so a client disconnect still frees the request's KV memory. A request the engine
  refused at admission (queue full: 429, bad input) never ran, so it is not counted as finish_reason "abort";
  queue-full refusals count in `mtlora:requests_rejected_total{reason="queue_full"}`.
- `merge(streams)` interleaves several streams as `(stream index, output)` in arrival order.
- `sse_events(streams, events)` frames a route's SSE body: the route's events, then `data: [DONE]`; an exception
  mid-stream becomes an in-band error event before `[DONE]`; the streams are always closed at the end.
- `run_until_disconnect(request, coro)` runs a handler step and cancels it when the client goes away. Routes wrap
  `open_streams` in it too: the first output may wait behind a full batch or a long prefill, and a client that
  times out meanwhile must not leave its request queued (the MMLU harness's 120 s time-outs piled up hundreds).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse

from mtlora.errors import EngineOverloadedError
from mtlora_server.api.errors import error_from_exception
from mtlora_server.api.metrics import Metrics
from mtlora_server.api.serving import DONE, sse
from mtlora_server.engine.types import GenerationRequest, RequestOutput

logger = logging.getLogger(__name__)


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


class CancellingStreamingResponse(StreamingResponse):
    """A StreamingResponse that stops its body iterator as soon as the client disconnects.

    Starlette, under ASGI spec 2.4 servers, only notices a disconnect at the next failed send and leaves closing the
    iterator to the garbage collector; here the disconnect cancels the stream at once and the iterator is closed
    explicitly, so the engine request is aborted and its KV blocks freed without waiting for another token.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:          # the server reports the client as gone
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


class EngineStream:
    """One engine request in flight; iterate it once."""

    def __init__(self, engine, request: GenerationRequest, metrics: Metrics, adapter_label: str):
        self.engine = engine
        self.request = request
        self.metrics = metrics
        self.label = adapter_label
        self.first: RequestOutput | None = None
        self.finished = False
        self.refused = False              # the engine refused it at admission: it never ran
        self._gen = None
        self._last_token_time: float | None = None
        self._finished_seqs = 0

    async def start(self) -> RequestOutput:
        try:
            gen = self.engine.generate(self.request)
            if inspect.isawaitable(gen):    # an engine may implement generate as a coroutine returning the iterator
                gen = await gen
            self._gen = gen
            self.first = await gen.__anext__()
        except EngineOverloadedError:
            self.refused = True
            self.metrics.rejected.labels(self.label, "queue_full").inc()
            raise
        except Exception:                   # bad input, dead engine: refused before it ran (not cancellation)
            self.refused = True
            raise
        self.metrics.prompt_tokens.labels(self.label).inc(len(self.request.prompt_token_ids))
        if self.first.queue_time is not None:
            self.metrics.queue_time.labels(self.label).observe(self.first.queue_time)
        self._observe(self.first)
        return self.first

    def _observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        new_tokens = sum(len(d.token_ids) for d in out.deltas)
        if new_tokens:
            if self._last_token_time is None:
                self.metrics.ttft.labels(self.label).observe(max(0.0, now - self.request.arrival_time))
            else:
                self.metrics.itl.labels(self.label).observe(now - self._last_token_time)
            self._last_token_time = now
            self.metrics.generation_tokens.labels(self.label).inc(new_tokens)
        for delta in out.deltas:
            if delta.finish_reason is not None:
                self._finished_seqs += 1
                self.metrics.requests.labels(self.label, delta.finish_reason).inc()
        if out.finished:
            self.finished = True
            self.metrics.e2e.labels(self.label).observe(max(0.0, now - self.request.arrival_time))

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        assert self.first is not None, "start() first"
        yield self.first
        if self.first.finished:
            return
        async for out in self._gen:
            self._observe(out)
            yield out
            if out.finished:
                return

    async def close(self) -> None:
        """Close the engine iterator; abort the request if it did not finish (client disconnect, error)."""
        with anyio.CancelScope(shield=True):
            if self._gen is not None and hasattr(self._gen, "aclose"):
                try:
                    await self._gen.aclose()
                except Exception:
                    logger.exception("closing engine stream %s failed", self.request.request_id)
            if not self.finished:
                unfinished = 0 if self.refused else self.request.sampling.n - self._finished_seqs
                if unfinished > 0:       # client went away or the stream failed: these sequences were aborted
                    self.metrics.requests.labels(self.label, "abort").inc(unfinished)
                try:
                    await self.engine.abort(self.request.request_id)
                except Exception:
                    logger.exception("aborting request %s failed", self.request.request_id)


async def open_streams(engine, requests: list[GenerationRequest], metrics: Metrics,
                       adapter_label: str) -> list[EngineStream]:
    """Submit every request at once (a batch of prompts is scheduled together, not one first token after another)
    and wait for each first output; if any is refused, every stream is closed (aborted) and the first error, in
    request order, is raised."""
    streams = [EngineStream(engine, req, metrics, adapter_label) for req in requests]
    try:
        results = await asyncio.gather(*(s.start() for s in streams), return_exceptions=True)
    except BaseException:                   # cancelled (the client left): gather cancelled the starts
        await close_all(streams)
        raise
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await close_all(streams)
        raise errors[0]
    return streams


async def close_all(streams: list[EngineStream]) -> None:
    for stream in streams:
        await stream.close()


async def sse_events(streams: list[EngineStream], events: AsyncIterator[str]) -> AsyncIterator[str]:
    """`events`, then `data: [DONE]`; on an engine failure mid-stream an error event first. Closes `streams`."""
    try:
        async for event in events:
            yield event
        yield DONE
    except Exception as exc:  # the engine failed mid-stream: tell the client in-band, then end the stream
        yield sse(error_from_exception(exc)[1])
        yield DONE
    finally:
        await events.aclose()
        await close_all(streams)


async def merge(streams: list[EngineStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave streams in arrival order. One stream is iterated directly (the common case)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    iters = [s.__aiter__() for s in streams]
    pending = {asyncio.ensure_future(it.__anext__()): i for i, it in enumerate(iters)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    out = fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(iters[i].__anext__())] = i
                yield i, out
    finally:
        with anyio.CancelScope(shield=True):
            for fut in pending:
                fut.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for it in iters:
                await it.aclose()


async def run_until_disconnect(request: Request, coro):
    """Await `coro`; if the client disconnects first, cancel it (its finally blocks abort the engine requests)."""
    task = asyncio.ensure_future(coro)

    async def wait_disconnect():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task in done:
        return task.result()
    try:
        await task
    except asyncio.CancelledError:
        pass
    raise ClientDisconnected()
