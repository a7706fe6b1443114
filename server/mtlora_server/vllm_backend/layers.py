"""Block-level mtLoRA adapter modules for the vLLM backend (plain PyTorch: importable and testable without vLLM).

Contract:
- `BlockAdapter(d_in, d_out, config)` holds one adapter site with the native tensor names and shapes
  (`lora_A` [r, d_in], `lora_B` [N, d_out, r], `router` [g*N, d_in], absent when N == 1), so a checkpoint tensor
  `layers.{L}.{site}.X` loads into `...layers.{L}.{site}.adapter.X` unchanged. After its tensors are copied in,
  `refresh()` must be called: it rebuilds the pack (`mtlora.grouped.pack`) the forward pass uses (a pack whose dtype
  or device no longer matches the parameters is rebuilt on the next call).
- `forward(z)` is `mtlora.grouped.forward`, the same grouped function the native engine's CPU path runs: exactly
  `mtlora.adapters.MoLoRA.forward` (fp32 router softmax per group, alpha/r scaling) without materialising the
  per-expert outputs [T, N, d_out]. The parity tests compare it with MoLoRA and with the reference model.
- `AdaptedAttention` / `AdaptedMLP` wrap a vLLM decoder layer's `self_attn` / `mlp`: the sub-block receives the
  output of its RMSNorm, the adapter reads the same tensor, and the delta is added to the sub-block's output,
  i.e. before the residual add that vLLM fuses into the next RMSNorm. Under tensor parallelism the wrapped
  sub-blocks return the all-reduced (full) output and receive the full normed input, so the adapter weights are
  simply replicated on every rank and every rank adds the same delta (they are tiny next to the base weights).
"""

from __future__ import annotations

import torch
from torch import nn

from mtlora import grouped
from mtlora.adapters import MoLoRA
from mtlora.config import AdapterConfig


class BlockAdapter(MoLoRA):
    """One block-level adapter site: `MoLoRA`'s parameters and shapes, frozen, forward through `mtlora.grouped`."""

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig,
                 dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, config, dtype=dtype)
        self.requires_grad_(False)        # inference only; the checkpoint overwrites every parameter
        self._pack: grouped.Pack | None = None      # derived from the parameters by refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the grouped pack from the parameters; call after loading new tensors."""
        site = grouped.SiteWeights.from_native(self.lora_A, self.lora_B, self.router, self.scaling)
        self._pack = grouped.pack([site])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: [..., d_in] -> delta: [..., d_out] in z's dtype."""
        p = self._pack
        if p is None or p.W.dtype != self.lora_A.dtype or p.W.device != self.lora_A.device:
            self.refresh()                # first call, or the module was moved / cast since: derive it again
            p = self._pack
        (delta,) = grouped.forward(z.reshape(-1, self.in_features), p)               # [T, d_out]
        return delta.reshape(*z.shape[:-1], self.out_features).to(z.dtype)


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
