"""`EngineServer`: uvicorn's server with mtlora's graceful shutdown and an exit when the engine dies.

Contract:
- On SIGTERM or SIGINT uvicorn stops its main loop and calls `shutdown()`; here that first drains the engine
  (`Engine.drain(shutdown_timeout)`) while the listener stays open: new generation requests get 503 in the error
  schema, /health answers 503, running requests may finish until the deadline, and the rest are then aborted, so
  every open stream ends with a chunk carrying finish_reason ("abort" for the aborted ones) and `data: [DONE]`, and
  every non-streaming request gets its JSON answer. Then uvicorn's own shutdown runs: it closes the listener (new
  connections are refused from then on), waits up to `timeout_graceful_shutdown` seconds for the responses to be
  written, and the app's lifespan stops the engine. A second SIGINT cuts the drain short (uvicorn's force exit).
- uvicorn re-raises the signal that stopped it once it has restored the previous handlers (for programs that embed
  it); the drain has answered that signal, so `serve()` installs no-op handlers for the re-raise and the process
  ends with `main`'s exit status (0 after a graceful shutdown).
- When the engine dies (repeated step failures or a crash: `engine.dead`), the server stops at its next tick
  (0.1 s) and `engine_died` is set; `mtlora-serve` then exits with `EXIT_ENGINE_DIED` so a supervisor restarts it.
"""

from __future__ import annotations

import logging
import signal
import threading

import uvicorn

logger = logging.getLogger(__name__)

EXIT_ENGINE_DIED = 3
_HANDLED = (signal.SIGINT, signal.SIGTERM)


class EngineServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine, shutdown_timeout: float):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self.engine_died = False

    async def serve(self, sockets=None) -> None:
        if threading.current_thread() is not threading.main_thread():
            return await super().serve(sockets)
        previous = {sig: signal.signal(sig, _answered) for sig in _HANDLED}
        try:
            await super().serve(sockets)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def on_tick(self, counter: int) -> bool:
        if self.engine.dead:
            if not self.engine_died:
                logger.critical("the engine is dead (%s); stopping the server so that it can be restarted",
                                self.engine.health_problem())
            self.engine_died = True
            return True
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None) -> None:
        if not self.engine_died:
            aborted = await self.engine.drain(self.shutdown_timeout, give_up=lambda: self.force_exit)
            logger.info("drained the engine (%d request(s) aborted at the deadline)", aborted)
        await super().shutdown(sockets)


def _answered(sig: int, frame) -> None:
    """The re-raised stop signal: the graceful shutdown already handled it."""
    logger.debug("signal %d handled by the graceful shutdown", sig)
