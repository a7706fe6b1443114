"""A decoder layer's row-wise elementwise work on CUDA in one Triton kernel each: RMSNorm (after the residual add),
SiLU(gate) * up, rotary embedding in place. The CUDA counterpart of cpu_fused.py, with the same functions.

Why: in torch each of these is 4-8 kernels over the whole activation (bf16 widened to fp32 and back per op). On
the second H200 run (docs/gpu.md) a 7B-shaped decode step spent ~1.3 ms of 6.2 ms at batch 1 and ~2 ms at batch
64 in such small kernels (RMSNorm alone: 65 reductions plus their casts and products per step); each is a few
microseconds of launch and tail, in a CUDA graph too. One kernel per function reads and writes each row once.

Contract (module functions, the interface `LlamaDecoder.fused` expects; cpu_fused.py documents the same):
- float32, bfloat16 or float16, one dtype per call; each is the same function as the torch expression in
  engine/model.py it replaces, with the rounding torch does (products and sums rounded to the dtype where torch
  rounds them): `rms_norm(x, w, eps)` == `model.rms_norm`; `add_rms_norm(h, delta, w, eps)` does `h += delta`
  in place, then returns `rms_norm(h)`; `silu_mul(gu [T, 2F])` == `F.silu(gate) * up`; `rope_(x [T, heads, hd],
  cos, sin)` == `model.apply_rope` written into x (x may be a strided view of the fused qkv output).
  Parity: tests/unit/test_triton_fused.py (interpreter on CPU, and on CUDA: fp32 to 1e-5, bf16 / fp16 to one
  rounding step of the dtype: the reductions sum in another order than torch's). On the H200 (Triton 3.6) the
  bf16 rope matched torch's bits in 82% of the elements, the rest one rounding step apart, although the same
  formula evaluated by torch on the CPU matches torch's rope bit for bit: the compiled kernel appears to drop
  one of the intermediate roundings; not established, and not chased (it is within the contract).
- Graph-capturable (no host synchronisation); rows are independent programs.
- `available(device)`: triton imports and the device is CUDA (or the interpreter is on, for tests).
"""

from __future__ import annotations

import torch

from .triton_molora import _pow2, interpreter_enabled

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional; the torch expressions are used instead
    triton = None
    tl = None

SILU_BLOCK = 1024       # columns of F per silu_mul program


def available(device: torch.device | str) -> bool:
    """True when this module can run on `device` (see triton_attention.available)."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or interpreter_enabled()


if triton is not None:
    @triton.jit
    def _rms_kernel(x_ptr, x_s, d_ptr, d_s, w_ptr, out_ptr, out_s, N, eps, ADD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        dt = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * x_s + cols, mask=m, other=0.0)
        if ADD:                                                    # h += delta, rounded as torch's add
            delta = tl.load(d_ptr + row * d_s + cols, mask=m, other=0.0)
            x = (x.to(tl.float32) + delta.to(tl.float32)).to(dt)
            tl.store(x_ptr + row * x_s + cols, x, mask=m)
        xf = x.to(tl.float32)
        r = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
        y = (xf * r).to(dt)                                        # normalised in fp32, cast back, then scaled
        w = tl.load(w_ptr + cols, mask=m, other=0.0)
        tl.store(out_ptr + row * out_s + cols, (w.to(tl.float32) * y.to(tl.float32)).to(dt), mask=m)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, gu_s, out_ptr, out_s, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < F
        dt = out_ptr.dtype.element_ty
        g = tl.load(gu_ptr + row * gu_s + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * gu_s + F + cols, mask=m, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dt)                        # F.silu, rounded to the dtype
        tl.store(out_ptr + row * out_s + cols, (s.to(tl.float32) * u).to(dt), mask=m)

    @triton.jit
    def _rope_kernel(x_ptr, x_st, x_sh, cos_ptr, sin_ptr, cs_s, HALF: tl.constexpr, HP: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        i = tl.arange(0, HP)
        m = i < HALF
        dt = x_ptr.dtype.element_ty
        base = x_ptr + t * x_st + h * x_sh
        x1 = tl.load(base + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + i, mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + t * cs_s + i, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * cs_s + HALF + i, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * cs_s + i, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * cs_s + HALF + i, mask=m, other=0.0).to(tl.float32)
        # x * cos + cat(-x2, x1) * sin, each product rounded to the dtype before the sum (as torch's bf16 ops)
        o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        tl.store(base + i, o1.to(dt), mask=m)
        tl.store(base + HALF + i, o2.to(dt), mask=m)


def _rows(x: torch.Tensor, what: str) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{what} must be [rows, d] with unit column stride, got shape {tuple(x.shape)}")


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """`model.rms_norm(x, w, eps)` for x [T, d]."""
    _rows(x, "rms_norm input")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        _rms_kernel[(x.shape[0],)](x, x.stride(0), x, x.stride(0), w, out, out.stride(0), x.shape[1], float(eps),
                                   ADD=False, BLOCK=_pow2(x.shape[1], 16), num_warps=8 if x.shape[1] >= 2048 else 4)
    return out


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """h += delta in place, then `model.rms_norm(h, w, eps)`. h, delta: [T, d]."""
    _rows(h, "add_rms_norm residual")
    _rows(delta, "add_rms_norm delta")
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if h.shape[0]:
        _rms_kernel[(h.shape[0],)](h, h.stride(0), delta, delta.stride(0), w, out, out.stride(0), h.shape[1],
                                   float(eps), ADD=True, BLOCK=_pow2(h.shape[1], 16),
                                   num_warps=8 if h.shape[1] >= 2048 else 4)
    return out


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for gu = [gate | up] [T, 2F] -> [T, F]."""
    _rows(gu, "silu_mul input")
    T, F2 = gu.shape
    out = torch.empty(T, F2 // 2, dtype=gu.dtype, device=gu.device)
    if T:
        _silu_mul_kernel[(T, triton.cdiv(F2 // 2, SILU_BLOCK))](gu, gu.stride(0), out, out.stride(0), F2 // 2,
                                                                 BLOCK=SILU_BLOCK, num_warps=4)
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`model.apply_rope(x, cos, sin)` written into x [T, heads, hd] (a strided view is fine); returns x."""
    T, H, hd = x.shape
    if x.stride(2) != 1 or hd % 2 or cos.shape != (T, hd) or sin.stride() != cos.stride() or cos.stride(1) != 1:
        raise ValueError(f"rope_ needs x [T, heads, hd] (hd even, unit stride) and cos / sin [T, hd]; got "
                         f"{tuple(x.shape)}, {tuple(cos.shape)}")
    if T:
        _rope_kernel[(T, H)](x, x.stride(0), x.stride(1), cos, sin, cos.stride(0), HALF=hd // 2,
                             HP=_pow2(hd // 2, 16), num_warps=1)
    return x
