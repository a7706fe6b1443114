"""A compact LLaMA decoder for serving: flattened token batches, paged KV cache, per-token adapter slots.

Contract:
- `ModelConfig.from_dir(path)` reads a Hugging Face `config.json` through `mtlora.base` (`load_config`,
  `rope_parameters`: one reader for the whole project) and keeps what the decoder supports (LLaMA architecture: GQA,
  RMSNorm, SiLU MLP, RoPE with default / linear / dynamic / llama3 scaling, tied or separate lm_head); anything
  else raises `ConfigError` (or base's `CheckpointError`) naming the field.
- `LlamaDecoder.from_dir(path, dtype, device)` reads the weights through `mtlora.base.load_state_dict` (single file,
  or the shards a `model.safetensors.index.json` names), fusing q/k/v into one weight and gate/up into another at
  load time in the column order `mtlora.sites.FUSED` defines (two matmuls fewer per layer); adapter deltas of
  those projections are added into column views of the fused output (`mtlora.sites.fused_columns`).
- `LlamaDecoder.forward(batch, kv, adapters) -> ForwardOutput` runs one engine step over a flattened token batch
  `[T]` (prefill chunks and decode tokens of many sequences together) and returns, as a value, fp32 logits only at
  `batch.logits_index` (then for `batch.extra_hidden`) and the final hidden states at `batch.hidden_index`.
- Attention is a few batched computations per layer: the step's decodes (one query each, two matmuls) and its
  prefill chunks by class of query length (queries scattered into `[B, Qmax]`, SDPA with a causal + length mask),
  K/V gathered from the paged pool by block table into `[B, Kmax]`; there is no Python loop over sequences.
  `enable_paged_kernel()` makes decode attention read K/V in place instead (CPU: cpu_attention.py's C++ kernel;
  CUDA: triton_attention.py; no dense copy, each parity-tested against the gather path; the core decides).
- Batch-invariant mode (`enable_batch_invariance`, engine flag `batch_invariant`): token-row matmuls padded to the
  row tile probed on this machine and one attention computation for decodes and prefill chunks alike
  (`invariant.invariant_attention`), so a token's numbers do not depend on the rest of the step (invariant.py).
- `prepack_weights()` (bf16 on CPU, eager decode, not batch-invariant: the core decides) swaps the projection and
  lm_head weights for oneDNN-prepacked ones; `_linear` runs them through `mkldnn._linear_pointwise` (same bits).
- Numerics follow transformers' LlamaForCausalLM (RMSNorm in fp32, RoPE tables cast to the compute dtype), so fp32
  logits agree to ~1e-5. Dynamic-NTK RoPE: position p uses the frequencies HF would use for a sequence of length
  max(p + 1, max_position_embeddings), i.e. exactly what HF's cached decoding applies to each new token; this keeps
  cached keys valid and results independent of the batch (HF's prefill of a long prompt differs slightly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mtlora.base import load_config, load_state_dict, rope_parameters
from mtlora.errors import CheckpointError, ConfigError
from mtlora.sites import FUSED, FusedColumn, fused_columns, site_of_module

from . import cpu_attention, cpu_fused, invariant
from .cpu_kernel_path import AdaptCall

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
PREPACK_ROWS_HINT = 64       # rows oneDNN tunes a prepacked weight's layout for (a decode batch; any count works)
CALL_QKV, CALL_O, CALL_GATE_UP, CALL_DOWN = range(4)     # the decoder's adapter call sites (`adapt_calls`, `_adapt`)
CALL_SITES = ("self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj")   # each call's own site (into `out`)


@dataclass
class ModelConfig:
    """The architecture fields the decoder needs; attribute names match transformers' LlamaConfig."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, c, path: str = "config.json") -> "ModelConfig":
        """From a transformers LlamaConfig as `mtlora.base.load_config` returns it (model type and head arithmetic
        already checked there); RoPE through `mtlora.base.rope_parameters`; the decoder's own limits checked here,
        errors naming the field and `path`."""
        if getattr(c, "hidden_act", "silu") != "silu":
            raise ConfigError(f"only hidden_act 'silu' is supported, got {c.hidden_act!r}", field="hidden_act",
                              path=path)
        for key in ("attention_bias", "mlp_bias"):
            if getattr(c, key, False):
                raise ConfigError(f"{key}=true is not supported", field=key, path=path)
        rope = rope_parameters(c)
        theta = float(rope.pop("rope_theta", 10000.0))
        if rope["rope_type"] not in ROPE_TYPES:
            raise ConfigError(f"unsupported rope type {rope['rope_type']!r}; supported: {ROPE_TYPES}",
                              field="rope_scaling", path=path)
        heads = c.num_attention_heads
        eos = c.eos_token_id
        return cls(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                   num_hidden_layers=c.num_hidden_layers, num_attention_heads=heads,
                   num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   rms_norm_eps=float(c.rms_norm_eps), max_position_embeddings=int(c.max_position_embeddings),
                   tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)), rope_theta=theta,
                   rope_scaling=None if rope["rope_type"] == "default" else rope,
                   eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                   bos_token_id=c.bos_token_id)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        """The config.json of a model dir, read by `mtlora.base.load_config` (the one config reader)."""
        return cls.from_hf(load_config(model_dir), path=str(Path(model_dir) / "config.json"))


# -- RoPE --------------------------------------------------------------------------------------------------------
def _inv_freq(cfg: ModelConfig, base: float) -> torch.Tensor:
    dim = cfg.head_dim
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))          # [hd/2]


def _llama3_inv_freq(cfg: ModelConfig, s: dict) -> torch.Tensor:
    inv = _inv_freq(cfg, cfg.rope_theta)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    # Medium wavelengths interpolate smoothly between scaled and unscaled frequencies.
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, head_dim] fp32, in transformers' rotate-half layout."""
    s = cfg.rope_scaling or {"rope_type": "default"}
    pos = torch.arange(max_len, dtype=torch.float32)
    kind = s["rope_type"]
    if kind == "dynamic":
        # Per-position frequencies: p uses those of a sequence of length max(p + 1, original max).
        dim, orig, factor = cfg.head_dim, cfg.max_position_embeddings, s["factor"]
        seq = torch.clamp(pos + 1, min=orig).double()
        base = cfg.rope_theta * ((factor * seq / orig) - (factor - 1)) ** (dim / (dim - 2))       # [max_len]
        expo = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        inv = 1.0 / (base.float()[:, None] ** expo[None, :])                                       # [max_len, hd/2]
        freqs = pos[:, None] * inv
    else:
        inv = _llama3_inv_freq(cfg, s) if kind == "llama3" else _inv_freq(cfg, cfg.rope_theta)
        if kind == "linear":
            inv = inv / s["factor"]
        freqs = pos[:, None] * inv[None, :]                                                        # [max_len, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, hd]; cos/sin: [T, hd] (already in x's dtype)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers: normalise in fp32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


# -- batch description -------------------------------------------------------------------------------------------
@dataclass
class Scatter:
    """Where a prefill group's real queries go: flat token `rows` [n] and their index `padded_at` [n] in the
    group's [G * Qmax] padded layout."""

    rows: torch.Tensor            # [n] long
    padded_at: torch.Tensor       # [n] long


@dataclass
class AttnGroup:
    """Sequences of one step whose attention runs as one batched computation over G sequences.

    decode: one query per sequence; q_index [G] flat token of each (None: every token of the step, in order).
    prefill: q_index [G, Qmax] flat token per padded query (T = a zero pad row); `scatter` takes the real queries'
    outputs back to their flat tokens.
    """

    decode: bool
    q_index: torch.Tensor | None
    scatter: Scatter | None       # prefill only
    kv_slots: torch.Tensor        # [G, Kmax] long: flat KV slot of each key position (padding: slot 0, masked)
    mask: torch.Tensor            # [G, 1, Qmax or 1, Kmax] bool: True = may attend


@dataclass
class StepBatch:
    """One step's flattened token batch and the padded attention layout built from it (see runner.build_batch).

    T tokens from B sequences; sequence b's tokens are flat[q_start[b] : q_start[b] + q_len[b]].
    """

    input_ids: torch.Tensor       # [T] long
    positions: torch.Tensor       # [T] long
    slot_mapping: torch.Tensor    # [T] long: flat KV slot (block * block_size + offset) each token writes
    adapter_slots: torch.Tensor   # [T] long: adapter slot per token, -1 = bare base
    attn: list[AttnGroup]         # the step's decodes and its prefill chunks, each attended as one batch
    logits_index: torch.Tensor    # [L] long: flat tokens whose logits are wanted
    hidden_index: torch.Tensor | None = None   # [C] long: flat tokens whose final hidden states are kept
    extra_hidden: torch.Tensor | None = None   # [E, d]: hidden states from elsewhere whose logits follow the L rows
    any_adapter: bool = True      # False: every token is bare base, skip adapter ops entirely
    sites: frozenset | None = None  # adapter sites used by some token of this step (None: ask the slots)
    adapter_plan: object | None = None  # lora_ops.SlotPlan: token -> slot segmentation, built once per step


@dataclass
class ForwardOutput:
    """What one forward returns."""

    logits: torch.Tensor          # [L + E, V] fp32: rows of batch.logits_index, then of batch.extra_hidden
    hidden: torch.Tensor | None   # [C, d] final hidden states (pre-norm) at batch.hidden_index; None when not asked


@dataclass
class AdaptContext:
    """One layer's adapter context for `_adapt` (what every adapter site of the layer shares)."""

    adapters: object              # lora_ops.AdapterSlots (None when the step has no adapter)
    layer: int
    sites: frozenset | tuple      # the sites of this layer some token of the step uses
    slot_idx: torch.Tensor        # [T] long: adapter slot per token, -1 = bare base
    stats: object                 # RoutingStats to sample into, or None
    plan: object                  # lora_ops.SlotPlan of the step, or None
    bound: list | None = None     # this layer's bound kernel calls, one per AdaptCall (cpu_kernel_path.BoundStep)
    segs: torch.Tensor | None = None   # the step's kernel segments, passed to every bound call


class LlamaDecoder:
    """Plain-tensor LLaMA decoder (no nn.Module: weights are fixed at load, the engine never trains)."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device, max_len: int):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.embed = weights["embed"]                                       # [V, d]
        self.lm_head = weights.get("lm_head", self.embed)                   # [V, d] (tied: same tensor)
        self.final_norm = weights["norm"]
        self.layers = weights["layers"]                                     # list of dicts
        cos, sin = rope_tables(cfg, max_len)
        self.cos, self.sin = cos.to(device, dtype), sin.to(device, dtype)   # [max_len, hd]
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.num_key_value_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.columns = {f: fused_columns(cfg, f) for f in FUSED}          # adapter sites inside qkv / gate_up
        self.adapt_calls = tuple(AdaptCall(site, cfg.hidden_size, tuple(self.columns.get(f, ())))   # `_adapt`
                                 for site, f in zip(CALL_SITES, ("qkv", None, "gate_up", None)))
        self.row_tile = 0            # > 0: batch-invariant mode, the row tile (invariant.py); see below
        self.paged_kernel = None     # cpu_attention's extension: decode attention read in place from the pool
        self.cuda_paged = None       # the triton_attention module when decode attention reads the pool on CUDA
        self.fused = None            # cpu_fused's extension (CPU) or triton_fused (CUDA): norm, silu * up, rope

    def enable_batch_invariance(self, max_rows: int) -> int:
        """Switch to batch-invariant numerics after probing this machine's matmuls on the model's own shapes
        (raises ConfigError where they cannot be made invariant). Returns the row tile chosen."""
        w = self.layers[0]
        shapes = {"qkv_proj": w["qkv"], "o_proj": w["o"], "gate_up_proj": w["gate_up"], "down_proj": w["down"],
                  "lm_head": self.lm_head}
        self.row_tile = invariant.probe_row_tile(shapes, self.cfg.head_dim, self.dtype, self.device, max_rows)
        return self.row_tile

    def prepack_weights(self) -> bool:
        """Replace the projection weights (and the LM head; a packed copy when it is tied to the embedding) by
        oneDNN-prepacked ones, which `_linear` then runs through `mkldnn._linear_pointwise`: on an avx512_bf16
        CPU 1.2-1.7x faster than `F.linear` on the same bf16 weights, with bit-identical outputs (measured on
        SmolLM2's shapes at 64 and 256 rows). Only for bf16 on CPU, not in batch-invariant mode (its probe measured
        F.linear) and not under compiled / static decode (their graphs read the dense weights): the caller
        decides. Returns False (nothing changed) where this torch has no oneDNN linear."""
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return False
        pack = torch.ops.mkldnn._reorder_linear_weight
        for w in self.layers:
            for key in ("qkv", "o", "gate_up", "down"):
                w[key] = pack(w[key], PREPACK_ROWS_HINT)
        self.lm_head = pack(self.lm_head, PREPACK_ROWS_HINT)           # tied: a packed copy, embed stays dense
        return True

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if weight.is_mkldnn:                                               # prepack_weights()
            return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        return invariant.linear(x, weight, self.row_tile) if self.row_tile else F.linear(x, weight)

    @classmethod
    def from_dir(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", max_len: int | None = None) -> "LlamaDecoder":
        cfg = ModelConfig.from_dir(model_dir)
        raw = load_state_dict(model_dir)
        weights = fuse_weights(cfg, raw, dtype, torch.device(device), source=str(model_dir))
        return cls(cfg, weights, dtype, torch.device(device), max_len or cfg.max_position_embeddings)

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, b: StepBatch, kv, adapters=None, stats=None) -> ForwardOutput:
        """Logits [L + E, V] fp32 at b.logits_index, then for b.extra_hidden; final hidden states at
        b.hidden_index. `kv`: KVCachePool; `adapters`: AdapterSlots or None."""
        use_adapters = adapters is not None and b.any_adapter
        h = F.embedding(b.input_ids, self.embed)                            # h: [T, d]
        cos, sin = self.cos[b.positions], self.sin[b.positions]             # [T, hd]
        delta = None                   # the last block's output, added into h (in place) by the next norm
        bound = adapters.bind_step(b.adapter_plan, stats, self.dtype, self.adapt_calls) \
            if use_adapters and b.adapter_plan is not None else None       # the step's kernel calls, bound
        layer_sites = adapters.step_sites(b.sites) if use_adapters and bound is None else None   # per layer
        for idx, w in enumerate(self.layers):
            ctx = AdaptContext(adapters, idx, layer_sites[idx] if layer_sites else (), b.adapter_slots, stats,
                               b.adapter_plan, bound.layers[idx] if bound else None, bound.segs if bound else None)
            x = self._add_norm(h, delta, w["in_norm"])                      # h += delta; x: [T, d]
            delta = self._attention(idx, w, x, h, cos, sin, b, kv, ctx)
            x = self._add_norm(h, delta, w["post_norm"])
            delta = self._mlp(w, x, h, ctx)
        if delta is not None:
            h += delta
        hidden = h[b.hidden_index] if b.hidden_index is not None else None   # [C, d] kept for the prefix cache
        h = h[b.logits_index]                                               # only rows that need logits
        if b.extra_hidden is not None:                                      # [L + E, d]
            h = torch.cat([h, b.extra_hidden.to(h.dtype)])
        h = self._add_norm(h, None, self.final_norm)
        return ForwardOutput(self._linear(h, self.lm_head).float(), hidden)  # [L + E, V], [C, d]

    def _attention(self, idx, w, x, h, cos, sin, b: StepBatch, kv, ctx: AdaptContext) -> torch.Tensor:
        """The attention block's output [T, d] for x = norm(h) [T, d]; a block-level self_attn delta (it reads
        the same x as q/k/v, so it shares their fused shrink) is added straight into the residual h, which the
        next norm adds this output to: no [T, d] buffer to zero and add per layer."""
        cfg = self.cfg
        T = x.shape[0]
        qkv = self._linear(x, w["qkv"])                                     # [T, q + 2kv]
        _adapt(ctx, CALL_QKV, x, h, qkv, self.columns["qkv"])
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = q.reshape(T, cfg.num_attention_heads, cfg.head_dim), k.reshape(T, cfg.num_key_value_heads, cfg.head_dim)
        if self.fused is not None:                                          # in place, in qkv
            self.fused.rope_(q, cos, sin)
            self.fused.rope_(k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.reshape(T, cfg.num_key_value_heads, cfg.head_dim)
        kv.write(idx, b.slot_mapping, k, v)
        g0 = b.attn[0]
        if self.row_tile:                                                   # batch-invariant: one computation
            out = q.new_empty(T, self.q_size)
            for g in b.attn:
                out.index_copy_(0, *self._invariant_attention(idx, q, g, kv))
        elif g0.decode and g0.q_index is None:                              # decode-only step: T == B, in order
            out = self.decode_attention(idx, q, kv, g0.kv_slots, g0.mask)                   # [T, H*hd]
        else:
            out = q.new_empty(T, self.q_size)                               # every row is written below
            for g in b.attn:
                out.index_copy_(0, *self._group_attention(idx, q, g, kv))
        o = self._linear(out, w["o"])                                       # [T, d]
        _adapt(ctx, CALL_O, out, o)
        return o

    def _group_attention(self, idx, q, g: AttnGroup, kv) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat rows [n], attention output [n, H*hd]) of one group's queries. q: [T, H, hd]."""
        if g.decode:
            return g.q_index, self.decode_attention(idx, q[g.q_index], kv, g.kv_slots, g.mask)
        keys, values = kv.gather(idx, g.kv_slots)                           # [KV, G, Kmax, hd]
        # Scatter queries into the padded [G, Qmax] layout; index T reads an appended zero row.
        qp = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[g.q_index]      # [G, Qmax, H, hd]
        out = F.scaled_dot_product_attention(qp.transpose(1, 2), keys.transpose(0, 1), values.transpose(0, 1),
                                             attn_mask=g.mask, scale=self.scale, enable_gqa=True)   # [G, H, Qmax, hd]
        return g.scatter.rows, out.transpose(1, 2).reshape(-1, self.q_size)[g.scatter.padded_at]   # [n], [n, H*hd]

    def _invariant_attention(self, idx, q, g: AttnGroup, kv) -> tuple[torch.Tensor, torch.Tensor]:
        """`_group_attention` in batch-invariant mode: decodes and prefill chunks through the same computation."""
        keys, values = kv.gather(idx, g.kv_slots)                           # [KV, G, Kmax, hd]
        if g.decode:
            rows = g.q_index if g.q_index is not None else torch.arange(q.shape[0], device=q.device)
            out = invariant.invariant_attention(q[rows][:, None], keys, values, g.mask, self.scale, self.row_tile)
            return rows, out.reshape(-1, self.q_size)                       # [G], [G, H*hd]
        qp = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[g.q_index]      # [G, Qmax, H, hd]
        out = invariant.invariant_attention(qp, keys, values, g.mask, self.scale, self.row_tile)
        return g.scatter.rows, out.reshape(-1, self.q_size)[g.scatter.padded_at]          # [n], [n, H*hd]

    def decode_attention(self, idx: int, q, kv, kv_slots, mask) -> torch.Tensor:
        """[B, H*hd] attention of one query per sequence (q: [B, H, hd]) over layer idx of the pool: read in place
        by the paged kernel when enabled (`enable_paged_kernel`), else gathered into a dense copy for
        `_decode_attention`. kv_slots: [B, Kmax]; mask: [B, 1, 1, Kmax]."""
        if self.paged_kernel is not None:
            return cpu_attention.decode_attention(self.paged_kernel, q, kv.k[idx], kv.v[idx], kv_slots, mask,
                                                  self.scale)
        if self.cuda_paged is not None:
            return self.cuda_paged.decode_attention(q, kv.k[idx], kv.v[idx], kv_slots, mask, self.scale)
        return self._decode_attention(q, *kv.gather(idx, kv_slots), mask)

    def enable_paged_kernel(self, kv_dtype: torch.dtype, required: bool = False) -> bool:
        """Read K/V in place for decode attention: on CUDA with triton_attention (any float dtype, K/V in the
        model's dtype); on CPU with cpu_attention's kernel (fp32 / bf16). Not batch-invariant: the core decides.
        False, and the torch gather path stays, when it is unavailable; `required` raises instead (engine flag
        cpu_attention=kernel, CPU only)."""
        if self.device.type == "cuda":
            from . import triton_attention
            self.cuda_paged = triton_attention if triton_attention.available(self.device) and \
                kv_dtype == self.dtype else None
            return self.cuda_paged is not None
        usable = self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16) and kv_dtype == self.dtype
        ext = cpu_attention.EXTENSION.require("cpu_attention", required, usable)
        self.paged_kernel = ext
        return ext is not None

    def enable_fused_ops(self, required: bool = False) -> bool:
        """One kernel each for the norms, residual adds, silu * up and rope: on CUDA triton_fused's (any float
        dtype); on CPU cpu_fused's (fp32 / bf16, eager). Not batch-invariant: the core decides. False when
        unavailable; `required` raises (cpu_fused_ops=kernel, CPU only)."""
        if self.device.type == "cuda":
            from . import triton_fused
            self.fused = triton_fused if triton_fused.available(self.device) else None
            return self.fused is not None
        usable = self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16)
        ext = cpu_fused.EXTENSION.require("cpu_fused_ops", required, usable)
        self.fused = ext
        return ext is not None

    def _add_norm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """h += delta in place (none: skipped), then RMSNorm of h [T, d]; one pass each with the fused kernels."""
        eps = self.cfg.rms_norm_eps
        if self.fused is not None:
            return self.fused.rms_norm(h, weight, eps) if delta is None else self.fused.add_rms_norm(h, delta, weight,
                                                                                                       eps)
        if delta is not None:
            h += delta
        return rms_norm(h, weight, eps)

    def _decode_attention(self, q, keys, values, mask) -> torch.Tensor:
        """One query per sequence, as two batched matmuls over (KV head, sequence). q: [B, H, hd]; keys/values:
        [KV, B, Kmax, hd]; mask: [B, 1, 1, Kmax]. On CPU this is ~10x faster than SDPA's flash kernel, which is
        built for long query blocks. The scale is applied to q when that is exact (a power of two), the mask is an
        additive bias (0 / -inf) added in place to the scores, and the softmax reads and writes the compute dtype
        (torch accumulates a bf16 softmax in fp32): ~1.6x less time than fp32 scores + masked_fill + casts at
        400 keys, the same probabilities to bf16 rounding."""
        B, H, hd = q.shape
        kvh = keys.shape[0]
        exact = math.log2(self.scale).is_integer()                          # power of two: scaling q is exact
        qg = (q * self.scale if exact else q).view(B, kvh, H // kvh, hd).transpose(0, 1)    # [KV, B, G, hd]
        bias = torch.zeros(mask.shape, dtype=keys.dtype, device=keys.device).masked_fill_(~mask, float("-inf"))
        scores = torch.matmul(qg, keys.transpose(-1, -2))                   # [KV, B, G, Kmax] (GQA: adjacent heads)
        scores = (scores if exact else scores.mul_(self.scale)).add_(bias.view(1, B, 1, -1))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, values)                                   # [KV, B, G, hd]
        return out.transpose(0, 1).reshape(B, H * hd)                       # [B, H*hd]

    def _mlp(self, w, x, h, ctx: AdaptContext) -> torch.Tensor:
        """The MLP block's output [T, d] for x = norm(h); a block-level mlp delta goes into h (see _attention)."""
        F_ = self.cfg.intermediate_size
        gu = self._linear(x, w["gate_up"])                                  # [T, 2F]
        _adapt(ctx, CALL_GATE_UP, x, h, gu, self.columns["gate_up"])
        if self.fused is not None:
            act = self.fused.silu_mul(gu)                                   # [T, F]
        else:
            gate, up = gu.split([F_, F_], dim=-1)
            act = F.silu(gate) * up                                         # [T, F]
        out = self._linear(act, w["down"])                                  # [T, d]
        _adapt(ctx, CALL_DOWN, act, out)
        return out


def _adapt(ctx: AdaptContext, call: int, inp: torch.Tensor, out: torch.Tensor, fused: torch.Tensor | None = None,
           columns: list[FusedColumn] = ()) -> None:
    """Add, in place, the deltas of adapter call `call` (CALL_*: the sites that read `inp`): the call's own site
    into `out` (a fresh matmul output, or the residual for a block-level site), the sites in `columns` into their
    columns of the fused projection output `fused` (layout: `mtlora.sites`). With the step's kernel calls bound
    (`ctx.bound`, CPU kernel steps) that is one C++ call; otherwise the sites the step uses go to `apply_shared`
    together (one shrink matmul per slot), as column views made only for those sites (4 calls a layer on every
    step, adapters or not)."""
    if ctx.bound is not None:
        bound = ctx.bound[call]
        if bound is not None:
            bound(inp, out, fused, ctx.segs)
        return
    if not ctx.sites:
        return
    site = CALL_SITES[call]
    todo = [(site, out)] if site in ctx.sites else []
    todo += [(c.site, fused[:, c.start:c.start + c.width]) for c in columns if c.site in ctx.sites]
    if todo:
        ctx.adapters.apply_shared(ctx.layer, inp, todo, ctx.slot_idx, stats=ctx.stats, plan=ctx.plan)


# -- weights -----------------------------------------------------------------------------------------------------
def fuse_weights(cfg: ModelConfig, raw: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                 source: str) -> dict:
    """HF tensor names -> fused engine weights (qkv and gate_up concatenated along the output dim)."""
    def take(name: str) -> torch.Tensor:
        for candidate in (name, name.removeprefix("model.")):
            if candidate in raw:
                return raw[candidate].to(device=device, dtype=dtype)
        raise CheckpointError(f"weight {name!r} is missing", path=source, field=name)

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        layers.append({
            "in_norm": take(p + "input_layernorm.weight"),
            "post_norm": take(p + "post_attention_layernorm.weight"),
            "qkv": torch.cat([take(p + f"{site_of_module(m)}.weight") for m in FUSED["qkv"]]).contiguous(),
            "o": take(p + "self_attn.o_proj.weight"),
            "gate_up": torch.cat([take(p + f"{site_of_module(m)}.weight") for m in FUSED["gate_up"]]).contiguous(),
            "down": take(p + "mlp.down_proj.weight"),
        })
    weights = {"embed": take("model.embed_tokens.weight"), "norm": take("model.norm.weight"), "layers": layers}
    if not cfg.tie_word_embeddings:
        weights["lm_head"] = take("lm_head.weight") if "lm_head.weight" in raw else weights["embed"]
    if tuple(weights["embed"].shape) != (cfg.vocab_size, cfg.hidden_size):
        raise CheckpointError(f"embed_tokens has shape {tuple(weights['embed'].shape)}, config says "
                              f"({cfg.vocab_size}, {cfg.hidden_size})", path=source, field="vocab_size")
    return weights
