"""Attach adapters to a transformers LLaMA-architecture model, PEFT style: wrap module instances, never classes.

Contract:
- `attach(model, config)` wraps, in place, every adapter site of every decoder layer (`AdaptedBlock` around
  `mlp` / `self_attn` for mtlora, `AdaptedLinear` around projections for hydralora/lora) and returns the adapters
  keyed by their native name prefix `layers.{L}.{site}` (e.g. `layers.3.mlp`, `layers.3.self_attn.q_proj`).
- Native tensor names are `{prefix}.lora_A` [r, d_in], `{prefix}.lora_B` [N, d_out, r], `{prefix}.router`
  [g*N, d_in] (absent when N == 1). `adapter_state_dict` / `load_adapter_state` use exactly these names and
  `expected_shapes(model_config, adapter_config)` predicts them without building anything; `site_dims(model_config,
  site)` (defined in `mtlora.sites`, re-exported here) gives one site's (in_features, out_features).
- `detach(model)` restores the original modules. Attaching twice is an error.
"""

from __future__ import annotations

import torch
from torch import nn

from mtlora.adapters import AdaptedBlock, AdaptedLinear, MoLoRA
from mtlora.config import AdapterConfig
from mtlora.errors import CheckpointError, ConfigError
from mtlora.sites import site_dims

__all__ = ["adapter_state_dict", "attach", "attached_adapters", "decoder_layers", "detach", "expected_shapes",
           "load_adapter_state", "site_dims"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a LlamaForCausalLM (or its inner LlamaModel)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ConfigError("model has no decoder layers (expected model.model.layers)", field="model")
    return layers


def _site_parent(layer: nn.Module, site: str) -> tuple[nn.Module, str]:
    """(module holding the site, attribute name): `mlp` -> (layer, "mlp"), `mlp.up_proj` -> (layer.mlp, "up_proj")."""
    parent_path, _, leaf = site.rpartition(".")
    return (layer.get_submodule(parent_path) if parent_path else layer), leaf


def expected_shapes(model_config, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name an adapter for this base must have, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(model_config.num_hidden_layers):
        for site in config.sites():
            d_in, d_out = site_dims(model_config, site)
            prefix = f"layers.{layer}.{site}"
            shapes[f"{prefix}.lora_A"] = (config.rank, d_in)
            shapes[f"{prefix}.lora_B"] = (config.num_experts, d_out, config.rank)
            if config.has_router:
                shapes[f"{prefix}.router"] = (config.groups_for(d_out) * config.num_experts, d_in)
    return shapes


def attach(model: nn.Module, config: AdapterConfig) -> dict[str, MoLoRA]:
    """Wrap every adapter site of `model` in place; returns {native prefix: adapter module}."""
    if getattr(model, "_mtlora_config", None) is not None:
        raise ConfigError("model already has an adapter attached; detach() it first", field="model")
    ref = next(model.parameters())
    adapters: dict[str, MoLoRA] = {}
    for idx, layer in enumerate(decoder_layers(model)):
        for site in config.sites():
            parent, leaf = _site_parent(layer, site)
            target = getattr(parent, leaf)
            d_in, d_out = site_dims(model.config, site)
            adapter = MoLoRA(d_in, d_out, config, dtype=ref.dtype, device=ref.device)
            wrapper = AdaptedLinear(target, adapter) if "." in site else AdaptedBlock(target, adapter)
            # New modules start in training mode; follow the wrapped module, or an eval model would apply dropout.
            wrapper.train(target.training)
            setattr(parent, leaf, wrapper)
            adapters[f"layers.{idx}.{site}"] = adapter
    model._mtlora_config = config
    model._mtlora_adapters = adapters
    return adapters


def detach(model: nn.Module) -> None:
    """Undo `attach`: put the original sub-modules back."""
    config: AdapterConfig | None = getattr(model, "_mtlora_config", None)
    if config is None:
        return
    for layer in decoder_layers(model):
        for site in config.sites():
            parent, leaf = _site_parent(layer, site)
            wrapper = getattr(parent, leaf)
            setattr(parent, leaf, wrapper.base if isinstance(wrapper, AdaptedLinear) else wrapper.block)
    model._mtlora_config = None
    model._mtlora_adapters = None


def attached_adapters(model: nn.Module) -> dict[str, MoLoRA]:
    adapters = getattr(model, "_mtlora_adapters", None)
    if adapters is None:
        raise ConfigError("no adapter is attached to this model", field="model")
    return adapters


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Native-named adapter tensors (detached, contiguous) of the attached adapter."""
    out: dict[str, torch.Tensor] = {}
    for prefix, adapter in attached_adapters(model).items():
        for name, param in adapter.named_parameters():
            out[f"{prefix}.{name}"] = param.detach().contiguous()
    return out


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "<tensors>") -> None:
    """Copy native-named tensors into the attached adapter; every key must match in name and shape."""
    params = {f"{prefix}.{name}": p for prefix, a in attached_adapters(model).items()
              for name, p in a.named_parameters()}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"adapter tensors do not match the model: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}", path=source)
    # Check every shape before copying anything, so a bad tensor never leaves the adapter half-loaded.
    for name, param in params.items():
        value = tensors[name]
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(value.shape)}, the model expects "
                                  f"{tuple(param.shape)}", path=source, field=name)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.dtype))
