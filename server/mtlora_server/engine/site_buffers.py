"""One (layer, site)'s adapter weights for every slot, and one slot's pack of the sites that share an input.

Contract:
- `SiteBuffers(S, r, N, G, d_in, d_out, dtype, device)`: the stacked, zero-padded tensors of one (layer, site) for
  all S slots: A [S, r_max, d_in], B [S, N_max, r_max, d_out], R [S, g_max, N_max, d_in], expert_mask [S, N_max],
  groups / scaling / used / nexp [S]; host-side `users` (slots that adapt the site) and `dims` (slot -> its own
  (r, N, g)). Everything outside a slot's dims is zero (`lora_ops.AdapterSlots.load` writes only inside them), so
  `clear(slot)` zeroes what the slot wrote and costs the adapter's size, not the preallocated maxima.
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


class SiteBuffers:
    """The stacked, zero-padded tensors of one (layer, site) for all slots (layout: see module docstring)."""

    def __init__(self, S: int, r: int, N: int, G: int, d_in: int, d_out: int, dtype, device):
        kw = {"dtype": dtype, "device": device}
        self.A = torch.zeros(S, r, d_in, **kw)                                      # [S, r_max, d_in]
        self.B = torch.zeros(S, N, r, d_out, **kw)                                  # [S, N_max, r_max, d_out]
        self.R = torch.zeros(S, G, N, d_in, **kw)                                   # [S, g_max, N_max, d_in]
        self.expert_mask = torch.zeros(S, N, dtype=torch.bool, device=device)      # [S, N_max]
        self.groups = torch.ones(S, dtype=torch.long, device=device)                # [S]
        self.scaling = torch.zeros(S, dtype=torch.float32, device=device)           # [S]
        self.used = torch.zeros(S, dtype=torch.bool, device=device)                 # [S] slot adapts this site
        self.nexp = torch.zeros(S, dtype=torch.int32, device=device)                # [S] experts (0: unused)
        self.users: set[int] = set()                                                # host copy of `used`
        self.dims: dict[int, tuple[int, int, int]] = {}                             # slot -> (r, N, g), host side

    def tensors(self) -> tuple:
        return self.A, self.B, self.R, self.expert_mask, self.groups, self.scaling

    def clear(self, slot: int) -> None:
        """Zero what the slot's adapter wrote. Everything outside `dims[slot]` is zero already (buffers start
        zeroed and `load` writes only inside its dims), so an adapter swap costs the adapter's size, not the
        preallocated maxima (default model, the benchmark's adapters: 3-8 MiB written vs ~70 MiB of slot). A slot
        without `dims` is clear already (`load` records them before its first write), so clearing it does nothing:
        a swap clears each site once, not once on eviction and again in `load` (~1,700 small tensor writes)."""
        written = self.dims.get(slot)
        if written is None:
            return
        r, N, g = written
        self.A[slot, :r] = 0
        self.B[slot, :N, :r] = 0
        self.R[slot, :g, :N] = 0
        for t in (self.expert_mask, self.scaling, self.used, self.nexp):
            t[slot] = 0
        self.groups[slot] = 1
        self.users.discard(slot)
        self.dims.pop(slot, None)
