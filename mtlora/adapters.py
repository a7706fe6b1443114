"""Adapter math for mtlora, hydralora and lora as plain PyTorch modules.

One module, `MoLoRA`, covers all three methods (they differ only in where it is attached and in N/g):

    z      : [..., d_in]                  input (block level: the sub-block's RMSNorm output;
                                           component level: the projection's input)
    h      = A z                          A: [r, d_in]          -> h: [..., r]
    y_i    = B_i h                        B: [N, d_out, r]      -> y: [..., N, d_out]
    w      = softmax_N(R z) per group     R: [g*N, d_in]        -> w: [..., g, N]  (fp32 softmax)
    delta_k = s * sum_i w[group(k), i] * y_i[k],   group(k) = k // (d_out / g),   s = alpha / r

The router's output is laid out group-major ([g, N]), as in the official mtLoRA code, so official router weights
load unchanged. With N == 1 there is no router and w == 1 (plain LoRA). Dropout applies to A's input only.
Initialisation: A and R kaiming-uniform(a=sqrt(5)), B zeros, so a fresh adapter changes nothing.

This file is the readable reference; the engine's batched ops and Triton kernel are tested against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.config import AdapterConfig


class MoLoRA(nn.Module):
    """Shared-A, N-expert-B low-rank adapter with an optional per-token, per-group router."""

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = config.rank
        self.num_experts = config.num_experts
        self.num_groups = config.groups_for(out_features)
        self.scaling = config.scaling
        kw = {"dtype": dtype, "device": device}
        self.lora_A = nn.Parameter(torch.empty(self.rank, in_features, **kw))                       # [r, d_in]
        self.lora_B = nn.Parameter(torch.zeros(self.num_experts, out_features, self.rank, **kw))    # [N, d_out, r]
        if config.has_router:
            self.router = nn.Parameter(torch.empty(self.num_groups * self.num_experts, in_features, **kw))
        else:
            self.register_parameter("router", None)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # When True, forward() keeps the last routing weights ([..., g, N], with grad) for the balance loss
        # and for routing statistics; off by default so inference keeps no references.
        self.record_routing = False
        self.last_routing: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.router is not None:
            nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))

    def route(self, z: torch.Tensor) -> torch.Tensor:
        """Routing weights w: [..., g, N], softmax over experts computed in fp32."""
        if self.router is None:
            return torch.ones(*z.shape[:-1], 1, 1, dtype=torch.float32, device=z.device)
        logits = F.linear(z.to(self.router.dtype), self.router)                      # [..., g*N]
        logits = logits.view(*z.shape[:-1], self.num_groups, self.num_experts)       # [..., g, N]
        return torch.softmax(logits.float(), dim=-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """delta: [..., d_out] in z's dtype."""
        zc = z.to(self.lora_A.dtype)
        h = F.linear(self.dropout(zc), self.lora_A)                                  # [..., r]
        y = torch.einsum("...r,nor->...no", h, self.lora_B)                          # [..., N, d_out]
        w = self.route(z)                                                            # [..., g, N] fp32
        if self.record_routing:
            self.last_routing = w
        y = y.reshape(*y.shape[:-1], self.num_groups, self.out_features // self.num_groups)  # [..., N, g, gs]
        delta = torch.einsum("...ngc,...gn->...gc", y, w.to(y.dtype))               # [..., g, gs]
        return (delta.reshape(*z.shape[:-1], self.out_features) * self.scaling).to(z.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.rank}, N={self.num_experts}, "
                f"g={self.num_groups}, scaling={self.scaling:g}")


class AdaptedLinear(nn.Module):
    """Component-level attachment: base projection output + adapter(projection input)."""

    def __init__(self, base: nn.Linear, adapter: MoLoRA):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.adapter(x)


class AdaptedBlock(nn.Module):
    """Block-level attachment, parallel to a whole sub-block (attention or MLP).

    The wrapped sub-block receives the output of its RMSNorm; the adapter reads the same input and its output is
    added to the sub-block's output before the decoder layer's residual add. Attention returns a tuple
    (output, weights); only the first element is adapted.
    """

    def __init__(self, block: nn.Module, adapter: MoLoRA):
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out = self.block(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] + self.adapter(hidden),) + tuple(out[1:])
        return out + self.adapter(hidden)

    def __getattr__(self, name: str):
        # Decoder layers read attributes such as `self_attn.layer_idx`; forward them to the wrapped block.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)
