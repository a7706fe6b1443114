"""Single import point for the batched adapter ops and sampling helpers.

Uses the ops engineer's `lora_ops` / `sampling` modules when they are importable, else the exact private stand-ins
in `_ops_fallback`, so the rest of the engine never cares which is installed.
"""

from __future__ import annotations

try:  # the real batched ops (block- and component-level, Triton on CUDA)
    from .lora_ops import AdapterSlots, RoutingStats  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on what has landed
    from ._ops_fallback import AdapterSlots, RoutingStats

try:
    from .sampling import apply_min_tokens, logprobs_of, sample  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    from ._ops_fallback import apply_min_tokens, logprobs_of, sample

__all__ = ["AdapterSlots", "RoutingStats", "apply_min_tokens", "logprobs_of", "sample"]
