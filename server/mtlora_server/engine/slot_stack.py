"""Every small slot of a step in one set of batched ops (CPU decode): the per-slot loop's op count times the number
of slots becomes a fixed number of `bmm`s, whatever the number of adapters in the step.

Why: on CPU a decode step gives each adapter slot a handful of rows, and the per-slot path (`lora_ops`,
`mtlora.grouped`) then costs ~4-6 small ops per slot and site group, each dominated by its fixed overhead (~10-20
us), not by arithmetic: 4 adapters x 30 layers were ~20 ms of a ~100 ms SmolLM2 step, 32 adapters ~100 ms. Here
the slots' rows are laid out as [m slots, n_max rows] (short slots padded) and every slot's weights are stacked at
its slot index in one column layout, so one `bmm` does every slot's shrink and one per site every slot's expand.

Slots are stacked only with slots of the same shape (the same sites, and per site the same r, N and g: e.g. the
same method and configuration, the many-adapter case): padding unlike adapters to common maxima was measured to
cost more than it saves, since these small matmuls are arithmetic-bound too (~40 GFLOP/s on 2 cores).

Contract:
- `SlotStack` holds, for one layer, one group of sites reading the same input and one shape (`Shape`: per target
  site (r, N, g) or None), the fp32 weights (computing small slots in fp32 is the `lora_ops.SMALL_ROWS` policy) of
  every slot of that shape, one stack row per slot (rows assigned on first use, grown by doubling):
      Wt [rows, d_in, K]: per site the slot's A rows (r columns), then its router rows (g*N columns, N > 1 only)
          transposed for `bmm` (the columns of the slot's `mtlora.grouped` pack, in site order);
      per site B [rows, g, N*r, d_out/g]: s*B, the slot pack's scaling-folded B.
  `refresh(slot, pack)` rewrites a slot's row when its pack object changed (the adapter in the slot was replaced);
  `forget(slot)` frees a cleared slot's row for reuse (`lora_ops` drops a stack when its last slot is forgotten,
  so stacks of shapes no longer loaded do not accumulate in a long-running server).
- `StepRows.build(groups, slots, stack_rows)`: the step's rows of those slots (each a contiguous slice) as a gather
  index [m*n_max] (pad rows repeat a real row: finite, never written back), the stack rows (a range view when
  consecutive, else an index), and how to add back (one view when the rows are exactly the [m, n_max] layout, else
  index_add of the real rows).
- `apply(x, stack, rows, targets)`: adds every stacked site's delta, in place, into its target (out [T, d_out]
  views); per row exactly the math of `mtlora.grouped` on the row's own slot pack (fp32; summation order aside).
  Not batch-invariant (`lora_ops` does not use it in that mode); routing statistics through `record`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch



Shape = tuple  # per target site: (r, N, g) or None (the slot does not adapt that site)


@dataclass
class StackedSite:
    """One site of a `SlotStack`: columns [a_off, a_off + r) of the shrink output are h, [r_off, r_off + g*N) the
    router logits (r_off -1: N == 1, no router)."""

    target: int                     # index of the site in the apply_shared targets
    a_off: int
    r: int
    r_off: int
    N: int
    g: int
    B: torch.Tensor                 # [rows, g, N*r, d_out/g] fp32


class SlotStack:
    """The fp32 weights of every slot of one shape for one (layer, sites sharing an input) (module doc)."""

    def __init__(self, d_in: int, outs: list[int], shape: Shape, capacity: int = 2):
        self.shape, self.outs, self.d_in = shape, outs, d_in
        self.sites, off = [], 0
        for i, dims in enumerate(shape):
            if dims is None:
                continue
            r, N, g = dims
            a_off, off = off, off + r
            r_off = -1
            if N > 1:
                r_off, off = off, off + g * N
            self.sites.append(StackedSite(i, a_off, r, r_off, N, g, torch.zeros(capacity, g, N * r, outs[i] // g)))
        self.K = off
        self.Wt = torch.zeros(capacity, d_in, self.K)                               # [rows, d_in, K]
        self.row_of: dict[int, int] = {}                                            # slot -> stack row
        self._src: dict[int, object] = {}                                           # slot -> pack written
        self._free: list[int] = []                                                  # rows of forgotten slots

    def refresh(self, slot: int, sp) -> int:
        """The slot's stack row, (re)written from its `site_buffers.SlotPack` (pack + target indices) when that changed."""
        if slot not in self.row_of:
            row = self._free.pop() if self._free else len(self.row_of)
            if row == self.Wt.shape[0]:
                self._grow(2 * row)
            self.row_of[slot] = row
        if self._src.get(slot) is not sp:
            self._write(self.row_of[slot], sp)
            self._src[slot] = sp
        return self.row_of[slot]

    def forget(self, slot: int) -> None:
        """The slot was cleared: its row is free for the next slot of this shape."""
        if slot in self.row_of:
            self._free.append(self.row_of.pop(slot))
            self._src.pop(slot, None)

    def _grow(self, capacity: int) -> None:
        def grown(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(capacity, *t.shape[1:])
            out[: t.shape[0]] = t
            return out
        self.Wt = grown(self.Wt)
        for site in self.sites:
            site.B = grown(site.B)

    @torch.no_grad()
    def _write(self, row: int, sp) -> None:
        pk = sp.pack.float()
        by_target = {s.target: s for s in self.sites}
        for i, part in zip(sp.targets, pk.parts):
            site = by_target[i]
            assert (part.r, part.N, part.g) == (site.r, site.N, site.g), "slot shape differs from the stack's"
            self.Wt[row, :, site.a_off:site.a_off + part.r] = pk.W[part.a_off:part.a_off + part.r].T
            if part.r_off >= 0:
                self.Wt[row, :, site.r_off:site.r_off + part.g * part.N] = \
                    pk.W[part.r_off:part.r_off + part.g * part.N].T
            site.B[row] = part.B


def split_runs(slots: list[int], groups: dict, pad_ratio: float) -> list[list[int]]:
    """Same-shape slots split into runs that stack without much padding: by rows, most first, a run closes when
    its padded rows (slots x its first slot's rows) would exceed pad_ratio x its real rows."""
    n = {s: groups[s].stop - groups[s].start for s in slots}
    runs: list[list[int]] = []
    real = 0
    for s in sorted(slots, key=lambda s: -n[s]):
        if runs and (len(runs[-1]) + 1) * n[runs[-1][0]] <= pad_ratio * (real + n[s]):
            runs[-1].append(s)
            real += n[s]
        else:
            runs.append([s])
            real = n[s]
    return runs


@dataclass
class StepRows:
    """The step's rows of some small slots in the [m, n_max] layout (see module doc)."""

    gather: torch.Tensor            # [m*n_max] rows of x
    sel: slice | torch.Tensor       # the slots: a range of the stack, or an index
    m: int
    n: int                          # n_max
    dense: slice | None             # rows lo:hi when they are exactly the layout (add back through a view)
    src: torch.Tensor | None        # else: positions in the layout of the real rows ...
    dst: torch.Tensor | None        # ... and their rows in x
    owner: torch.Tensor             # [n_real] the slot of each real row (layout order; routing statistics)

    @classmethod
    def build(cls, groups: dict, slots: list[int], stack_rows: list[int]) -> "StepRows":
        """groups: slot -> slice of its rows (the plan's); slots: in row order, each with a slice; stack_rows: each
        slot's row in the stack."""
        spans = [groups[s] for s in slots]
        n = max(sp.stop - sp.start for sp in spans)
        gather, src, dst, owner = [], [], [], []
        lo, hi = stack_rows[0], stack_rows[-1] + 1
        consecutive = stack_rows == list(range(lo, hi))
        for k, sp in enumerate(spans):
            rows = list(range(sp.start, sp.stop))
            src += range(k * n, k * n + len(rows))
            dst += rows
            owner += [slots[k]] * len(rows)
            gather += rows + [sp.start] * (n - len(rows))
        dense = None
        if all(sp.stop - sp.start == n for sp in spans) and \
                all(a.stop == b.start for a, b in zip(spans, spans[1:])):
            dense = slice(spans[0].start, spans[-1].stop)
        sel = slice(lo, hi) if consecutive else torch.tensor(stack_rows)
        t = torch.tensor
        return cls(t(gather), sel, len(slots), n, dense, None if dense else t(src), None if dense else t(dst),
                   t(owner))


def _take(t: torch.Tensor, sel) -> torch.Tensor:
    return t[sel] if isinstance(sel, slice) else t.index_select(0, sel)


def apply(x: torch.Tensor, stack: SlotStack, rows: StepRows, targets: list[tuple[str, torch.Tensor]],
          record=None) -> None:
    """Add every stacked site's delta of the rows' slots into its target, in place (module doc). `record(target
    index, w [n_real, g, N] fp32)`, when given, receives each site's routing weights of the real rows (in
    `rows.owner` order; N == 1 sites: all ones), for the routing statistics."""
    m, n = rows.m, rows.n
    xs = x.index_select(0, rows.gather).float().view(m, n, -1)                     # [m, n, d_in] fp32
    hz = torch.bmm(xs, _take(stack.Wt, rows.sel))                                 # [m, n, K]
    for site in stack.sites:
        out = targets[site.target][1]
        h = hz[..., site.a_off:site.a_off + site.r]                                # [m, n, r]
        B = _take(site.B, rows.sel)                                                 # [m, g, N*r, dg]
        g, N, r, dg = site.g, site.N, site.r, B.shape[3]
        if site.r_off < 0:
            delta = torch.bmm(h, B.view(m, r, dg)).view(m, n, 1, dg)               # [m, n, 1, d_out]
            if record is not None:
                record(site.target, torch.ones(rows.owner.shape[0], 1, 1, device=x.device))
        else:
            lg = hz[..., site.r_off:site.r_off + g * N].view(m, n, g, N).transpose(1, 2)
            w = torch.softmax(lg, dim=-1).contiguous()                             # [m, g, n, N]
            u = w[..., None] * h[:, None, :, None, :]                               # [m, g, n, N, r]
            delta = torch.bmm(u.view(m * g, n, N * r), B.view(m * g, N * r, dg))   # [m*g, n, dg]
            delta = delta.view(m, g, n, dg).transpose(1, 2)                         # [m, n, g, dg]
            if record is not None:
                wr = w.transpose(1, 2).reshape(m * n, g, N)                         # [m*n, g, N]
                record(site.target, wr if rows.dense is not None else wr.index_select(0, rows.src))
        if rows.dense is not None:
            out[rows.dense].view(m, n, g, dg).add_(delta)
        else:
            flat = delta.reshape(m * n, g * dg).index_select(0, rows.src)            # [n_real, d_out]
            out.index_add_(0, rows.dst, flat.to(out.dtype))
