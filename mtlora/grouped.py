"""The fast MoLoRA forward for one adapter over the sites that read one input: used by the CPU engine (per slot,
`engine/lora_ops.py`) and by the vLLM backend (`vllm_backend/layers.py`), tested against `mtlora.adapters.MoLoRA`
(the oracle). The Triton kernel (`engine/triton_molora.py`) is the CUDA path of the same math.

Contract:
- `SiteWeights(A, B, R, scaling)`: one site of one adapter in expand layout: A [r, d_in]; B [N, r, d_out] (the
  native lora_B [N, d_out, r] transposed); R [g, N, d_in] (the native router [g*N, d_in], group-major) or None when
  N == 1; scaling = alpha / r. `SiteWeights.from_native(lora_A, lora_B, router, scaling)` builds one from native
  tensors.
- `pack(sites) -> Pack`: W = [A_1; R_1; A_2; R_2; ...] stacked on the output dim, so every site's shrink and router
  logits come out of ONE matmul (`shrink`); per site a `PackedSite` with its row offsets in that output and B laid
  out per routing group [g, N*r, d_out/g], the scaling s = alpha / r folded in (sB: one op less per call). Packs
  are derived data: rebuild after the weights change. `Pack.float()` is the same pack in fp32 (built once, cached):
  on CPU the tiny adapter matmuls of a few rows run several times faster in fp32 than through oneDNN's bf16 path
  (per-call overhead, not arithmetic, dominates there), see `lora_ops.SMALL_ROWS`.
- `expand(hz, part) -> (delta [n, d_out] in hz.dtype, w [n, g, N] fp32 routing weights or None when N == 1)` from
  hz = shrink(x, pack) [n, rows]. Math (exactly MoLoRA): h = A x, w = softmax_N(R x) per group in fp32,
  delta[k] = s * sum_i w[group(k), i] * (B_i h)[k]; routed first: u = w h [n, g, N*r], then one matmul per
  channel group with sB (the per-expert outputs [n, N, d_out] are never materialised).
- `expand_into(hz, part, out) -> w`: the same delta added in place into `out` [n, d_out] (any dtype; may be a
  column view of a fused projection output), with no delta temporary when dtypes agree (addmm_).
- `forward(x, pack) -> [delta per site]` for x [n, d_in].
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from mtlora.errors import ConfigError


@dataclass
class SiteWeights:
    A: torch.Tensor                 # [r, d_in]
    B: torch.Tensor                 # [N, r, d_out]
    R: torch.Tensor | None          # [g, N, d_in]; None: N == 1, no router
    scaling: float

    @classmethod
    def from_native(cls, lora_A: torch.Tensor, lora_B: torch.Tensor, router: torch.Tensor | None,
                    scaling: float) -> "SiteWeights":
        """Native tensors (`lora_A` [r, d_in], `lora_B` [N, d_out, r], `router` [g*N, d_in] or None)."""
        N = lora_B.shape[0]
        R = None if router is None else router.view(router.shape[0] // N, N, router.shape[1])
        return cls(lora_A, lora_B.transpose(1, 2), R, scaling)


@dataclass
class PackedSite:
    """One site inside a `Pack`: rows [a_off, a_off + r) of the shrink output are h, rows [r_off, r_off + g*N) the
    router logits (r_off -1: no router)."""

    a_off: int
    r: int
    r_off: int
    N: int
    g: int
    B: torch.Tensor                 # [g, N*r, d_out/g]: s * B, group j's output channels only
    scaling: float                  # s, already folded into B (kept for reports)


@dataclass
class Pack:
    W: torch.Tensor                 # [sum over sites of r + g*N, d_in]
    parts: list[PackedSite]
    _fp32: "Pack | None" = field(default=None, repr=False, compare=False)

    def float(self) -> "Pack":
        """This pack in fp32 (self when it already is), built on first use and kept."""
        if self.W.dtype == torch.float32:
            return self
        if self._fp32 is None:
            self._fp32 = Pack(self.W.float(), [replace(p, B=p.B.float()) for p in self.parts])
        return self._fp32


def pack(sites: list[SiteWeights]) -> Pack:
    """Stack the shrink (and router) rows of several sites that read the same input; see module doc."""
    rows, parts, off = [], [], 0
    for s in sites:
        N, r, d_out = s.B.shape
        g = 1 if s.R is None else s.R.shape[0]
        if d_out % g:
            raise ConfigError(f"{g} routing groups do not divide the output dimension {d_out}",
                              field="routing_group_size")
        rows.append(s.A)
        a_off, off = off, off + r
        r_off = -1
        if s.R is not None and N > 1:
            rows.append(s.R.reshape(g * N, -1))
            r_off, off = off, off + g * N
        Bg = (s.B.reshape(N * r, g, d_out // g).transpose(0, 1) * s.scaling).contiguous()   # [g, N*r, d_out/g]
        parts.append(PackedSite(a_off, r, r_off, N, g, Bg, float(s.scaling)))
    return Pack(torch.cat(rows).contiguous(), parts)


def shrink(x: torch.Tensor, p: Pack) -> torch.Tensor:
    """x: [n, d_in] -> hz [n, rows of the pack] in the pack's dtype."""
    return F.linear(x.to(p.W.dtype), p.W)


def expand(hz: torch.Tensor, part: PackedSite) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One site's delta [n, d_out] (hz.dtype) and routing weights [n, g, N] fp32 (None: N == 1). See module doc."""
    out = hz.new_zeros(hz.shape[0], part.g * part.B.shape[2])                     # [n, d_out]
    return out, expand_into(hz, part, out)


def _routed(hz: torch.Tensor, h: torch.Tensor, part: PackedSite) -> tuple[torch.Tensor, torch.Tensor]:
    """u = w h [n, g, N*r] in hz.dtype and the fp32 routing weights w [n, g, N] (softmax per group in fp32)."""
    n, g, N = h.shape[0], part.g, part.N
    w = torch.softmax(hz[:, part.r_off:part.r_off + g * N].float().view(n, g, N), dim=-1)    # [n, g, N] fp32
    u = w.to(h.dtype)[:, :, :, None] * h[:, None, None, :]                         # [n, g, N, r]
    return u.view(n, g, N * part.r), w


def expand_into(hz: torch.Tensor, part: PackedSite, out: torch.Tensor) -> torch.Tensor | None:
    """Add this site's delta (see `expand`) into out [n, d_out] in place; returns w [n, g, N] fp32 or None."""
    h = hz[:, part.a_off:part.a_off + part.r]                                      # [n, r]
    w = None
    if part.r_off < 0:
        lhs = h                                                                     # [n, r]
    else:
        u, w = _routed(hz, h, part)                                                 # [n, g, N*r]
        if part.g > 1:
            delta = torch.bmm(u.transpose(0, 1), part.B)                           # [g, n, d_out/g]
            out += delta.transpose(0, 1).reshape(h.shape[0], -1)
            return w
        lhs = u[:, 0]                                                               # [n, N*r]
    if out.dtype == hz.dtype:
        out.addmm_(lhs, part.B[0])
    else:
        out += torch.mm(lhs, part.B[0])
    return w


def forward(x: torch.Tensor, p: Pack) -> list[torch.Tensor]:
    """Deltas [n, d_out_i] (pack dtype) of every site of the pack for x [n, d_in]."""
    hz = shrink(x, p)
    return [expand(hz, part)[0] for part in p.parts]
