"""`Engine`: the asyncio-facing serving engine implementing `types.EngineClient`.

Contract (see types.py for the generate() protocol):
- `Engine.from_args(EngineArgs)` builds an `EngineCore` (model loaded once) inside the engine's step thread and
  returns when it is ready (a load error is raised to the caller). `await start()` lets the step loop run;
  `generate()` also starts it lazily.
- Every torch op of the engine runs in that one thread, loading included, and other threads do their torch work
  in short-lived threads (`run_in_fresh_thread`), single-threaded (`torch_threads.serial_torch`; the step thread
  checks its own count after every step and sets it back if anything changed it: `KeepThreadCount`). Why: torch's
  CPU ops run on libgomp, which keeps one pool of OpenMP workers per thread that ever ran a parallel op; once the
  pools hold more workers than there are CPUs, libgomp stops letting its workers spin between parallel regions,
  and every small op then pays a futex wake-up. Measured on 2 cores, bf16, the bench workload: steps took 1.4x
  as long when the model had been loaded by another thread than when one thread did everything (17.0 s vs
  12.1 s of `EngineCore.step`).
- The step loop runs in ONE background thread: it drains a command inbox (add/abort requests, adapter installs)
  between steps, runs `core.step()` while there is work and sleeps on an event otherwise (also when a step ran
  nothing because every queued request waits for its adapter: a finished adapter load wakes it). The model forward never
  runs on the asyncio loop, which stays responsive. Outputs reach per-request `asyncio.Queue`s through
  `loop.call_soon_threadsafe`.
- A consumer that stops iterating (task cancelled, `aclose()`) aborts its request; the abort is the first thing
  the step thread does after the current step, which frees the KV blocks at once.
- Fault isolation (see core.py): a request whose own work fails in a step gets `RequestFailedError` (500) and
  the engine steps on. A failed step (batched forward) fails that step's requests and the loop continues;
  `MAX_CONSECUTIVE_FAILED_STEPS` failed steps in a row (no successful step between) declare the engine dead.
- If the step thread dies (that, or any crash), every waiting consumer gets `EngineDeadError` (503), `dead` and
  `health_problem()` say so and `is_healthy()` turns False; `mtlora-serve` then exits non-zero.
- `drain(timeout)` (graceful shutdown): new `generate()` calls raise `EngineDrainingError` (503) and the engine
  is unhealthy; running requests may finish until the deadline, then all are aborted and their consumers get a
  final output with finish_reason "abort".
- Adapters: `load_adapter` reads and validates the files in a fresh thread, then registers the adapter in the step
  thread (resident if a slot is free; a load never fails for lack of a slot); `list_adapters()` lists every
  registered adapter. Loads of non-resident adapters that requests wait for run in the registry's worker threads.
- `stats()` returns the snapshot the step thread publishes after each step (no cross-thread reads of live state).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from typing import AsyncIterator, Callable

from mtlora.errors import EngineDeadError, EngineDrainingError

from .args import EngineArgs
from .core import EngineCore
from .torch_threads import KeepThreadCount, serial_torch
from .types import AdapterInfo, EngineStats, GenerationRequest, RequestOutput

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILED_STEPS = 3      # this many failed steps in a row (no successful one between) kill the engine
DRAIN_POLL_S = 0.05                   # how often drain() looks whether the requests in flight have finished
IDLE_WAIT_S = 0.05                    # longest sleep of a step loop whose queue only waits for adapter loads
ABORT_GRACE_S = 5.0                   # how long drain() waits for consumers to take their final "abort" output


class Engine:
    def __init__(self, core: EngineCore):
        self.core = core
        self.base_model_name = core.base_model_name
        self.max_model_len = core.max_model_len
        # The model's embedding rows bound valid prompt token ids (the tokenizer may know fewer ids).
        self.vocab_size = core.model_config.vocab_size
        self.tokenizer = core.tokenizer
        self.grammar = core.grammar                       # structured outputs: compiled by the API, off the loop
        self._inbox: deque[tuple[Callable, asyncio.Future | None]] = deque()
        self._wake = threading.Event()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._draining = False                            # drain() began: new requests are refused
        self._stats = core.stats()
        self._go: threading.Event | None = None           # set when from_args pre-started the step thread
        core.registry.notify = self._wake.set             # an adapter load finished: step again

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
        return self.health_problem() is None

    def health_problem(self) -> str | None:
        """Why the engine cannot serve new requests (dead, draining, stopped), or None when it can."""
        if self.dead:
            return str(self._dead_error())
        if self._draining or self._stopping:
            return "the server is shutting down"
        return None

    @property
    def dead(self) -> bool:
        """The step loop died (repeated step failures or a crash): nothing will be served any more."""
        return self._dead is not None or (self._thread is not None and not self._thread.is_alive()
                                          and not self._stopping)

    def _dead_error(self) -> EngineDeadError:
        if isinstance(self._dead, EngineDeadError):
            return EngineDeadError(f"the engine died: {self._dead}")
        return EngineDeadError(f"the engine loop died: {self._dead!r}")

    async def drain(self, timeout: float, give_up: Callable[[], bool] = lambda: False) -> int:
        """Graceful stop: refuse new requests (EngineDrainingError, 503), let the running ones finish for up to
        `timeout` seconds (or until `give_up()`), then abort the rest: their consumers get a final output with
        finish_reason "abort". Waits (at most ABORT_GRACE_S) for the consumers to take it; returns how many
        requests were aborted."""
        self._draining = True
        loop = asyncio.get_running_loop()
        log.info("draining: %d request(s) in flight, deadline %.1f s", len(self._queues), timeout)
        deadline = loop.time() + timeout
        while self._queues and not self.dead and loop.time() < deadline and not give_up():
            await asyncio.sleep(DRAIN_POLL_S)
        if not self._queues or self.dead or self._loop is None:
            return 0
        try:
            outputs = await self._submit(self.core.abort_all)
        except EngineDeadError:                           # it died meanwhile: its consumers got the error
            return 0
        self._deliver(outputs)
        log.warning("shutdown deadline: aborted %d request(s) still running", len(outputs))
        deadline = loop.time() + ABORT_GRACE_S
        while self._queues and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        return len(outputs)

    # -- step thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        failed_steps = 0
        threads = KeepThreadCount()                       # this thread's team, kept (torch_threads)
        try:
            while not self._stopping:
                self._drain_inbox()
                if self.core.has_work():
                    failed_steps = self._step(failed_steps)
                    threads.check()
                    if self.core.last_step_idle:          # everything waits for an adapter load
                        self._wake.wait(IDLE_WAIT_S)
                        self._wake.clear()
                else:
                    self._wake.wait()
                    self._wake.clear()
        except BaseException as exc:  # noqa: BLE001 - any crash must reach the consumers, not vanish
            log.critical("engine step loop died: %r", exc, exc_info=exc)
            self._dead = exc
            self._loop.call_soon_threadsafe(self._fail_all, exc)

    def _step(self, failed_steps: int) -> int:
        """One core step; returns the number of consecutive failed steps so far (raises once it is too many)."""
        outputs: list[RequestOutput] = []
        try:
            outputs = self.core.step()
            failed_steps = 0
        except Exception as exc:                          # the step's requests failed; the others carry on
            failed_steps += 1
            log.error("engine step failed (%d in a row; the engine dies at %d): %s: %s", failed_steps,
                      MAX_CONSECUTIVE_FAILED_STEPS, type(exc).__name__, exc, exc_info=exc)
            if failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS:
                raise EngineDeadError(f"{failed_steps} engine steps failed in a row, the last with "
                                      f"{type(exc).__name__}: {exc}") from exc
        finally:
            failures = self.core.take_failures()
            self._stats = self.core.stats()
            if outputs or failures:
                self._loop.call_soon_threadsafe(self._deliver, outputs, failures)
        return failed_steps

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

    def _deliver(self, outputs: list[RequestOutput], failures: dict[str, BaseException] | None = None) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
        for rid, error in (failures or {}).items():
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(error)

    def _fail_all(self, exc: BaseException) -> None:
        err = self._dead_error()
        for q in self._queues.values():
            q.put_nowait(err)
        while self._inbox:
            _, fut = self._inbox.popleft()
            if fut is not None and not fut.done():
                fut.set_exception(err)

    def _submit(self, fn: Callable, want_result: bool = True) -> asyncio.Future | None:
        if self._dead is not None:
            raise self._dead_error()
        fut = self._loop.create_future() if want_result else None
        self._inbox.append((fn, fut))
        self._wake.set()
        return fut

    # -- EngineClient ----------------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if self._draining:
            raise EngineDrainingError("the server is shutting down and accepts no new requests; retry on "
                                      "another replica or after the restart")
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
        return [r.info for r in list(self.core.registry.records.values())]     # registered, resident or not

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        await self.start()
        # File work off both loops, in a thread that ends with it (module docstring: libgomp pools).
        config, tensors, prepared = await run_in_fresh_thread(self._read_prepared, path)
        return await self._submit(lambda: self.core.install_adapter(name, config, tensors, path, prepared))

    def _read_prepared(self, path: str) -> tuple:
        """File read + validation + the kernel-ready data (`AdapterSlots.prepare`): the work off the step thread."""
        config, tensors = self.core.read_adapter(path)
        return config, tensors, self.core.slots.prepare(config, tensors)

    async def unload_adapter(self, name: str) -> None:
        await self.start()
        await self._submit(lambda: self.core.remove_adapter(name))

    def stats(self) -> EngineStats:
        return self._stats


async def run_in_fresh_thread(fn: Callable, *args):
    """`fn(*args)` in a new thread that exits afterwards, its torch ops single-threaded (`serial_torch`: no second
    OpenMP team beside the step thread's; unlike `asyncio.to_thread`, whose pool threads live on)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def target() -> None:
        try:
            with serial_torch():                          # no second OpenMP team beside the step thread's
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
