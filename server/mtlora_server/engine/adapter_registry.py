"""Registered vs resident adapters: any number registered, at most `num_slots` resident in device slots.

Contract:
- `register(name, path, config, info, loaded=None)` makes an adapter servable (listed, requests accepted);
  `unregister(name)` forgets it (the caller checks that no request uses it and clears its slot). Registration
  reads no tensors unless `loaded` (already read and validated) is given; that copy goes into the host cache.
  A copy registered with no files behind it (`path` not a directory) is held in memory for good.
- Residency is decided in `advance(live)`, called by the engine core at the start of every step with every
  unfinished sequence (waiting and running; `Sequence.adapter_name`). For each adapter that a live sequence
  needs but that is not resident, first come first served (oldest sequence first):
  - its validated tensors come from a finished disk load or the host cache (a hit), else a disk load is started
    in a short-lived worker thread (`read(path)`: file read + full validation; at most max(2, num_slots)
    loads or loaded-but-unplaced adapters at a time), and the sequence keeps waiting;
  - it gets a free slot, else the slot of the least recently used resident adapter with no pinned sequence
    (`install(name, slot, loaded)` / `evict(name, slot)` are the core's callbacks: the slot copy happens here, in
    the step thread, between steps). A sequence pins its adapter while it lives if it arrived before the adapter
    was chosen to leave, so an adapter brought in serves every request that was waiting for it before it can go,
    and one step never needs more adapters than slots (every sequence in a step has its adapter resident).
  - when no slot can be freed, the least recently used resident adapter that is not draining yet is marked
    draining: sequences for it that arrive from then on are not admitted (`admissible` is False) and do not pin
    it, so it leaves once its earlier work is done. This bounds how long a cold adapter waits under steady load.
- A failed disk load marks the adapter broken with the error text (`error_of`): it is not retried (until it is
  unregistered and registered again); `advance` returns the broken adapters that live sequences wait for, so the
  core can fail exactly those requests.
- `admissible(seq)` is the scheduler's admission hook: True (and the sequence's slot and prefix-cache salt set)
  when its adapter is resident and not draining for it; otherwise it registers the demand and returns False.
- Prefix-cache salt: every read from disk (or weights handed over by a dynamic load) gets a new uid; a copy kept
  in the host cache keeps its uid, so an adapter that becomes resident again from the host cache reuses the K/V
  blocks it computed before (the weights are the same tensors), while a re-read from disk never does (the files
  may have changed).
- The host cache is an LRU of validated tensors bounded by `cache_bytes` (0: off); on CUDA its tensors are pinned
  so the slot copy is a fast host-to-device transfer. With a `prepare(config, tensors)` callback, every read also
  derives the kernel-ready data (`LoadedAdapter.prepared`, counted in the cache's bytes) in the same worker, so an
  install from a read or from the cache builds nothing on the step thread. `preload()` (start-up,
  `--preload-adapters`) reads the registered adapters without a slot into it, in registration order, while they
  fit. Counters (`counters`) feed the metrics; `wait_seconds` holds the times sequences waited for their adapter,
  for the histogram.
- Thread-safety: only the step thread calls these methods, except that worker threads hand results over through
  `_done` (locked) and then call `notify()` (the engine wakes its step loop); `wait_for_load(timeout)` blocks
  until a load finished (tests that step a bare core).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mtlora.config import AdapterConfig
from mtlora.errors import RequestFailedError

from .torch_threads import serial_torch
from .types import AdapterCounters, AdapterInfo

log = logging.getLogger(__name__)

MIN_LOAD_AHEAD = 2                  # disk loads in flight + loaded adapters waiting for a slot: max(this, slots)
NEVER = float("inf")


@dataclass
class LoadedAdapter:
    """Validated tensors of one adapter, ready for a slot copy."""

    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    uid: int                                              # prefix-cache salt of this copy of the weights
    prepared: Any = None                                  # kernel-ready data derived from tensors (`prepare`)

    @property
    def nbytes(self) -> int:
        extra = getattr(self.prepared, "nbytes", 0)
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) + extra


@dataclass
class AdapterRecord:
    name: str
    path: str
    config: AdapterConfig
    info: AdapterInfo
    generation: int                                       # registration number: stale loads are dropped
    slot: int | None = None                               # resident slot
    uid: int = 0                                          # salt of the resident weights
    drain_from: float = NEVER                             # sequences with seq_id >= this are not admitted
    error: str | None = None                              # a failed load: the adapter is broken
    loading: bool = False
    last_used: int = 0                                    # LRU clock of the residency


class HostCache:
    """LRU of validated adapter tensors in host memory, at most `limit` bytes (pinned on CUDA)."""

    def __init__(self, limit: int, pin: bool):
        self.limit, self.pin = limit, pin
        self._items: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self.bytes = 0

    def get(self, name: str) -> LoadedAdapter | None:
        item = self._items.get(name)
        if item is not None:
            self._items.move_to_end(name)
        return item

    def put(self, name: str, item: LoadedAdapter) -> None:
        self.drop(name)
        if item.nbytes > self.limit:
            return
        self._items[name] = item
        self.bytes += item.nbytes
        while self.bytes > self.limit:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes

    def drop(self, name: str) -> None:
        old = self._items.pop(name, None)
        if old is not None:
            self.bytes -= old.nbytes

    def __contains__(self, name: str) -> bool:
        return name in self._items


def scan_adapter_dir(root: str | Path) -> dict[str, str]:
    """Every subfolder of `root` holding an adapter_config.json, named after the folder (sorted by name)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    return {p.name: str(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "adapter_config.json").is_file()}


class AdapterRegistry:
    def __init__(self, num_slots: int, read: Callable[[str], tuple], install: Callable[[str, int, LoadedAdapter], None],
                 evict: Callable[[str, int], None], cache_bytes: int, pin: bool = False,
                 prepare: Callable[[AdapterConfig, dict], Any] | None = None):
        self.num_slots = num_slots
        self.load_ahead = max(MIN_LOAD_AHEAD, num_slots)   # enough to refill every slot that frees at once
        self._read, self._install, self._evict, self._prepare = read, install, evict, prepare
        self.records: dict[str, AdapterRecord] = {}
        self.cache = HostCache(cache_bytes, pin)
        self.counters = AdapterCounters()
        self.notify: Callable[[], None] = lambda: None
        self._ready: dict[str, LoadedAdapter] = {}        # loaded from disk, waiting for a slot
        self._held: dict[str, LoadedAdapter] = {}         # registered from memory (no files): always kept
        self._done: list[tuple[str, int, LoadedAdapter | None, str | None]] = []
        self._lock = threading.Lock()
        self._loaded_event = threading.Event()
        self._wait_start: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # seq -> monotonic time it
        #                                               began waiting for its adapter (forgotten with the sequence)
        self._clock = 0
        self._next_uid = 1
        self._next_generation = 1

    # -- registration --------------------------------------------------------------------------------------------
    def new_uid(self) -> int:
        self._next_uid += 1
        return self._next_uid - 1

    def register(self, name: str, path: str, config: AdapterConfig, info: AdapterInfo,
                 loaded: LoadedAdapter | None = None) -> AdapterRecord:
        rec = AdapterRecord(name, str(path), config, info, generation=self._next_generation)
        self._next_generation += 1
        self.records[name] = rec
        if loaded is not None:
            self.cache.put(name, loaded)
            if not Path(path).is_dir():                   # no files to read it again from: keep this copy
                self._held[name] = loaded
        return rec

    def unregister(self, name: str) -> AdapterRecord:
        rec = self.records.pop(name)
        self._ready.pop(name, None)
        self._held.pop(name, None)
        self.cache.drop(name)
        return rec

    def resident(self) -> dict[str, int]:
        return {r.name: r.slot for r in self.records.values() if r.slot is not None}

    def free_slots(self) -> list[int]:
        used = set(self.resident().values())
        return [s for s in range(self.num_slots) if s not in used]

    def place(self, name: str, slot: int, loaded: LoadedAdapter) -> None:
        """Make `name` resident in `slot` (the core has copied the weights)."""
        rec = self.records[name]
        rec.slot, rec.uid, rec.drain_from = slot, loaded.uid, NEVER
        self._clock += 1
        rec.last_used = self._clock
        self._ready.pop(name, None)

    # -- admission (scheduler hook) ------------------------------------------------------------------------------
    def admissible(self, seq) -> bool:
        name = getattr(seq, "adapter_name", None)
        if name is None:
            return True
        rec = self.records.get(name)
        if rec is None or rec.slot is None or seq.seq_id >= rec.drain_from:
            self._wait_start.setdefault(seq, time.monotonic())
            return False
        seq.adapter_slot, seq.cache_salt = rec.slot, rec.uid
        self._clock += 1
        rec.last_used = self._clock
        began = self._wait_start.pop(seq, None)
        if began is not None and seq.index == 0:
            self.counters.observe_wait(time.monotonic() - began)
        return True

    # -- residency, between steps ------------------------------------------------------------------------------------
    def advance(self, live, next_seq_id: int) -> list[str]:
        """Place the adapters that the `live` sequences wait for (see the module docstring); returns the broken
        ones that live sequences want (their requests must fail). `next_seq_id`: the id the next new sequence gets."""
        self._collect_loads()
        pins: dict[str, int] = {}
        wanted: dict[str, int] = {}                       # non-resident adapter -> oldest sequence needing it
        waiting: dict[str, int] = {}                      # non-resident adapter -> sequences needing it
        for seq in live:
            rec = self.records.get(seq.adapter_name) if seq.adapter_name is not None else None
            if rec is None:
                continue
            if rec.slot is not None and seq.seq_id < rec.drain_from:
                pins[rec.name] = pins.get(rec.name, 0) + 1
            elif rec.slot is None:
                wanted[rec.name] = min(wanted.get(rec.name, seq.seq_id), seq.seq_id)
                waiting[rec.name] = waiting.get(rec.name, 0) + 1
        for name in [n for n in self._ready if n not in wanted]:
            del self._ready[name]                         # its requests went away; the host cache may keep it
        broken, blocked = [], 0
        for name in sorted(wanted, key=wanted.__getitem__):
            rec = self.records[name]
            if rec.error is not None:
                broken.append(name)
                continue
            loaded = self._ready.get(name) or self._held.get(name)
            if loaded is None and name in self.cache:
                loaded = self.cache.get(name)
                self.counters.cache_hits_total += 1
            if loaded is None:
                self._maybe_start_load(rec)
                continue
            slot = self._slot_for(pins)
            if slot is None:
                self._ready[name] = loaded
                blocked += 1
                continue
            try:
                self._install(name, slot, loaded)
            except Exception as exc:  # noqa: BLE001 - validated weights that still do not fit: this adapter only
                rec.error = str(exc) or type(exc).__name__
                self._ready.pop(name, None)
                self.counters.load_failures_total += 1
                broken.append(name)
                continue
            self.place(name, slot, loaded)
            self.counters.loads_total += 1
            pins[name] = waiting[name]                    # its waiting sequences pin it from now on
        self._drain_for(blocked + sum(1 for n in wanted if self.records[n].loading), pins, next_seq_id)
        return broken

    def _slot_for(self, pins: dict[str, int]) -> int | None:
        free = self.free_slots()
        if free:
            return free[0]
        idle = [r for r in self.records.values() if r.slot is not None and not pins.get(r.name)]
        if not idle:
            return None
        victim = min(idle, key=lambda r: r.last_used)
        slot = victim.slot
        self._evict(victim.name, slot)
        victim.slot, victim.drain_from = None, NEVER
        self.counters.evictions_total += 1
        log.info("evicted adapter %s from slot %d (least recently used, no work in flight)", victim.name, slot)
        return slot

    def _drain_for(self, demand: int, pins: dict[str, int], next_seq_id: int) -> None:
        """Make sure `demand` slots will free up: mark least recently used busy residents as draining, and undo
        the newest marks of busy ones beyond what the demand still needs (idle residents and free slots count as
        freed already; a marked idle one keeps its mark so it stays free until the demand takes it). No demand:
        no marks."""
        resident = [r for r in self.records.values() if r.slot is not None]
        if demand == 0:
            for rec in resident:
                rec.drain_from = NEVER
            return
        idle = sum(1 for r in resident if not pins.get(r.name)) + len(self.free_slots())   # marked ones stay idle
        draining = sorted((r for r in resident if r.drain_from != NEVER and pins.get(r.name)),
                          key=lambda r: r.drain_from)
        while draining and len(draining) > max(0, demand - idle):
            draining.pop().drain_from = NEVER             # more draining than needed: the newest mark goes
        draining = len(draining)
        candidates = sorted((r for r in resident if r.drain_from == NEVER and pins.get(r.name)),
                            key=lambda r: r.last_used)
        for rec in candidates[:max(0, demand - draining - idle)]:
            rec.drain_from = next_seq_id
            log.info("adapter %s drains (no new requests admitted) so another adapter can have its slot", rec.name)

    # -- loads -------------------------------------------------------------------------------------------------------
    def _maybe_start_load(self, rec: AdapterRecord) -> None:
        if rec.loading or len(self._ready) + sum(r.loading for r in self.records.values()) >= self.load_ahead:
            return
        rec.loading = True
        generation = rec.generation
        threading.Thread(target=self._load_worker, args=(rec.name, rec.path, generation), daemon=True,
                         name="mtlora-adapter-load").start()

    def _load_worker(self, name: str, path: str, generation: int) -> None:
        """In a short-lived thread: file read + validation (+ pinning), single-threaded torch (`serial_torch`);
        the result waits in `_done`."""
        loaded, error = None, None
        try:
            with serial_torch():                          # no second OpenMP team beside the step thread's
                loaded = self._read_loaded(path)
        except Exception as exc:  # noqa: BLE001 - any failure marks this adapter broken, nothing else
            error = str(exc) or type(exc).__name__
        with self._lock:
            self._done.append((name, generation, loaded, error))
        self._loaded_event.set()
        self.notify()

    def _read_loaded(self, path: str) -> LoadedAdapter:
        """File read + full validation (+ pinning where the cache pins) + the kernel-ready data (`prepare`); uid 0
        until the step thread numbers it."""
        config, tensors = self._read(path)
        if self.cache.pin:
            tensors = {k: t.pin_memory() for k, t in tensors.items()}
        prepared = self._prepare(config, tensors) if self._prepare is not None else None
        return LoadedAdapter(config, tensors, uid=0, prepared=prepared)

    def preload(self) -> int:
        """Read every registered adapter that is not resident into the host cache, in registration order, until
        the next one would not fit; returns how many. Run at start-up, before any request (in the step thread,
        with its whole team), so requests for these adapters never wait on a disk read and no load worker competes
        with the steps for the cores (S-LoRA keeps every adapter in host memory the same way). An adapter that
        fails to load is skipped with a warning: its requests get the error through the usual path."""
        if self.cache.limit == 0:
            log.warning("--preload-adapters does nothing without a host cache (--adapter-cache-size 0)")
            return 0
        count = 0
        for name, rec in self.records.items():
            if rec.slot is not None or name in self.cache:
                continue
            self.counters.disk_loads_total += 1
            try:
                loaded = self._read_loaded(rec.path)
            except Exception as exc:  # noqa: BLE001 - a broken adapter fails its own requests later, nothing else
                log.warning("preload skipped adapter %s: %s", name, exc)
                continue
            if self.cache.bytes + loaded.nbytes > self.cache.limit:
                log.info("preload stopped before adapter %s: the host cache is full (%.1f of %.1f MiB)", name,
                         self.cache.bytes / 2**20, self.cache.limit / 2**20)
                break
            loaded.uid = self.new_uid()
            self.cache.put(name, loaded)
            count += 1
        log.info("preloaded %d adapter(s) into the host cache (%.1f MiB)", count, self.cache.bytes / 2**20)
        return count

    def _collect_loads(self) -> None:
        with self._lock:
            done, self._done = self._done, []
        for name, generation, loaded, error in done:
            rec = self.records.get(name)
            if rec is None or rec.generation != generation:
                continue                                  # unregistered (or re-registered) meanwhile
            rec.loading = False
            self.counters.disk_loads_total += 1
            if error is not None:
                rec.error = error
                self.counters.load_failures_total += 1
                log.error("adapter %s could not be loaded from %s: %s (not retried; unload and load it again "
                          "once its files are fixed)", name, rec.path, error)
                continue
            loaded.uid = self.new_uid()
            self._ready[name] = loaded
            self.cache.put(name, loaded)

    def load_error(self, name: str) -> RequestFailedError:
        """The error a request for the broken adapter `name` gets (its directory is not shown to clients)."""
        rec = self.records[name]
        return RequestFailedError(f"adapter {name!r} could not be loaded: {rec.error.replace(rec.path, '<adapter>')}"
                                  "; an operator must fix its files, then unload and load it again")

    def loads_in_flight(self) -> bool:
        return any(r.loading for r in self.records.values())

    def wait_for_load(self, timeout: float) -> None:
        self._loaded_event.wait(timeout)
        self._loaded_event.clear()
