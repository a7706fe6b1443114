"""Block-level mtLoRA adapter modules for the vLLM backend (plain PyTorch: importable and testable without vLLM).

Contract:
- `BlockAdapter(d_in, d_out, config)` holds one adapter site with the native tensor names and shapes
  (`lora_A` [r, d_in], `lora_B` [N, d_out, r], `router` [g*N, d_in], absent when N == 1), so a checkpoint tensor
  `layers.{L}.{site}.X` loads into `...layers.{L}.{site}.adapter.X` unchanged. After its tensors are copied in,
  `refresh()` must be called: it rebuilds the group-major copy of B the forward pass uses.
- `forward(z)` computes exactly `mtlora.adapters.MoLoRA.forward` (fp32 router softmax per group, alpha/r scaling)
  but never materialises the per-expert outputs [T, N, d_out]: the routing weights scale the rank-r code first
  (`hw = w * h`, [T, g, N*r]) and one batched matmul per routing group applies all experts at once. The result is
  mathematically identical; the parity tests compare it with MoLoRA and with the reference model.
- `AdaptedAttention` / `AdaptedMLP` wrap a vLLM decoder layer's `self_attn` / `mlp`: the sub-block receives the
  output of its RMSNorm, the adapter reads the same tensor, and the delta is added to the sub-block's output,
  i.e. before the residual add that vLLM fuses into the next RMSNorm. Under tensor parallelism the wrapped
  sub-blocks return the all-reduced (full) output and receive the full normed input, so the adapter weights are
  simply replicated on every rank and every rank adds the same delta (they are tiny next to the base weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.adapters import MoLoRA
from mtlora.config import AdapterConfig


class BlockAdapter(MoLoRA):
    """One block-level adapter site: `MoLoRA`'s parameters and shapes, frozen, with a grouped-B forward pass."""

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig,
                 dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, config, dtype=dtype)
        self.requires_grad_(False)        # inference only; the checkpoint overwrites every parameter
        self.group_size = out_features // self.num_groups
        # Group-major B with the scaling folded in: [g, gs, N*r]. Not persistent: derived from lora_B.
        self.register_buffer("b_grouped", torch.empty(self.num_groups, self.group_size,
                                                      self.num_experts * self.rank, dtype=dtype), persistent=False)

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild `b_grouped` from `lora_B`; call after loading new tensors."""
        n, r, g, gs = self.num_experts, self.rank, self.num_groups, self.group_size
        b = self.lora_B.view(n, g, gs, r).permute(1, 2, 0, 3)                    # [g, gs, N, r]
        self.b_grouped = (b.reshape(g, gs, n * r) * self.scaling).contiguous().to(self.lora_B.dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: [..., d_in] -> delta: [..., d_out] in z's dtype."""
        lead = z.shape[:-1]
        zc = z.reshape(-1, self.in_features).to(self.lora_A.dtype)                   # [T, d_in]
        h = F.linear(zc, self.lora_A)                                                 # [T, r]
        t = h.shape[0]
        if self.router is None:
            hw = h.unsqueeze(1)                                                       # [T, 1, r] (g = N = 1)
        else:
            logits = F.linear(zc.to(self.router.dtype), self.router)                 # [T, g*N]
            w = torch.softmax(logits.view(t, self.num_groups, self.num_experts).float(), dim=-1)  # [T, g, N]
            # Route first, expand second: the routing weight scales expert i's rank-r code.
            hw = (w.to(h.dtype).unsqueeze(-1) * h[:, None, None, :]).reshape(t, self.num_groups, -1)  # [T, g, N*r]
        # Per group: [T, N*r] x [N*r, gs]; batched over groups.
        delta = torch.bmm(hw.transpose(0, 1), self.b_grouped.transpose(1, 2))      # [g, T, gs]
        return delta.transpose(0, 1).reshape(*lead, self.out_features).to(z.dtype)



class AdaptedAttention(nn.Module):
    """vLLM `self_attn` (called as `(positions, hidden_states)`) plus a block adapter on its normed input."""

    def __init__(self, block: nn.Module, adapter: BlockAdapter):
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        # hidden_states: [T, d] (input_layernorm output); the sub-block output is [T, d] too.
        out = self.block(positions=positions, hidden_states=hidden_states, **kwargs)
        return out + self.adapter(hidden_states)


class AdaptedMLP(nn.Module):
    """vLLM `mlp` (called as `(x)`) plus a block adapter on its normed input."""

    def __init__(self, block: nn.Module, adapter: BlockAdapter):
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, d] (post_attention_layernorm output)
        return self.block(x) + self.adapter(x)


WRAPPERS = {"self_attn": AdaptedAttention, "mlp": AdaptedMLP}
