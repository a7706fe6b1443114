"""EngineCore's adapter methods (a mixin, split from core.py): registration, slot installs and evictions.

Contract (see core.py and adapter_registry.py for the whole picture):
- `read_adapter(path) -> (config, tensors)`: file read + full validation, AdapterLoadError naming the path (safe in
  any thread; the registry's load workers call it, then `slots.prepare` for the kernel-ready data).
- `install_adapter(name, config, tensors, path)`: registers validated weights; resident at once in a free slot,
  else kept in the host cache until a request needs it. A dynamic load never fails for lack of a slot.
- `register_adapter(name, path)`: registers from adapter_config.json alone (checked against the slot limits); the
  tensors are read on first use.
- `remove_adapter(name)`: unregisters (clearing its slot); AdapterBusyError while an unfinished request uses it.
- `_slot_install` / `_slot_evict` are the registry's callbacks (step thread); `_advance_adapters()` runs at the
  start of each step and fails the requests waiting for an adapter whose load failed.
- `adapters` (set up by EngineCore) maps the RESIDENT adapters to their `_Adapter` (slot, config, info, uid).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from mtlora.config import AdapterConfig
from mtlora.errors import AdapterBusyError, AdapterLoadError, AdapterNotFoundError, MtloraError

from .adapter_registry import LoadedAdapter
from .types import AdapterInfo

log = logging.getLogger(__name__)


@dataclass
class _Adapter:
    slot: int
    config: AdapterConfig
    info: AdapterInfo
    uid: int = 0                                          # the prefix-cache salt of these weights


class AdapterMethods:
    def read_adapter(self, path: str) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
        from mtlora.checkpoint import load_adapter

        try:
            return load_adapter(path, model_config=self.hf_config, dtype=self.dtype)
        except MtloraError as exc:
            raise AdapterLoadError(f"cannot load adapter from {path}: {exc}") from exc
        except Exception as exc:  # unexpected I/O errors must not kill the engine either
            raise AdapterLoadError(f"cannot load adapter from {path}: {type(exc).__name__}: {exc}") from exc

    def install_adapter(self, name: str, config: AdapterConfig, tensors: dict[str, torch.Tensor],
                        path: str = "<memory>", prepared=None) -> AdapterInfo:
        """Register a validated adapter; it is resident at once when a slot is free, else in the host cache.
        `prepared`: `self.slots.prepare(config, tensors)`, when the caller derived it off the step thread."""
        self._check_new_name(name)
        try:
            self.slots.check(config, tensors)
        except AdapterLoadError as exc:
            raise AdapterLoadError(f"adapter {name!r} ({path}) does not fit the engine: {exc}") from exc
        info = self._info(name, config, path, sum(t.numel() for t in tensors.values()))
        loaded = LoadedAdapter(config, tensors, uid=self.registry.new_uid(), prepared=prepared)
        self.registry.register(name, path, config, info, loaded)
        free = self.registry.free_slots()
        if free:
            try:
                self._slot_install(name, free[0], loaded)
            except AdapterLoadError:
                self.registry.unregister(name)
                raise
            self.registry.place(name, free[0], loaded)
        return info

    def register_adapter(self, name: str, path: str) -> AdapterInfo:
        """Register an adapter from its adapter_config.json only (checked against the slot limits); its tensors
        are read and validated when a request first needs it."""
        from mtlora.checkpoint import CONFIG_NAME, count_parameters, read_json

        self._check_new_name(name)
        try:
            config = AdapterConfig.from_dict(read_json(Path(path) / CONFIG_NAME), path=str(Path(path) / CONFIG_NAME))
            self.slots.check(config)
            num_parameters = count_parameters(config, self.hf_config)
        except MtloraError as exc:
            raise AdapterLoadError(f"cannot register adapter {name!r} from {path}: {exc}") from exc
        info = self._info(name, config, path, num_parameters)
        self.registry.register(name, path, config, info)
        return info

    def _check_new_name(self, name: str) -> None:
        if not name or name == self.base_model_name:
            raise AdapterLoadError(f"adapter name {name!r} is empty or is the base model's name")
        if name in self.registry.records:
            raise AdapterLoadError(f"an adapter named {name!r} is already loaded; unload it first")

    @staticmethod
    def _info(name: str, config: AdapterConfig, path: str, num_parameters: int) -> AdapterInfo:
        return AdapterInfo(name=name, method=config.method, path=str(path), num_parameters=num_parameters,
                           num_experts=config.num_experts, rank=config.rank)

    def _slot_install(self, name: str, slot: int, loaded: LoadedAdapter) -> None:
        """The slot copy (registry callback, step thread): `name`'s validated weights into `slot`."""
        config = loaded.config
        try:
            self.slots.load(slot, config, loaded.tensors, checked=True,   # validated when read / installed
                            prepared=loaded.prepared)
        except Exception as exc:
            self.slots.clear(slot)
            raise AdapterLoadError(f"adapter {name!r} does not fit the engine: {exc}") from exc
        reset = getattr(self.routing_stats, "reset", None)
        if reset is not None:
            with torch.inference_mode():                  # its sums were created inside the forward's mode
                reset(slot)                               # the slot's history belonged to its previous adapter
        self.adapters[name] = _Adapter(slot, config, self.registry.records[name].info, uid=loaded.uid)
        self.slot_sites[slot] = set(config.sites())
        log.info("adapter %s (%s, N=%d, r=%d) in slot %d", name, config.method, config.num_experts,
                 config.rank, slot)

    def _slot_evict(self, name: str, slot: int) -> None:
        self.slots.clear(slot)
        self.adapters.pop(name, None)
        self.slot_sites.pop(slot, None)

    def remove_adapter(self, name: str) -> None:
        """Unregister `name` (and free its slot); AdapterBusyError while a request uses it."""
        if name not in self.registry.records:
            raise AdapterNotFoundError(name)
        busy = sum(1 for st in self.requests.values() for s in st.seqs if s.adapter_name == name and not s.finished)
        if busy:
            raise AdapterBusyError(f"adapter {name!r} is in use by {busy} running sequence(s); retry later")
        rec = self.registry.unregister(name)
        if rec.slot is not None:
            self._slot_evict(name, rec.slot)

    def _advance_adapters(self) -> None:
        """Bring in / evict adapters for the queue (registry.advance); fail the requests of broken adapters."""
        live = [s for st in self.requests.values() for s in st.seqs if not s.finished]
        for name in self.registry.advance(live, self._next_seq_id):
            error = self.registry.load_error(name)
            for state in [st for st in self.requests.values() if st.request.adapter == name]:
                self._fail(state, error, f"loading adapter {name!r}", error=error)

