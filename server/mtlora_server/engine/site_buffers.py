"""One (layer, site)'s adapter weights for every slot, and one slot's pack of the sites that share an input.

Contract:
- `SiteBuffers(S, r, N, G, d_in, d_out, dtype, device, flags)`: the stacked, zero-padded tensors of one
  (layer, site) for all S slots: A [S, r_max, d_in], B [S, N_max, r_max, d_out], R [S, g_max, N_max, d_in],
  expert_mask [S, N_max], groups / scaling / used / nexp [S]; host-side `users` (slots that adapt the site) and
  `dims` (slot -> its own (r, N, g)). Everything outside a slot's dims is zero (`lora_ops.AdapterSlots.load`
  writes only inside them), so `clear(slot)` zeroes what the slot wrote and costs the adapter's size, not the
  preallocated maxima. The per-slot scalar fields (expert_mask, groups, scaling, used, nexp) are views of one row
  of a `SlotFlags` shared by all the sites of an `AdapterSlots` (`flags`, which hands the site its row):
  `SlotFlags.set` / `reset` write a slot's fields for all its sites at once, `clear` leaves them to its caller.
- `pack_slot(bufs, slot) -> SlotPack | None`: the slot's sites among `bufs` [(target index, SiteBuffers)] as one
  `mtlora.grouped.Pack`, each site trimmed to the slot's own (r, N, g); None when the slot adapts none of them.
  `SlotPack.targets[i]` is the index (in `AdapterSlots.apply_shared`'s targets) of the site of `pack.parts[i]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtlora import grouped


@dataclass
class SlotPack:
    """One slot's `mtlora.grouped.Pack` for the sites sharing one input; `targets[i]` is the index (in the
    `apply_shared` targets) of the site of `pack.parts[i]`."""

    pack: grouped.Pack
    targets: list[int]


def pack_slot(bufs: list[tuple[int, "SiteBuffers"]], slot: int) -> SlotPack | None:
    """The slot's sites among `bufs` [(target index, buffers)], each trimmed to the slot's own r / N / g."""
    sites, targets = [], []
    for i, buf in bufs:
        if slot not in buf.users:
            continue
        r, N, g = buf.dims[slot]
        sites.append(grouped.SiteWeights(buf.A[slot, :r], buf.B[slot, :N, :r],
                                         buf.R[slot, :g, :N] if N > 1 else None, float(buf.scaling[slot])))
        targets.append(i)
    return SlotPack(grouped.pack(sites), targets) if sites else None


class SlotFlags:
    """The per-slot scalar fields of many sites, one tensor per field and a row per site (`row()` hands a new site
    its row): an adapter's load or clear writes each field once for all its sites (one indexed write over their
    rows) instead of five small tensor writes per site, which cost an install ~110 us a site (lora: 120 sites)."""

    def __init__(self, rows: int, S: int, N: int, device):
        self.expert_mask = torch.zeros(rows, S, N, dtype=torch.bool, device=device)
        self.groups = torch.ones(rows, S, dtype=torch.long, device=device)
        self.scaling = torch.zeros(rows, S, dtype=torch.float32, device=device)
        self.used = torch.zeros(rows, S, dtype=torch.bool, device=device)
        self.nexp = torch.zeros(rows, S, dtype=torch.int32, device=device)
        self.device, self._next = device, 0

    def row(self) -> int:
        if self._next >= self.used.shape[0]:
            raise RuntimeError(f"SlotFlags: all {self.used.shape[0]} rows are taken")
        self._next += 1
        return self._next - 1

    def set(self, rows: list[int], slot: int, groups: list[int], scaling: float, N: int) -> None:
        """Slot `slot` adapts the sites of `rows` (groups[i] routing groups at rows[i]) with N experts."""
        if not rows:
            return
        idx = torch.tensor(rows, device=self.device)
        self.groups[idx, slot] = torch.tensor(groups, device=self.device)
        self.scaling[idx, slot] = scaling
        self.used[idx, slot] = True
        self.nexp[idx, slot] = N
        self.expert_mask[idx, slot, :N] = True

    def reset(self, rows: list[int], slot: int) -> None:
        """Slot `slot` adapts none of the sites of `rows` any more."""
        if not rows:
            return
        idx = torch.tensor(rows, device=self.device)
        self.groups[idx, slot] = 1
        self.scaling[idx, slot] = 0
        self.used[idx, slot] = False
        self.nexp[idx, slot] = 0
        self.expert_mask[idx, slot] = False


class SiteBuffers:
    """The stacked, zero-padded tensors of one (layer, site) for all slots (layout: see module docstring)."""

    def __init__(self, S: int, r: int, N: int, G: int, d_in: int, d_out: int, dtype, device, flags: SlotFlags):
        kw = {"dtype": dtype, "device": device}
        self.A = torch.zeros(S, r, d_in, **kw)                                      # [S, r_max, d_in]
        self.B = torch.zeros(S, N, r, d_out, **kw)                                  # [S, N_max, r_max, d_out]
        self.R = torch.zeros(S, G, N, d_in, **kw)                                   # [S, g_max, N_max, d_in]
        self.flags = flags
        self.row = flags.row()
        self.expert_mask = self.flags.expert_mask[self.row]                         # [S, N_max] (views)
        self.groups = self.flags.groups[self.row]                                   # [S]
        self.scaling = self.flags.scaling[self.row]                                 # [S]
        self.used = self.flags.used[self.row]                                       # [S] slot adapts this site
        self.nexp = self.flags.nexp[self.row]                                       # [S] experts (0: unused)
        self.users: set[int] = set()                                                # host copy of `used`
        self.dims: dict[int, tuple[int, int, int]] = {}                             # slot -> (r, N, g), host side

    def tensors(self) -> tuple:
        return self.A, self.B, self.R, self.expert_mask, self.groups, self.scaling

    def clear(self, slot: int) -> bool:
        """Zero the weights the slot's adapter wrote; True when it had written any (its row of the flags is then
        the caller's to reset: `SlotFlags.reset`, once for all the sites). Everything outside `dims[slot]` is zero
        already (buffers start zeroed and `load` writes only inside its dims), so an adapter swap costs the
        adapter's size, not the preallocated maxima (default model, the benchmark's adapters: 3-8 MiB written vs
        ~70 MiB of slot). A slot without `dims` is clear already (`load` records them before its first write), so
        clearing it does nothing: a swap clears each site once, not once on eviction and again in `load`."""
        written = self.dims.get(slot)
        if written is None:
            return False
        r, N, g = written
        self.A[slot, :r] = 0
        self.B[slot, :N, :r] = 0
        self.R[slot, :g, :N] = 0
        self.users.discard(slot)
        self.dims.pop(slot, None)
        return True
