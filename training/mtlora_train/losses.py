"""Auxiliary training losses: load balancing and spectral-aware regularisation of the expert B matrices.

    total = CE + spectral_reg_lambda * L_spectral + blc_weight * L_balance

Balance (`balance_loss`): per routed adapter, p = mean routing weight per expert over valid (non-padding) tokens
and routing groups ([N]); cv^2(p) = var(p) / mean(p)^2 (unbiased variance, as the official code); averaged over
adapters. It reads `MoLoRA.last_routing`, recorded with grad during the forward pass, so it back-propagates into
the routers (also under non-reentrant activation checkpointing, which recomputes the forward during backward).

Spectral, `variant="paper"` (`SpectralRegularizer`): for an adapter with experts B_1..B_N (lora_B[i]: [d_out, r]),
the SVD B_i = U_i S_i V_i^T gives weights w_k = exp(-sigma_k / mean(sigma)) and the fixed map
M_i = V_i diag(w) V_i^T ([r, r]); B'_i = B_i M_i and L = sum_{i<j} ||B'_i^T B'_j||_F^2, averaged over adapters.
M_i is refreshed on the configured schedule and is a detached constant in between, so gradients flow through B_i
only. Freshly initialised B is zero (sigma all 0); such factors count as not computed yet and are refreshed at
the next step, otherwise a per-epoch schedule would keep identity weights for the whole first epoch.

Spectral, `variant="official"` (reproduces the official mtLoRA trainer): over every expert matrix B of every
adapter (a random 64 of them, seeded by the step, when there are more), G = B^T B ([r, r]),
s = ||B||_F / sqrt(r) + 1e-8 and w = exp(-svdvals(B) / (mean + 1e-8)) (both detached, recomputed each time);
L = mean over matrices of ||(G - s^2 I) * w w^T||_F^2 -- a per-expert weighted orthogonality term with no
cross-expert coupling. Like the official code it is added only on the steps where its schedule fires.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

import torch

from mtlora.adapters import MoLoRA


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of a 1-D sample; 0 for a single value."""
    x = x.float()
    if x.numel() < 2:
        return x.sum() * 0.0
    return x.var() / (x.mean() ** 2 + 1e-10)


def balance_loss(adapters: Iterable[MoLoRA], attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Mean over routed adapters of cv^2(mean routing weight per expert); None when nothing was recorded."""
    terms = []
    for adapter in adapters:
        w = adapter.last_routing                                         # [B, T, g, N] fp32, with grad
        if w is None or adapter.num_experts < 2:
            continue
        if attention_mask is not None and w.dim() == 4 and attention_mask.shape == w.shape[:2]:
            m = attention_mask.to(w.dtype)[..., None, None]              # [B, T, 1, 1]
            p = (w * m).sum(dim=(0, 1, 2)) / (m.sum() * w.shape[2]).clamp_min(1.0)   # [N]
        else:
            p = w.reshape(-1, w.shape[-1]).mean(dim=0)                   # [N]
        terms.append(cv_squared(p))
    if not terms:
        return None
    return torch.stack(terms).mean()


def clear_routing(adapters: Iterable[MoLoRA]) -> None:
    """Drop recorded routing tensors so the graph they hold can be freed."""
    for adapter in adapters:
        adapter.last_routing = None


class RefreshSchedule:
    """When an SVD refresh (paper) or the whole term (official) is due, following the official trainer's rule.

    Step-based when `every_steps` is set: due when step - last_step >= every_steps; otherwise epoch-based: due
    when epoch - last_epoch >= every_epochs. `last_*` start at -1.
    """

    def __init__(self, every_epochs: int = 1, every_steps: int | None = None):
        self.every_epochs = every_epochs
        self.every_steps = every_steps
        self.last_step = -1
        self.last_epoch = -1

    def due(self, step: int, epoch: int) -> bool:
        if self.every_steps is not None:
            return step - self.last_step >= self.every_steps
        return epoch - self.last_epoch >= self.every_epochs

    def mark(self, step: int, epoch: int) -> None:
        self.last_step, self.last_epoch = step, epoch

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        self.last_step, self.last_epoch = int(state["last_step"]), int(state["last_epoch"])


def spectral_maps(lora_b: torch.Tensor) -> torch.Tensor:
    """M_i = V_i diag(w_i) V_i^T for every expert; lora_b: [N, d_out, r] -> [N, r, r] (fp32, detached)."""
    b = lora_b.detach().float()
    _, s, vh = torch.linalg.svd(b, full_matrices=False)                 # s: [N, r], vh: [N, r, r]
    w = torch.exp(-s / (s.mean(dim=-1, keepdim=True) + 1e-8))           # [N, r]
    v = vh.transpose(-1, -2)                                             # [N, r, r]
    return v @ torch.diag_embed(w) @ vh


def cross_expert_term(lora_b: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """sum_{i<j} ||B'_i^T B'_j||_F^2 with B'_i = B_i M_i; lora_b: [N, d_out, r], maps: [N, r, r]."""
    n, d_out, r = lora_b.shape
    bp = torch.einsum("nor,nrs->nos", lora_b.float(), maps)             # [N, d_out, r]
    flat = bp.permute(1, 0, 2).reshape(d_out, n * r)                     # [d_out, N*r]
    gram = (flat.T @ flat).view(n, r, n, r)                              # block (i, j) = B'_i^T B'_j
    total = gram.pow(2).sum()
    diag = torch.diagonal(gram, dim1=0, dim2=2).pow(2).sum()             # the i == j blocks
    return (total - diag) / 2                                            # symmetric: i<j is half of i != j


def official_term(matrices: list[torch.Tensor]) -> torch.Tensor:
    """The official trainer's per-expert term, averaged over `matrices` (each [d_out, r])."""
    total = matrices[0].new_zeros((), dtype=torch.float32)
    for b in matrices:
        b = b.float()
        r = b.shape[1]
        with torch.no_grad():
            s = torch.linalg.svdvals(b)
            w = torch.exp(-s / (s.mean() + 1e-8))                        # [r]
            scale = torch.linalg.norm(b) / r ** 0.5 + 1e-8
        diff = b.T @ b - torch.eye(r, device=b.device) * scale ** 2       # [r, r]
        total = total + (diff * w[None, :] * w[:, None]).pow(2).sum()
    return total / len(matrices)


class SpectralRegularizer:
    """Holds the refresh schedule and (paper variant) the cached SVD maps per adapter."""

    def __init__(self, adapters: Mapping[str, MoLoRA], variant: str = "paper", every_epochs: int = 1,
                 every_steps: int | None = None, max_official_matrices: int = 64):
        self.adapters = {k: a for k, a in adapters.items() if a.num_experts >= 2 or variant == "official"}
        self.variant = variant
        self.schedule = RefreshSchedule(every_epochs, every_steps)
        self.maps: dict[str, torch.Tensor] = {}
        self.degenerate = False
        self.max_official_matrices = max_official_matrices

    def loss(self, step: int, epoch: int) -> torch.Tensor | None:
        """The spectral term for this optimizer step, or None when the term does not apply at this step."""
        if not self.adapters:
            return None
        if self.variant == "official":
            if not self.schedule.due(step, epoch):
                return None
            self.schedule.mark(step, epoch)
            mats = [a.lora_B[i] for a in self.adapters.values() for i in range(a.num_experts)]
            if len(mats) > self.max_official_matrices:
                mats = random.Random(step).sample(mats, self.max_official_matrices)
            return official_term(mats)
        self._refresh_if_due(step, epoch)
        terms = [cross_expert_term(a.lora_B, self.maps[k]) for k, a in self.adapters.items()]
        return torch.stack(terms).mean()

    def _refresh_if_due(self, step: int, epoch: int) -> None:
        # Maps computed from an all-zero B (fresh init) carry no spectrum; recompute them as soon as B moves.
        if not self.maps or self.degenerate or self.schedule.due(step, epoch):
            self.maps = {k: spectral_maps(a.lora_B) for k, a in self.adapters.items()}
            self.degenerate = any(bool((a.lora_B.detach() == 0).all()) for a in self.adapters.values())
            self.schedule.mark(step, epoch)

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "degenerate": self.degenerate,
                "maps": {k: v.cpu() for k, v in self.maps.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.degenerate = bool(state["degenerate"])
        device = next(iter(self.adapters.values())).lora_B.device if self.adapters else "cpu"
        self.maps = {k: v.to(device) for k, v in state["maps"].items()}
