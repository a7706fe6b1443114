"""Fault injection for tests: make the engine raise at a chosen point for chosen requests.

Contract:
- The engine calls `check(site, requests)` at its fault sites, with the `GenerationRequest`s concerned:
  "forward" (before the batched model forward, every request with a chunk in the step), "sample" (in the batched
  sampling of the step's sampling rows, after the random draws; when it raises, the engine retries row by row, so
  the hook sees single rows then) and "detokenize" (before one sampled token is recorded and detokenised, one request).
- With no fault armed, `check` returns at once (one dict test); nothing here is reachable from HTTP input.
- `inject(site, when=None, times=None, error=None) -> Fault` arms a fault: it raises `error` (default
  `InjectedFault`) whenever `when(request)` holds for one of the requests (None: any request), at most `times`
  times (None: every time). `clear()` disarms everything. Tests own the registry; they clear it afterwards.
- `arm_from_env()` (called once by `mtlora-serve` at start-up) arms the sites listed in the environment variable
  `MTLORA_TEST_FAULTS` (comma-separated, e.g. "forward"): a testing hook for real-process tests, every request.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable

log = logging.getLogger(__name__)

SITES = ("forward", "sample", "detokenize")
ENV_VAR = "MTLORA_TEST_FAULTS"


class InjectedFault(RuntimeError):
    """The default error an armed fault raises."""


@dataclass
class Fault:
    site: str
    when: Callable | None = None          # predicate on a GenerationRequest; None: any request
    times: int | None = None              # remaining firings; None: unlimited
    error: BaseException | None = None
    fired: int = 0


_faults: dict[str, list[Fault]] = {}


def inject(site: str, when: Callable | None = None, times: int | None = None,
           error: BaseException | None = None) -> Fault:
    if site not in SITES:
        raise ValueError(f"unknown fault site {site!r}; expected one of {', '.join(SITES)}")
    fault = Fault(site, when, times, error)
    _faults.setdefault(site, []).append(fault)
    return fault


def clear() -> None:
    _faults.clear()


def check(site: str, requests: Iterable) -> None:
    """Raise the armed fault of `site` that matches one of `requests` (the engine's fault sites call this)."""
    if not _faults:
        return
    for fault in _faults.get(site, ()):
        if fault.times is not None and fault.fired >= fault.times:
            continue
        hit = next((r for r in requests if fault.when is None or fault.when(r)), None)
        if hit is not None:
            fault.fired += 1
            raise fault.error or InjectedFault(f"injected fault at {site} for request {hit.request_id}")


def arm_from_env() -> None:
    spec = os.environ.get(ENV_VAR, "").strip()
    for site in filter(None, (s.strip() for s in spec.split(","))):
        try:
            inject(site)
        except ValueError as exc:
            raise ValueError(f"{ENV_VAR}={spec!r}: {exc}") from None
        log.warning("testing hook %s: every %s step raises an injected fault", ENV_VAR, site)
