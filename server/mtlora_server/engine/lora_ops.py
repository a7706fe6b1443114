"""Batched heterogeneous adapter ops: many adapters (mtlora / hydralora / lora) in one batch, one op per site.

Contract:
- `AdapterSlots` keeps every adapter in preallocated, zero-padded stacked tensors per (layer, site), sized for
  `max_adapters` slots the first time any adapter uses the site, so loading or clearing one slot only writes that
  slot's rows (no reallocation, stable `data_ptr`, no recompiles).
- Every token carries a slot index (-1: bare base model). `AdapterSlots.apply(layer, site, x, slot_idx)` returns the
  adapter delta [T, d_out] in x.dtype (zero rows for base tokens and for slots that do not use the site), or None
  when no loaded adapter uses the site. Math is exactly `mtlora.adapters.MoLoRA`:
      h = A z, w = softmax_N(R z) per group (fp32, padded experts masked to -inf),
      delta_k = s * sum_i w[group(k), i] * (B_i h)[k],  group(k) = k // (d_out // g_slot), s = alpha / r.
- Stacked layout for one site with S slots (the functions below take exactly these tensors):
      A [S, r_max, d_in], B [S, N_max, r_max, d_out] (native B_i [d_out, r] transposed once at load, so the
      expand is a plain matmul), R [S, g_max, N_max, d_in] (router rows group-major, as the native [g*N, d_in]
      router), expert_mask [S, N_max] bool, groups [S] long (>= 1), scaling [S] float.
- `molora_reference` is a per-token Python loop (obviously correct, slow); `molora_torch` is the batched CPU path;
  the Triton kernel (`triton_molora.py`) is used when x is on CUDA and triton imports. All three agree.
- The engine's CPU path is `AdapterSlots.apply_shared(layer, x, targets, slot_idx, plan=SlotPlan)`: the token ->
  slot segmentation (`SlotPlan`) is computed once per step and reused by every site of every layer, and all sites
  that read the same input are fused per slot into one shrink matmul (A and router rows of those sites stacked at
  load time, each slot trimmed to its own r / N / g, so no padding and no expert masking); each site's delta is
  then added in place into its target (the matching slice of the fused projection output). `molora_torch` stays
  the batched reference it is checked against. On CUDA, `apply_shared` with a plan runs the Triton kernels with
  the step's tile metadata (`SlotPlan.tiles`), adding each site's delta in place, with no host sync in a layer.
- `RoutingStats` accumulates, per slot, the sum of per-token routing weight per expert (averaged over the slot's
  groups), the sum of per-token routing entropy (nats, averaged over groups) and the token count.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from mtlora.config import AdapterConfig
from mtlora.errors import AdapterLoadError, ConfigError
from mtlora.inject import expected_shapes, site_dims

from .invariant import pad_rows
from .slot_plan import SlotPlan  # noqa: F401  (re-exported: the runner and tests import it from here)

log = logging.getLogger(__name__)

SITES = ("self_attn", "mlp", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Upper bound (elements) on the largest per-chunk intermediate of the torch path (gathered B: ~128 MiB in fp32).
_CHUNK_ELEMS = 1 << 25
_MAX_TILE = 256


# -- routing statistics ------------------------------------------------------------------------------------------
class RoutingStats:
    """Per-slot sums of routing weight per expert [S, N_max], of routing entropy [S] and token counts [S].

    Buffers grow on first use, so the engine may construct it with no arguments. Sums stay on the op's device; only
    `summary()` synchronises.
    """

    def __init__(self, max_adapters: int = 0, max_experts: int = 0):
        self.weight_sum = torch.zeros(max_adapters, max_experts, dtype=torch.float64)   # [S, N_max]
        self.entropy_sum = torch.zeros(max_adapters, dtype=torch.float64)               # [S]
        self.count = torch.zeros(max_adapters, dtype=torch.float64)                     # [S]
        self._experts: torch.Tensor | None = None                                   # [S] experts per slot

    def reset(self, slot: int | None = None) -> None:
        """Forget everything (slot None) or one slot's sums (e.g. after it was re-loaded)."""
        rows = slice(None) if slot is None else slot
        for t in (self.weight_sum, self.entropy_sum, self.count) + (() if self._experts is None else (self._experts,)):
            if slot is None or slot < t.shape[0]:
                t[rows] = 0

    def _grow(self, slots: int, experts: int, device: torch.device) -> None:
        S, N = max(slots, self.weight_sum.shape[0]), max(experts, self.weight_sum.shape[1])
        if (S, N) != tuple(self.weight_sum.shape) or self.weight_sum.device != device:
            ws = torch.zeros(S, N, dtype=torch.float64, device=device)
            ws[: self.weight_sum.shape[0], : self.weight_sum.shape[1]] = self.weight_sum.to(device)
            es, ct = (torch.zeros(S, dtype=torch.float64, device=device) for _ in range(2))
            es[: self.entropy_sum.shape[0]] = self.entropy_sum.to(device)
            ct[: self.count.shape[0]] = self.count.to(device)
            self.weight_sum, self.entropy_sum, self.count = ws, es, ct

    def record(self, slots: torch.Tensor, weights: torch.Tensor, groups: torch.Tensor,
               expert_mask: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """slots: [n] slot of each routed token; weights: [n, g_max, N_max] fp32 routing weights;
        groups: [S] routing groups per slot; expert_mask: [S, N_max] (only used to remember N per slot);
        valid: [n] bool, rows that count (None: all). A mask instead of boolean indexing keeps it sync-free."""
        S, N = expert_mask.shape
        self._grow(S, N, weights.device)
        g = groups[slots]                                                           # [n]
        real = torch.arange(weights.shape[1], device=weights.device)[None, :] < g[:, None]   # [n, g_max]
        w = weights.double() * real[:, :, None]                                     # [n, g_max, N] (pad groups 0)
        per_expert = w.sum(1) / g[:, None]                                          # [n, N]
        ent = -(w * w.clamp_min(1e-30).log()).sum(-1).sum(-1) / g                   # [n]
        ones = torch.ones_like(ent)
        if valid is not None:
            keep = valid.to(ent.dtype)                                              # [n]
            per_expert, ent, ones = per_expert * keep[:, None], ent * keep, keep
        self.weight_sum[:, :N].index_add_(0, slots, per_expert)
        self.entropy_sum.index_add_(0, slots, ent)
        self.count.index_add_(0, slots, ones)
        n_exp = expert_mask.sum(1).to(self.count.device)                            # [S]; 0 where site unused
        # Max over sites seen (a slot's mask is empty at sites it does not adapt); no host sync here.
        self._experts = n_exp if self._experts is None else torch.maximum(self._experts.to(n_exp.device), n_exp)

    def summary(self, slot: int) -> tuple[list[float], float]:
        """(mean routing weight per expert of this slot's adapter, mean routing entropy in nats)."""
        if slot >= self.count.shape[0] or float(self.count[slot]) == 0:
            return [], 0.0
        n = float(self.count[slot])
        N = int(self._experts[slot]) if self._experts is not None else self.weight_sum.shape[1]
        return (self.weight_sum[slot, :N] / n).tolist(), float(self.entropy_sum[slot]) / n


# -- the math: reference (per token) and batched torch ------------------------------------------------------------
def molora_reference(x, slot_idx, A, B, R, expert_mask, groups, scaling) -> torch.Tensor:
    """Per-token loop, straight from the formula. x: [T, d_in], slot_idx: [T] -> delta [T, d_out] in x.dtype."""
    T, d_out = x.shape[0], B.shape[3]
    out = torch.zeros(T, d_out, dtype=x.dtype, device=x.device)
    for t in range(T):
        s = int(slot_idx[t])
        if s < 0:
            continue
        z = x[t].to(A.dtype)                                                        # [d_in]
        h = A[s] @ z                                                                # [r]
        y = torch.einsum("nro,r->no", B[s], h)                                      # [N, d_out]
        g = int(groups[s])
        logits = (R[s, :g] @ z).float()                                             # [g, N]
        logits = logits.masked_fill(~expert_mask[s], float("-inf"))
        w = torch.softmax(logits, dim=-1)                                           # [g, N]
        group_of = torch.arange(d_out, device=x.device) // (d_out // g)             # [d_out]
        w_ch = w[group_of].T.to(y.dtype)                                            # [N, d_out]
        out[t] = ((w_ch * y).sum(0) * float(scaling[s])).to(x.dtype)
    return out


def segment_tiles(slot_idx: torch.Tensor, pad_row: int, min_tile: int = 1,
                  max_tile: int = _MAX_TILE) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Group the adapter tokens into tiles of `tile` rows that all share one slot (segment by slot).

    slot_idx: [T] (-1 = no adapter). Returns tile_slot [nt], tile_rows [nt, tile] (row indices into x; padding
    points at `pad_row`, an appended zero row) and the tile size. The tile is about T / (distinct slots), rounded
    up to a power of two, so padding stays below one tile per distinct slot.
    """
    rows = (slot_idx >= 0).nonzero().squeeze(1)                                     # [n]
    slots = slot_idx[rows]
    slots, order = torch.sort(slots, stable=True)
    rows = rows[order]
    uniq, counts = torch.unique_consecutive(slots, return_counts=True)              # [P], [P]
    n, P = rows.numel(), uniq.numel()
    if n == 0:
        return slot_idx.new_zeros(0), slot_idx.new_zeros(0, min_tile), min_tile
    tile = 1 << max(0, math.ceil(math.log2(max(1, -(-n // P)))))
    tile = max(min_tile, min(max_tile, tile))
    tiles_per = (counts + tile - 1) // tile                                         # [P]
    tile_slot = torch.repeat_interleave(uniq, tiles_per)                            # [nt]
    pos = torch.arange(n, device=rows.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # [n]
    first_tile = torch.repeat_interleave(tiles_per.cumsum(0) - tiles_per, counts)  # [n]
    tile_rows = torch.full((tile_slot.numel(), tile), pad_row, dtype=torch.long, device=rows.device)
    tile_rows[first_tile + pos // tile, pos % tile] = rows
    return tile_slot, tile_rows, tile


def molora_torch(x, slot_idx, A, B, R, expert_mask, groups, scaling, stats: RoutingStats | None = None,
                 dims: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Batched torch path (CPU). Same arguments and result as `molora_reference`.

    Segment by slot: tokens are sorted by slot and cut into tiles that each belong to one slot; every step is then
    one `bmm` over all tiles with each tile's slot weights gathered (`A[tile_slot]`, ...). There is no Python loop
    over tokens, requests or slots; the only loop is over chunks of tiles, so the gathered B ([tiles, N*r, d_out])
    never exceeds ~_CHUNK_ELEMS elements (a 2048-token prefill stays within memory). Router weights are folded
    into h per group (u = w_j * h, [N*r]) so the weighted expand is one matmul per tile.
    `dims` = (r, N, g) upper bounds over the slots that can occur (AdapterSlots passes the loaded maxima), so the
    work is sized for the adapters actually loaded rather than for the preallocated maxima.
    """
    T, d_out = x.shape[0], B.shape[3]
    if dims is not None:   # trim the zero padding nobody uses (views, no copies)
        r, N, G = dims
        A, B, R, expert_mask = A[:, :r], B[:, :N, :r], R[:, :G, :N], expert_mask[:, :N]
    out = torch.zeros(T + 1, d_out, dtype=x.dtype, device=x.device)               # row T absorbs tile padding
    tile_slot, tile_rows, tile = segment_tiles(slot_idx, pad_row=T)
    if tile_slot.numel() == 0:
        return out[:T]
    x_pad = torch.cat([x, x.new_zeros(1, x.shape[1])]).to(A.dtype)                # [T+1, d_in]
    g_eff = int(groups[tile_slot].max())                                            # groups actually present
    N, r = B.shape[1], B.shape[2]
    per_tile = max(N * r * d_out, tile * g_eff * d_out, tile * N * x.shape[1])
    step = max(1, _CHUNK_ELEMS // per_tile)
    for c in range(0, tile_slot.numel(), step):
        ts, tr = tile_slot[c:c + step], tile_rows[c:c + step]                       # [nt], [nt, tile]
        delta, w = _tiles_delta(x_pad[tr], ts, A, B, R, expert_mask, groups, scaling, g_eff)
        out[tr.reshape(-1)] = delta.reshape(-1, d_out).to(x.dtype)                 # padding rows all land on T
        if stats is not None:
            real = tr.reshape(-1) < T                                               # drop padding rows
            slots = ts[:, None].expand_as(tr).reshape(-1)[real]
            stats.record(slots, w.reshape(-1, *w.shape[2:])[real], groups, expert_mask)
    return out[:T]


def _tiles_delta(xt, ts, A, B, R, expert_mask, groups, scaling, g_eff):
    """xt: [nt, tile, d_in] tokens of tiles whose slots are ts [nt]. Returns delta [nt, tile, d_out] and the
    routing weights [nt, tile, G, N] (fp32)."""
    nt, tile, d_in = xt.shape
    N, r, d_out = B.shape[1], B.shape[2], B.shape[3]
    G = R.shape[1]
    h = torch.bmm(xt, A[ts].transpose(1, 2))                                        # [nt, tile, r]
    if N == 1:   # no loaded adapter has a router here: every weight is 1
        w = torch.ones(nt, tile, G, 1, device=xt.device)
    else:
        logits = torch.bmm(xt, R[ts].reshape(nt, G * N, d_in).transpose(1, 2))     # [nt, tile, G*N]
        logits = logits.view(nt, tile, G, N).float()
        logits = logits.masked_fill(~expert_mask[ts][:, None, None, :], float("-inf"))
        w = torch.softmax(logits, dim=-1)                                           # [nt, tile, G, N] fp32
    # u[t, j, n, :] = w[t, j, n] * h[t]: folding the router into h makes the expand a single matmul per tile.
    u = w[:, :, :g_eff, :, None].to(h.dtype) * h[:, :, None, None, :]              # [nt, tile, g_eff, N, r]
    Bt = B[ts].reshape(nt, N * r, d_out)                                            # [nt, N*r, d_out] (gather)
    full = torch.bmm(u.reshape(nt, tile * g_eff, N * r), Bt)                        # [nt, tile*g_eff, d_out]
    if g_eff == 1:
        delta = full
    else:   # each output channel k keeps the row of its own routing group k // (d_out // g_slot)
        full = full.view(nt, tile, g_eff, d_out)
        group_of = torch.arange(d_out, device=xt.device)[None, :] // (d_out // groups[ts])[:, None]  # [nt, d_out]
        delta = full.gather(2, group_of[:, None, None, :].expand(nt, tile, 1, d_out)).squeeze(2)
    return delta * scaling[ts].to(delta.dtype)[:, None, None], w                   # [nt, tile, d_out]



# -- the per-step plan and the fused per-slot path ---------------------------------------------------------------
class _SlotPack:
    """One slot's weights for the sites sharing one input: W = [A_site1; R_site1; A_site2; ...] stacked on the
    output dim (one shrink matmul), then per site (site index, offset of A rows, r, offset of router rows, N, g,
    B as [N*r, d_out] contiguous (or [g, N*r, d_out/g] split by channel group), scaling, group index [d_out] for
    groups that do not divide d_out, else None)."""

    def __init__(self, W: torch.Tensor, parts: list[tuple]):
        self.W, self.parts = W, parts


def _pack_slot(bufs: list[tuple[int, "_SiteBuffers"]], slot: int) -> _SlotPack | None:
    rows, parts, off = [], [], 0
    for i, buf in bufs:
        if slot not in buf.users:
            continue
        r, N, g = buf.dims[slot]
        rows.append(buf.A[slot, :r])
        a_off, off = off, off + r
        r_off = -1
        if N > 1:
            rows.append(buf.R[slot, :g, :N].reshape(g * N, -1))
            r_off, off = off, off + g * N
        d_out = buf.B.shape[3]
        Bm = buf.B[slot, :N, :r].reshape(N * r, d_out).contiguous()
        group_of = None
        if g > 1 and d_out % g == 0:   # channel group j only needs B's columns of group j: [g, N*r, d_out/g]
            Bm = Bm.view(N * r, g, d_out // g).transpose(0, 1).contiguous()
        elif g > 1:
            group_of = (torch.arange(d_out, device=Bm.device) // (d_out // g)).clamp_max(g - 1)
        parts.append((i, a_off, r, r_off, N, g, Bm, float(buf.scaling[slot]), group_of))
    if not parts:
        return None
    return _SlotPack(torch.cat(rows).contiguous(), parts)


def _pack_delta(hz: torch.Tensor, part: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hz: [n, rows of the pack] (x @ W^T). Returns (delta [n, d_out] in hz.dtype, routing weights [n, g, N] fp32
    or None for N == 1)."""
    _, a_off, r, r_off, N, g, Bm, scaling, group_of = part
    h = hz[:, a_off:a_off + r]                                                      # [n, r]
    n = h.shape[0]
    if N == 1:
        return torch.mm(h * scaling, Bm), None                                      # [n, d_out]
    w = torch.softmax(hz[:, r_off:r_off + g * N].float().view(n, g, N), dim=-1)    # [n, g, N] fp32
    u = (w * scaling).to(h.dtype)[:, :, :, None] * h[:, None, None, :]             # [n, g, N, r]
    if g > 1 and Bm.dim() == 3:   # per group: [g, n, N*r] @ [g, N*r, d_out/g] -> [n, g * d_out/g]
        return torch.bmm(u.view(n, g, N * r).transpose(0, 1), Bm).transpose(0, 1).reshape(n, -1), w
    full = torch.mm(u.view(n * g, N * r), Bm)                                       # [n*g, d_out]
    if g == 1:
        return full, w
    full = full.view(n, g, -1)
    return full.gather(1, group_of.expand(n, 1, -1)).squeeze(1), w                 # own group per channel


# -- the stacked slots --------------------------------------------------------------------------------------------
class _SiteBuffers:
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

    def live_dims(self) -> tuple[int, int, int]:
        """(r, N, g) maxima over the loaded slots: the torch path trims the padding beyond them."""
        return tuple(max(d[i] for d in self.dims.values()) for i in range(3))

    def tensors(self) -> tuple:
        return self.A, self.B, self.R, self.expert_mask, self.groups, self.scaling

    def clear(self, slot: int) -> None:
        for t in (self.A, self.B, self.R, self.expert_mask, self.scaling, self.used, self.nexp):
            t[slot] = 0
        self.groups[slot] = 1
        self.users.discard(slot)
        self.dims.pop(slot, None)


class AdapterSlots:
    """Preallocated adapter slots for a LLaMA-architecture base; one batched op per site per layer."""

    def __init__(self, model_config, max_adapters: int, max_rank: int = 16, max_experts: int = 16,
                 max_groups: int = 4, dtype=torch.float32, device="cpu"):
        for name, value in (("max_adapters", max_adapters), ("max_rank", max_rank),
                            ("max_experts", max_experts), ("max_groups", max_groups)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}", field=name)
        self.model_config = model_config
        self.num_layers = model_config.num_hidden_layers
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self.max_experts, self.max_groups = max_experts, max_groups
        self.dtype, self.device = dtype, torch.device(device)
        self._sites: dict[tuple[int, str], _SiteBuffers] = {}
        self._configs: dict[int, AdapterConfig] = {}
        self._packs: dict[tuple, _SlotPack | None] = {}                           # (layer, sites, slot) -> pack
        self.row_tile = 0              # batch-invariant mode: each slot's rows padded to a multiple (invariant.py)

    # -- loading -------------------------------------------------------------------------------------------------
    def _check_limits(self, slot: int, config: AdapterConfig) -> dict[str, int]:
        """Validate slot and sizes against the preallocated maxima; returns g per site."""
        if not 0 <= slot < self.max_adapters:
            raise AdapterLoadError(f"slot {slot} is out of range: this server has max_adapters "
                                   f"{self.max_adapters} (slots 0..{self.max_adapters - 1})")
        for field, value, limit in (("rank", config.rank, self.max_rank),
                                    ("num_experts", config.num_experts, self.max_experts)):
            if value > limit:
                raise AdapterLoadError(f"adapter {field} {value} exceeds the server's maximum {limit} "
                                       f"(raise max_{'rank' if field == 'rank' else 'experts'})")
        groups = {}
        for site in config.sites():
            try:
                g = config.groups_for(site_dims(self.model_config, site)[1])
            except ConfigError as exc:
                raise AdapterLoadError(f"routing_group_size: {exc}") from None
            if g > self.max_groups:
                raise AdapterLoadError(f"adapter routing groups (g) {g} at site {site} exceed the server's "
                                       f"maximum max_groups {self.max_groups} (field routing_group_size)")
            groups[site] = g
        return groups

    def _check_tensors(self, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
        expected = expected_shapes(self.model_config, config)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise AdapterLoadError(f"adapter tensors do not match the base model: missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]}")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise AdapterLoadError(f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
            if not torch.isfinite(tensors[name]).all():
                raise AdapterLoadError(f"tensor {name} contains NaN or Inf")

    def _site(self, layer: int, site: str) -> _SiteBuffers:
        key = (layer, site)
        if key not in self._sites:   # lazily, but for every slot at once: later loads never reallocate
            d_in, d_out = site_dims(self.model_config, site)
            self._sites[key] = _SiteBuffers(self.max_adapters, self.max_rank, self.max_experts, self.max_groups,
                                            d_in, d_out, self.dtype, self.device)
            log.debug("allocated adapter buffers for layers.%d.%s", layer, site)
        return self._sites[key]

    def check(self, config: AdapterConfig, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Would this adapter fit a slot? (AdapterLoadError naming the limit or tensor; writes nothing)."""
        self._check_limits(0, config)
        if tensors is not None:
            self._check_tensors(config, tensors)

    def load(self, slot: int, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
        """Write an adapter into `slot` (replacing what was there). Everything is checked before any write."""
        groups = self._check_limits(slot, config)
        self._check_tensors(config, tensors)
        self.clear(slot)
        r, N = config.rank, config.num_experts
        with torch.no_grad():
            for layer in range(self.num_layers):
                for site, g in groups.items():
                    buf, prefix = self._site(layer, site), f"layers.{layer}.{site}"
                    buf.A[slot, :r] = tensors[f"{prefix}.lora_A"].to(self.device, self.dtype)      # [r, d_in]
                    lora_b = tensors[f"{prefix}.lora_B"].to(self.device, self.dtype)              # [N, d_out, r]
                    buf.B[slot, :N, :r] = lora_b.transpose(1, 2)
                    if config.has_router:   # native router rows are group-major: [g*N, d_in] -> [g, N, d_in]
                        router = tensors[f"{prefix}.router"].to(self.device, self.dtype)
                        buf.R[slot, :g, :N] = router.view(g, N, -1)
                    buf.expert_mask[slot, :N] = True
                    buf.groups[slot] = g
                    buf.scaling[slot] = config.scaling
                    buf.used[slot] = True
                    buf.nexp[slot] = N
                    buf.users.add(slot)
                    buf.dims[slot] = (r, N, g)
        self._configs[slot] = config
        log.info("loaded %s adapter into slot %d (r=%d, N=%d, sites=%s)", config.method, slot, r, N,
                 ",".join(groups))

    def clear(self, slot: int) -> None:
        """Zero the slot in every allocated site; buffers stay allocated."""
        if not 0 <= slot < self.max_adapters:
            raise AdapterLoadError(f"slot {slot} is out of range 0..{self.max_adapters - 1}")
        with torch.no_grad():
            for buf in self._sites.values():
                buf.clear(slot)
        self._configs.pop(slot, None)
        # A pack holds one slot's rows only: the other slots' packs stay valid (adapter swaps rebuild one slot's).
        self._packs = {key: pack for key, pack in self._packs.items() if key[-1] != slot}

    def active_sites(self, layer: int) -> list[str]:
        return [site for site in SITES if (layer, site) in self._sites and self._sites[(layer, site)].users]

    def buffers(self, layer: int, site: str) -> tuple | None:
        """(A, B, R, expert_mask, groups, scaling) of an allocated site, else None (tests, kernels)."""
        buf = self._sites.get((layer, site))
        return None if buf is None else buf.tensors()

    # -- the op --------------------------------------------------------------------------------------------------
    def apply(self, layer: int, site: str, x: torch.Tensor, slot_idx: torch.Tensor,
              stats: RoutingStats | None = None) -> torch.Tensor | None:
        """x: [T, d_in], slot_idx: [T] long -> delta [T, d_out] in x.dtype, or None if no adapter uses the site."""
        buf = self._sites.get((layer, site))
        if buf is None or not buf.users:
            return None
        slot_idx = slot_idx.to(x.device).long()
        # Tokens whose adapter does not adapt this site count as base tokens here (and stay out of the stats).
        eff = torch.where((slot_idx >= 0) & buf.used[slot_idx.clamp_min(0)], slot_idx, -1)   # [T]
        if x.is_cuda:
            from . import triton_molora
            if triton_molora.available():   # full padded sizes: constexprs never change, so no recompiles
                return triton_molora.molora_triton(x, eff, *buf.tensors(), stats=stats)
        return molora_torch(x, eff, *buf.tensors(), stats=stats, dims=buf.live_dims())

    def apply_shared(self, layer: int, x: torch.Tensor, targets: list[tuple[str, torch.Tensor]],
                     slot_idx: torch.Tensor, stats: RoutingStats | None = None,
                     plan: SlotPlan | None = None) -> None:
        """Add the deltas of several sites that all read `x` [T, d_in], in place: targets = [(site, out [T, d_out])]
        (out may be a column slice of a fused projection output). Same math as `apply` per site; with a plan on
        CPU all sites are fused per slot into one shrink matmul, otherwise this is one `apply` per site."""
        if plan is not None and x.is_cuda and self._triton():
            self._apply_triton(layer, x, targets, plan, stats)
            return
        if plan is None or x.is_cuda:
            for site, out in targets:
                delta = self.apply(layer, site, x, slot_idx, stats)
                if delta is not None:
                    out += delta.to(out.dtype)
            return
        bufs = [(i, self._sites.get((layer, site))) for i, (site, _) in enumerate(targets)]
        bufs = [(i, b) for i, b in bufs if b is not None and b.users]
        if not bufs:
            return
        key_sites = tuple(targets[i][0] for i, _ in bufs)
        for slot, rows in plan.groups.items():
            key = (layer, key_sites, slot)
            if key not in self._packs:
                self._packs[key] = _pack_slot(bufs, slot)
            pack = self._packs[key]
            if pack is None:                                                        # slot adapts none of these
                continue
            contiguous = isinstance(rows, slice)
            xs = x[rows] if contiguous else x.index_select(0, rows)
            n = xs.shape[0]
            hz = F.linear(pad_rows(xs, self.row_tile).to(pack.W.dtype), pack.W)    # [n (+ pad), sum(r + g*N)]
            for part in pack.parts:
                delta, w = _pack_delta(hz, part)
                delta, w = delta[:n], (None if w is None else w[:n])
                out = targets[part[0]][1]
                if contiguous:
                    out[rows] += delta.to(out.dtype)
                else:
                    out.index_add_(0, rows, delta.to(out.dtype))
                if stats is not None:
                    buf = bufs[[i for i, _ in bufs].index(part[0])][1]
                    N, g = part[4], part[5]
                    if w is None:
                        w = torch.ones(n, g, 1, device=x.device)
                    w = F.pad(w, (0, buf.expert_mask.shape[1] - N))
                    stats.record(torch.full((n,), slot, dtype=torch.long, device=x.device), w, buf.groups,
                                 buf.expert_mask)

    @staticmethod
    def _triton() -> bool:
        from . import triton_molora
        return triton_molora.available()

    def _apply_triton(self, layer: int, x: torch.Tensor, targets: list[tuple[str, torch.Tensor]],
                      plan: SlotPlan, stats: RoutingStats | None) -> None:
        """CUDA: each site's delta added in place by the Triton kernels, tile metadata from the step's plan (built
        once per step): nothing here synchronises with the host, so a CUDA graph can capture it."""
        from . import triton_molora
        cfg = triton_molora.tile_config(plan.T, self.dtype)
        tiles = plan.tiles(cfg.bt, self.max_adapters)
        for site, out in targets:
            buf = self._sites.get((layer, site))
            if buf is None or not buf.users:
                continue
            triton_molora.molora_add_(x, tiles, buf.A, buf.B, buf.R, buf.nexp, buf.groups, buf.scaling, out, cfg,
                                      stats=stats, expert_mask=buf.expert_mask)
