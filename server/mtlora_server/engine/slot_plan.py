"""`SlotPlan`: the token -> adapter-slot segmentation of one engine step, built once and reused by every site.

Contract:
- Built by the runner once per step from the step's per-token slots (`slot_idx` [T] long on the model's device,
  -1 = bare base; optionally the same on the host, else it is copied to the host once here).
- `groups`: each adapter slot present -> its token rows (a `slice` when contiguous, the runner's normal layout;
  else a [n] long index tensor on the device). The CPU fused path (`lora_ops.AdapterSlots.apply_shared`) uses it.
- `tiles(bt, max_slots)`: the Triton tile metadata (`triton_molora.TileMeta`), built on the host and copied to
  the device in one transfer the first time a layer asks, then shared by every site of every layer; its size
  depends on T and max_slots only, so the CUDA path inside a layer never synchronises with the host.
"""

from __future__ import annotations

import torch


class SlotPlan:
    """Token -> slot segmentation of one engine step, built once (by the runner) and reused by all sites/layers.

    `slot_idx` [T] long (-1 = base). `groups` maps each adapter slot present to its token rows: a `slice` when
    they are one contiguous range (the runner lays sequences out grouped by slot, so this is the normal case: the
    ops then read and write views, no gather / scatter), else a [n] long index tensor.
    """

    def __init__(self, slot_idx: torch.Tensor, slots: list[int] | None = None, host: torch.Tensor | None = None):
        self.slot_idx = slot_idx
        self.T = int(slot_idx.shape[0])
        # The segmentation is computed on the host (one copy per step when the runner gives no host copy).
        self.host = (host if host is not None else slot_idx).to("cpu", torch.long)              # [T]
        present = sorted(set(self.host.tolist() if slots is None else slots) - {-1})
        self.groups: dict[int, torch.Tensor | slice] = {}
        for s in present:
            if s < 0:
                continue
            rows = (self.host == s).nonzero().squeeze(1)
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            self.groups[s] = slice(lo, hi) if hi - lo == rows.numel() else rows.to(slot_idx.device)
        self._tiles: dict[tuple, object] = {}
        self.memo: dict[tuple, object] = {}    # other per-step layouts derived from the plan (lora_ops), by key

    def tiles(self, bt: int, max_slots: int):
        """The step's Triton tile metadata (`triton_molora.TileMeta`) for tile size bt, built once per step (one
        host-to-device copy) and shared by every site of every layer; sized by `max_slots`, not by device data."""
        key = (bt, max_slots)
        if key not in self._tiles:
            from .triton_molora import build_tiles
            self._tiles[key] = build_tiles(self.host, bt, max_slots, self.slot_idx.device)
        return self._tiles[key]
