"""Single import point for the ops engineer's batched adapter ops (`lora_ops`) and sampling helpers (`sampling`),
so the rest of the engine names one module for everything it computes outside the decoder itself."""

from __future__ import annotations

from .lora_ops import AdapterSlots, RoutingStats
from .sampling import apply_min_tokens, logprobs_of, sample

__all__ = ["AdapterSlots", "RoutingStats", "apply_min_tokens", "logprobs_of", "sample"]
