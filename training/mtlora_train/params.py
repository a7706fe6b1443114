"""Trainable-parameter counts computed on the meta device (no weights are read or allocated).

`count_trainable_params(model_config, adapter_config)` builds the base architecture under `torch.device("meta")`,
attaches the adapter with `mtlora.inject.attach` (the same code path as training) and sums the adapter parameters'
sizes, so the count is that of the real training run, for any size of base model, in well under a second.
"""

from __future__ import annotations

import torch

from mtlora import inject
from mtlora.config import AdapterConfig


def count_trainable_params(model_config, adapter_config: AdapterConfig) -> int:
    """Number of adapter (trainable) parameters for this base-model config; nothing is materialised."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    adapters = inject.attach(model, adapter_config)
    return sum(p.numel() for a in adapters.values() for p in a.parameters())


def breakdown(model_config, adapter_config: AdapterConfig) -> dict[str, int]:
    """Counts per tensor kind (lora_A / lora_B / router), from `inject.expected_shapes`."""
    out: dict[str, int] = {}
    for name, shape in inject.expected_shapes(model_config, adapter_config).items():
        kind = name.rsplit(".", 1)[1]
        n = 1
        for d in shape:
            n *= d
        out[kind] = out.get(kind, 0) + n
    return out
