"""Compiled decode: decode-only steps run from static buffers at bucketed batch sizes.

Contract:
- `DecodeGraphs(model, pool, adapters, max_num_seqs, max_model_len, mode)` with mode "compile" (CPU: the per-layer
  static-shape step compiled by `torch.compile`, inductor, `dynamic=False`), "cudagraph" (CUDA: the whole step
  captured once per (batch bucket, context bucket, adapter layout) and replayed) or "static" (the same static-shape
  step run eagerly: what a CUDA graph replays, used by tests and as the CPU fallback).
  `resolve_mode(EngineArgs.decode_graphs, device, enforce_eager, batch_invariant)` picks the mode (None: the
  runner gets no DecodeGraphs and every step is eager; `--enforce-eager` always gives None).
- `run(chunks, logit_positions) -> logits [n, V] fp32 | None`: None when the step is not a plain decode step this
  object serves (a chunk longer than one token, wanted logits other than the one decode position, more sequences
  than the largest bucket, a context longer than max_model_len); the caller then runs the eager forward. Rows come
  back in chunk order. Prefill always stays eager.
- Batch buckets: 1, 2, 4, ... up to max_num_seqs (which is itself the last bucket). A step of n sequences runs at
  the smallest bucket >= n; padding rows read token 0 at position 0, write their K/V to the pool's `scratch_slot`
  (outside every block), attend to that slot only, carry no adapter, and their logits are dropped.
- Attention is static-shape: each row's K/V are gathered from the paged pool by a slot table [Bb, Kw] padded with
  the scratch slot and masked by length. On CUDA Kw is a power-of-two context bucket (>= 64, so a graph serves
  many lengths); on CPU Kw is the step's exact longest context (nothing is captured there, and padding would only
  add work): the KV write, gather and attention run eagerly between the two compiled halves of each layer.
- Adapters use a static-shape token-gather formulation (BGMV, as vLLM's punica): each row gathers its own slot's
  A / B / router rows and the site delta is three batched matmuls; equal to the stacked-layout reference
  (tests/unit/molora_stacked.molora_reference, itself checked against mtlora.adapters). The work is sized by
  the per-site (r, N, g) high-water marks of the adapters loaded (`AdapterSlots.layout()`), so loading a smaller
  adapter or unloading one never changes shapes; slot buffers are written in place by load / clear and
  never reallocated, so graphs see new adapters without recapture. Every allocated site stays in the layout
  (sites are never freed, so the layout only grows); only a newly allocated site or larger dims change the layout
  key: one new capture / compile per bucket. Steps whose rows carry no adapter use a layout without adapter work.
  Compile mode allows `RECOMPILES_PER_BUCKET` variants per bucket; past that dynamo runs the extra variants
  eagerly (same numbers, with its own warning).
- Why per-layer compilation on CPU: every layer has the same shapes, so inductor compiles one graph per (bucket,
  layout) and all layers reuse it (compile cost of one layer, not of the whole model), and keeping the paged KV
  write / gather out of the compiled region avoids input-mutation copies of the whole cache.
- Why CPU "auto" is plain eager (CPU_AUTO, measurements beside it): neither the compiled nor the static step was
  faster than the eager forward on the CPU measured, compile costs 20-35 s per bucket, and the token-gather adapter
  path is slower than the eager per-slot path (lora_ops.apply_shared) on CPU, where each row's gathered B matrices
  cost memory bandwidth. On CUDA the gather is cheap next to launch overhead, which the graphs remove.
- Routing statistics samples (`stats`), kept hidden states and batch-invariant mode always run eagerly.
- Outside compile mode the step uses the model's fused row kernels when it has them (`LlamaDecoder.fused`: on
  CUDA triton_fused.py's RMSNorm / silu * up / rope) and its decode attention (on CUDA triton_attention.py, the
  paged pool read in place), so a captured graph holds those kernels instead of the torch op chains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mtlora.errors import ConfigError
from mtlora.sites import ATTN_IN, MLP_IN, SITES

from .model import apply_rope, rms_norm

log = logging.getLogger(__name__)

MIN_CTX_BUCKET = 64
RECOMPILES_PER_BUCKET = 6          # compile mode: (no adapters, adapter layouts as they grow) per batch bucket
ATTN_SITES = tuple(s.name for s in SITES if s.reads == ATTN_IN)   # sites reading the attention input (mtlora.sites)
MLP_SITES = tuple(s.name for s in SITES if s.reads == MLP_IN)     # sites reading the MLP input


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Powers of two below max_num_seqs, then max_num_seqs itself."""
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    return out + [max_num_seqs]


def context_bucket(kv_len: int, max_len: int) -> int:
    """The smallest power of two >= kv_len (at least MIN_CTX_BUCKET), capped at max_len."""
    return min(max(MIN_CTX_BUCKET, 1 << (kv_len - 1).bit_length()), max_len)


def resolve_mode(requested: str, device: torch.device, enforce_eager: bool, batch_invariant: bool) -> str | None:
    """The mode EngineArgs ask for, or None (every step eager). "auto": CUDA graphs on CUDA; on CPU plain eager
    (CPU_AUTO), because compiled decode measured slower than eager there (see CPU_AUTO). Batch-invariant mode has
    its own padded numerics (invariant.py), so it always runs eager."""
    if enforce_eager or batch_invariant:
        return None
    if requested == "auto":
        return "cudagraph" if device.type == "cuda" else CPU_AUTO
    if requested == "cudagraph" and device.type != "cuda":
        raise ConfigError("decode_graphs 'cudagraph' needs a CUDA device", field="decode_graphs")
    return requested


# Preliminary (noisy shared 2-core avx512_bf16 CPU, SmolLM2-135M bf16, 1 thread, interleaved medians of 7): eager
# step / compiled step = 0.85x (B=1), 0.85x (8), 0.91x (32), 0.90x (64), with 21-35 s of inductor compile per batch
# bucket and layout; static buffers run eagerly = 1.04x, 1.01x, 0.96x, 0.95x (noise). Neither is faster, so CPU
# "auto" stays eager; "compile" / "static" remain selectable for measurement (--decode-graphs).
CPU_AUTO = None


# -- the static-shape adapter op ------------------------------------------------------------------------------------
def bgmv_delta(x: torch.Tensor, row_slot: torch.Tensor, row_on: torch.Tensor, site: tuple) -> torch.Tensor:
    """Adapter delta of one site for one token per row. x: [B, d_in]; row_slot: [B] long (>= 0, padding rows and
    base rows point at any slot); row_on: [B] bool (the row has an adapter); site = (A [S, r, d_in],
    B [S, N, r, d_out], R [S, G, N, d_in], expert_mask [S, N], groups [S], scaling [S], used [S]) trimmed to the
    layout's (r, N, G). Returns [B, d_out] in x.dtype; zero where the row's adapter does not adapt this site."""
    A, Bw, R, emask, groups, scaling, used = site
    rows, d_in = x.shape
    r, N, G, d_out = A.shape[1], Bw.shape[1], R.shape[1], Bw.shape[3]
    on = row_on & used[row_slot]                                                    # [B]
    xa = x.to(A.dtype)
    h = torch.bmm(A[row_slot], xa[:, :, None]).squeeze(-1)                          # [B, r]
    if N == 1:
        w = torch.ones(rows, G, 1, dtype=torch.float32, device=x.device)
    else:
        logits = torch.bmm(R[row_slot].reshape(rows, G * N, d_in), xa[:, :, None]).view(rows, G, N).float()
        keep = emask[row_slot] | ~on[:, None]                                       # off rows: no all -inf row
        w = torch.softmax(logits.masked_fill(~keep[:, None, :], float("-inf")), dim=-1)   # [B, G, N] fp32
    w = w * scaling[row_slot][:, None, None]
    u = w.to(h.dtype)[:, :, :, None] * h[:, None, None, :]                         # [B, G, N, r]
    full = torch.bmm(u.reshape(rows, G, N * r), Bw[row_slot].reshape(rows, N * r, d_out))   # [B, G, d_out]
    if G == 1:
        delta = full[:, 0]
    else:   # each output channel k keeps its own routing group's row: k // (d_out // g)
        group_of = torch.arange(d_out, device=x.device)[None, :] // (d_out // groups[row_slot])[:, None]
        delta = full.gather(1, group_of.clamp_max(G - 1)[:, None, :]).squeeze(1)    # [B, d_out]
    return torch.where(on[:, None], delta, torch.zeros((), dtype=delta.dtype, device=x.device)).to(x.dtype)


def _add_sites(ads: dict, x, targets: list[tuple[str, torch.Tensor]], row_slot, row_on) -> None:
    for site, out in targets:
        if site in ads:
            out += bgmv_delta(x, row_slot, row_on, ads[site]).to(out.dtype)


# -- the static step ------------------------------------------------------------------------------------------------
@dataclass
class StaticInputs:
    """Preallocated step inputs for the largest bucket; a bucket uses the leading rows / columns (fixed
    addresses, which is what CUDA graphs need)."""

    input_ids: torch.Tensor       # [Bmax] long
    positions: torch.Tensor       # [Bmax] long
    slot_mapping: torch.Tensor    # [Bmax] long: flat KV slot each row writes (padding: scratch)
    kv_slots: torch.Tensor        # [Bmax, Kmax] long: flat KV slots each row reads (padding: scratch)
    kv_len: torch.Tensor          # [Bmax] long (padding rows: 1)
    row_slot: torch.Tensor        # [Bmax] long: adapter slot clamped to >= 0
    row_on: torch.Tensor          # [Bmax] bool: the row has an adapter

    @classmethod
    def allocate(cls, rows: int, ctx: int, device) -> "StaticInputs":
        z = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=device)   # noqa: E731
        return cls(z(rows), z(rows), z(rows), z(rows, ctx), z(rows), z(rows),
                   torch.zeros(rows, dtype=torch.bool, device=device))


class StaticDecoder:
    """The decode step of `LlamaDecoder` written with static shapes only (no host syncs, no data-dependent
    shapes), split per layer into `pre` (norm, qkv, adapters, rope) and `post` (o_proj, MLP, adapters)."""

    def __init__(self, model, fused: bool = True):
        self.model, cfg = model, model.cfg
        # the model's fused row kernels (triton_fused on CUDA) where the step is not traced by dynamo
        self.fused = model.fused if fused else None
        self.H, self.KV, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size, self.eps = model.q_size, model.kv_size, cfg.rms_norm_eps
        self.F = cfg.intermediate_size

    def pre(self, h, w: dict, cos, sin, ads: dict, row_slot, row_on):
        """h: [B, d] -> q [B, H, hd], k / v [B, KV, hd], the block-level self_attn delta [B, d] (or None)."""
        x = self._norm(h, w["in_norm"])
        qkv = F.linear(x, w["qkv"])                                                 # [B, q + 2kv]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        _add_sites(ads, x, [("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v)],
                   row_slot, row_on)
        blk = bgmv_delta(x, row_slot, row_on, ads["self_attn"]) if "self_attn" in ads else None
        B = h.shape[0]
        q, k = q.reshape(B, self.H, self.hd), k.reshape(B, self.KV, self.hd)
        if self.fused is not None:                                                  # in place, in qkv
            q, k = self.fused.rope_(q, cos, sin), self.fused.rope_(k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v.reshape(B, self.KV, self.hd), blk

    def _norm(self, h, weight):
        return self.fused.rms_norm(h, weight, self.eps) if self.fused is not None else rms_norm(h, weight, self.eps)

    def post(self, h, attn, w: dict, blk, ads: dict, row_slot, row_on):
        """h: [B, d] residual, attn: [B, H*hd] -> the layer's output hidden state [B, d]."""
        o = F.linear(attn, w["o"])
        _add_sites(ads, attn, [("self_attn.o_proj", o)], row_slot, row_on)
        h = h + (o if blk is None else o + blk)
        x = self._norm(h, w["post_norm"])
        gu = F.linear(x, w["gate_up"])                                              # [B, 2F]
        gate, up = gu.split([self.F, self.F], dim=-1)
        _add_sites(ads, x, [("mlp.gate_proj", gate), ("mlp.up_proj", up)], row_slot, row_on)
        act = self.fused.silu_mul(gu) if self.fused is not None else F.silu(gate) * up   # [B, F]
        out = F.linear(act, w["down"])
        _add_sites(ads, act, [("mlp.down_proj", out)], row_slot, row_on)
        if "mlp" in ads:
            out = out + bgmv_delta(x, row_slot, row_on, ads["mlp"])
        return h + out

    def attend(self, idx: int, q, k, v, kv, slot_mapping, kv_slots, mask):
        """Write this step's K/V, attend over the rows' contexts (LlamaDecoder.decode_attention: gathered into
        [KV, B, Kw, hd], or read in place by the CPU paged kernel when the model has it)."""
        kv.write(idx, slot_mapping, k, v)
        return self.model.decode_attention(idx, q, kv, kv_slots, mask)              # [B, H*hd]

    def head(self, h):
        h = self._norm(h, self.model.final_norm)
        return F.linear(h, self.model.lm_head).float()                              # [B, V]


# -- the per-bucket runner -----------------------------------------------------------------------------------------
class DecodeGraphs:
    """Owns the static inputs, the adapter layout and one callable per bucket (see the module docstring)."""

    def __init__(self, model, pool, adapters, max_num_seqs: int, max_model_len: int, mode: str):
        if mode not in ("compile", "cudagraph", "static"):
            raise ValueError(f"unknown decode graph mode {mode!r}")
        if mode == "cudagraph" and model.device.type != "cuda":
            raise ConfigError("decode_graphs 'cudagraph' needs a CUDA device", field="decode_graphs")
        self.model, self.pool, self.adapters, self.mode = model, pool, adapters, mode
        self.device = model.device
        self.buckets = batch_buckets(max_num_seqs)
        self.max_len = min(max_model_len, model.cos.shape[0])
        self.inp = StaticInputs.allocate(self.buckets[-1], self.max_len, self.device)
        self.dec = StaticDecoder(model, fused=mode != "compile")
        self._version = -1
        self._high: dict[tuple[int, str], tuple[int, int, int]] = {}   # (layer, site) -> (r, N, g) high-water
        self._ads: list[dict] = [{} for _ in model.layers]              # per layer: site -> trimmed tensors
        self._layout_key: tuple = ()
        self._graphs: dict[tuple, tuple] = {}                           # cudagraph: key -> (graph, logits out)
        self._pool_handle = None
        if mode == "compile":
            self._pre = torch.compile(self.dec.pre, dynamic=False, fullgraph=True)
            self._post = torch.compile(self.dec.post, dynamic=False, fullgraph=True)
        else:
            self._pre, self._post = self.dec.pre, self.dec.post
        log.info("decode graphs: mode %s, batch buckets %s", mode, self.buckets)

    # -- adapter layout ----------------------------------------------------------------------------------------
    def _refresh_adapters(self) -> None:
        """Re-read the adapter layout after a load / clear; views of the fixed slot buffers, trimmed to the
        high-water (r, N, g) per site so later smaller adapters reuse the same shapes."""
        if self.adapters is None or self.adapters.version == self._version:
            return
        self._version = self.adapters.version
        layout = self.adapters.layout()
        for key, dims in layout.items():
            old = self._high.get(key, (0, 0, 0))
            self._high[key] = tuple(max(a, b) for a, b in zip(old, dims))
        ads: list[dict] = [{} for _ in self.model.layers]
        for (layer, site) in layout:
            r, N, G = self._high[(layer, site)]
            A, B, R, emask, groups, scaling = self.adapters.buffers(layer, site)
            ads[layer][site] = (A[:, :r], B[:, :N, :r], R[:, :G, :N], emask[:, :N], groups, scaling,
                                self.adapters.used(layer, site))
        self._ads = ads
        self._layout_key = tuple(sorted((k, self._high[k]) for k in layout))

    # -- one step ----------------------------------------------------------------------------------------------
    def run(self, chunks, logit_positions) -> torch.Tensor | None:
        """Logits [n, V] fp32 of a decode-only step in chunk order, or None (not served: run eager)."""
        n = len(chunks)
        if n == 0 or n > self.buckets[-1]:
            return None
        for c, wanted in zip(chunks, logit_positions):
            if c.length != 1 or list(wanted) != [c.start] or c.start + 1 > self.max_len:
                return None
        Bb = next(b for b in self.buckets if b >= n)
        kmax = max(c.start for c in chunks) + 1
        Kw = context_bucket(kmax, self.max_len) if self.mode == "cudagraph" else kmax
        self._fill(chunks, Bb, Kw)
        self._refresh_adapters()
        any_adapter = any(c.seq.adapter_slot >= 0 for c in chunks)
        ads = self._ads if any_adapter else [{} for _ in self._ads]
        if self.mode == "cudagraph":
            return self._replay(Bb, Kw, any_adapter, ads)[:n]
        if self.mode == "compile":      # one code object serves all buckets and layouts: allow their variants
            with torch._dynamo.config.patch(recompile_limit=RECOMPILES_PER_BUCKET * len(self.buckets)):
                return self._step(Bb, Kw, ads)[:n]
        return self._step(Bb, Kw, ads)[:n]

    def _fill(self, chunks, Bb: int, Kw: int) -> None:
        """Write the step into the leading [Bb] rows / [Kw] columns of the static inputs (padding rows too)."""
        bs, scratch, n = self.pool.block_size, self.pool.scratch_slot, len(chunks)
        pos = torch.tensor([c.start for c in chunks], dtype=torch.long)                       # [n]
        nblk = -(-Kw // bs)
        tables = torch.zeros(n, nblk, dtype=torch.long)
        for i, c in enumerate(chunks):
            blocks = c.seq.blocks[: -(-(c.start + 1) // bs)]
            tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        kj = torch.arange(Kw)
        slots = tables[:, kj // bs] * bs + kj % bs                                           # [n, Kw]
        slots = torch.where(kj[None, :] <= pos[:, None], slots, scratch)
        slot_of = torch.tensor([c.seq.adapter_slot for c in chunks], dtype=torch.long)
        host = StaticInputs.allocate(Bb, Kw, "cpu")
        host.kv_slots.fill_(scratch)
        host.slot_mapping.fill_(scratch)
        host.kv_len.fill_(1)
        host.input_ids[:n] = torch.tensor([c.seq.token_ids[c.start] for c in chunks], dtype=torch.long)
        host.positions[:n] = pos
        host.slot_mapping[:n] = slots[torch.arange(n), pos]
        host.kv_slots[:n] = slots
        host.kv_len[:n] = pos + 1
        host.row_slot[:n] = slot_of.clamp_min(0)
        host.row_on[:n] = slot_of >= 0
        for name in ("input_ids", "positions", "slot_mapping", "kv_len", "row_slot", "row_on"):
            getattr(self.inp, name)[:Bb].copy_(getattr(host, name), non_blocking=True)
        self.inp.kv_slots[:Bb, :Kw].copy_(host.kv_slots, non_blocking=True)

    def _step(self, Bb: int, Kw: int, ads: list[dict]) -> torch.Tensor:
        """The static-shape step over the leading Bb rows: logits [Bb, V] fp32. Everything here reads the static
        inputs only, so it can be captured as a CUDA graph."""
        inp, m = self.inp, self.model
        ids, positions = inp.input_ids[:Bb], inp.positions[:Bb]
        slot_mapping, kv_slots = inp.slot_mapping[:Bb], inp.kv_slots[:Bb, :Kw]
        row_slot, row_on = inp.row_slot[:Bb], inp.row_on[:Bb]
        mask = (torch.arange(Kw, device=self.device)[None, :] < inp.kv_len[:Bb, None])[:, None, None, :]
        h = F.embedding(ids, m.embed)                                                        # [Bb, d]
        cos, sin = m.cos[positions], m.sin[positions]                                        # [Bb, hd]
        for idx, w in enumerate(m.layers):
            q, k, v, blk = self._pre(h, w, cos, sin, ads[idx], row_slot, row_on)
            attn = self.dec.attend(idx, q, k, v, self.pool, slot_mapping, kv_slots, mask)
            h = self._post(h, attn, w, blk, ads[idx], row_slot, row_on)
        return self.dec.head(h)

    def _replay(self, Bb: int, Kw: int, any_adapter: bool, ads: list[dict]) -> torch.Tensor:
        """CUDA: capture the step for (bucket, context bucket, adapter layout) once, then replay it."""
        key = (Bb, Kw, self._layout_key if any_adapter else None)
        if key not in self._graphs:
            self._graphs[key] = self._capture(Bb, Kw, ads)
        graph, out = self._graphs[key]
        graph.replay()
        return out.clone()

    def _capture(self, Bb: int, Kw: int, ads: list[dict]) -> tuple:
        if self._pool_handle is None:
            self._pool_handle = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):               # warm up (allocator, cuBLAS handles) off the capture
            self._step(Bb, Kw, ads)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool_handle):
            out = self._step(Bb, Kw, ads)
        log.info("captured decode graph: batch %d, context %d, %d graphs", Bb, Kw, len(self._graphs) + 1)
        return graph, out
