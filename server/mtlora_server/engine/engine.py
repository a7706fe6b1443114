"""`Engine`: the asyncio-facing serving engine implementing `types.EngineClient`.

Contract (see types.py for the generate() protocol):
- `Engine.from_args(EngineArgs)` builds an `EngineCore` (model loaded once) inside the engine's step thread and
  returns when it is ready (a load error is raised to the caller). `await start()` lets the step loop run;
  `generate()` also starts it lazily.
- Every torch op of the engine runs in that one thread, loading included, and other threads do their torch work
  in short-lived threads (`run_in_fresh_thread`). Why: torch's CPU ops run on libgomp, which keeps one pool of
  OpenMP workers per thread that ever ran a parallel op; once the pools hold more workers than there are CPUs,
  libgomp stops letting its workers spin between parallel regions, and every small op then pays a futex
  wake-up. Measured on 2 cores, bf16, the bench workload: steps took 1.4x as long when the model had been loaded
  by another thread than when one thread did everything (17.0 s vs 12.1 s of `EngineCore.step`).
- The step loop runs in ONE background thread: it drains a command inbox (add/abort requests, adapter installs)
  between steps, runs `core.step()` while there is work and sleeps on an event otherwise. The model forward never
  runs on the asyncio loop, which stays responsive. Outputs reach per-request `asyncio.Queue`s through
  `loop.call_soon_threadsafe`.
- A consumer that stops iterating (task cancelled, `aclose()`) aborts its request; the abort is the first thing
  the step thread does after the current step, which frees the KV blocks at once.
- If the step thread dies, every waiting consumer gets `EngineDeadError` and `is_healthy()` turns False.
- `stats()` returns the snapshot the step thread publishes after each step (no cross-thread reads of live state).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from typing import AsyncIterator, Callable

from mtlora.errors import EngineDeadError

from .args import EngineArgs
from .core import EngineCore
from .types import AdapterInfo, EngineStats, GenerationRequest, RequestOutput

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, core: EngineCore):
        self.core = core
        self.base_model_name = core.base_model_name
        self.max_model_len = core.max_model_len
        # The model's embedding rows bound valid prompt token ids (the tokenizer may know fewer ids).
        self.vocab_size = core.model_config.vocab_size
        self.tokenizer = core.tokenizer
        self._inbox: deque[tuple[Callable, asyncio.Future | None]] = deque()
        self._wake = threading.Event()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._stats = core.stats()
        self._go: threading.Event | None = None           # set when from_args pre-started the step thread

    @classmethod
    def from_args(cls, args: EngineArgs) -> "Engine":
        """Load the model in the thread that will step it (see the module docstring) and wait until it is ready."""
        built: queue.Queue = queue.Queue(maxsize=1)
        go = threading.Event()

        def thread_main() -> None:
            try:
                core = EngineCore(args)
            except BaseException as exc:  # noqa: BLE001 - the caller of from_args gets it
                built.put(exc)
                return
            engine = cls(core)
            engine._go = go
            built.put(engine)
            go.wait()                                     # start() has set the loop (or shutdown() came first)
            engine._run()

        thread = threading.Thread(target=thread_main, name="mtlora-engine", daemon=True)
        thread.start()
        result = built.get()
        if isinstance(result, BaseException):
            raise result
        result._thread = thread
        return result

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._go is not None:                          # the step thread exists: it built the core
            self._go.set()
            return
        self._thread = threading.Thread(target=self._run, name="mtlora-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._go is not None:
            self._go.set()                                # a never-started step thread exits at once
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        for q in list(self._queues.values()):
            q.put_nowait(EngineDeadError("the engine is shutting down"))

    def is_healthy(self) -> bool:
        return self._dead is None and not self._stopping and (self._thread is None or self._thread.is_alive())

    # -- step thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if self.core.has_work():
                    outputs = self.core.step()
                    self._stats = self.core.stats()
                    if outputs:
                        self._loop.call_soon_threadsafe(self._deliver, outputs)
                else:
                    self._wake.wait()
                    self._wake.clear()
        except BaseException as exc:  # noqa: BLE001 - any crash must reach the consumers, not vanish
            log.exception("engine step loop died")
            self._dead = exc
            self._loop.call_soon_threadsafe(self._fail_all, exc)

    def _drain_inbox(self) -> None:
        while self._inbox:
            fn, fut = self._inbox.popleft()
            try:
                result, error = fn(), None
            except Exception as exc:  # errors belong to the caller, the engine keeps serving
                result, error = None, exc
            self._stats = self.core.stats()
            if fut is not None:
                self._loop.call_soon_threadsafe(_settle, fut, result, error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _fail_all(self, exc: BaseException) -> None:
        err = EngineDeadError(f"the engine loop died: {exc!r}")
        for q in self._queues.values():
            q.put_nowait(err)
        while self._inbox:
            _, fut = self._inbox.popleft()
            if fut is not None and not fut.done():
                fut.set_exception(err)

    def _submit(self, fn: Callable, want_result: bool = True) -> asyncio.Future | None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop died: {self._dead!r}")
        fut = self._loop.create_future() if want_result else None
        self._inbox.append((fn, fut))
        self._wake.set()
        return fut

    # -- EngineClient ----------------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        await self.start()
        rid = request.request_id
        if rid in self._queues:
            from mtlora.errors import InvalidRequestError
            raise InvalidRequestError(f"request id {rid!r} is already in use", param="request_id")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        finished = False
        try:
            await self._submit(lambda: self.core.add_request(request))
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(rid, None)
            if not finished and self._dead is None and not self._stopping:
                self._submit(lambda: self.core.abort(rid), want_result=False)

    async def abort(self, request_id: str) -> None:
        out = await self._submit(lambda: self.core.abort(request_id))
        if out is not None:
            self._deliver([out])

    def list_adapters(self) -> list[AdapterInfo]:
        return [a.info for a in list(self.core.adapters.values())]

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        await self.start()
        # File work off both loops, in a thread that ends with it (module docstring: libgomp pools).
        config, tensors = await run_in_fresh_thread(self.core.read_adapter, path)
        return await self._submit(lambda: self.core.install_adapter(name, config, tensors, path))

    async def unload_adapter(self, name: str) -> None:
        await self.start()
        await self._submit(lambda: self.core.remove_adapter(name))

    def stats(self) -> EngineStats:
        return self._stats


async def run_in_fresh_thread(fn: Callable, *args):
    """`fn(*args)` in a new thread that exits afterwards, so an OpenMP pool its torch ops create goes with it
    (unlike `asyncio.to_thread`, whose pool threads live on)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def target() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting caller
            result, error = None, exc
        loop.call_soon_threadsafe(_settle, fut, result, error)

    threading.Thread(target=target, name="mtlora-io", daemon=True).start()
    return await fut


def _settle(fut: asyncio.Future, result, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
