"""`MtloraLlamaForCausalLM`: vLLM's LLaMA with one mtlora (block-level) adapter built into the model.

Imported by vLLM only (it needs the `vllm` package): the plugin registers it lazily by name, see `plugin.py`.

Contract:
- The HF config must carry `mtlora_adapter` (an adapter directory; pass it with
  `hf_overrides={"architectures": ["MtloraLlamaForCausalLM"], "mtlora_adapter": PATH}`). The adapter is loaded
  and fully validated against the base config (`mtlora.checkpoint.load_adapter`: shapes, finite values, base
  fingerprint) while the model is built, so a bad adapter fails before any base weight is read; errors are
  `ConfigError` / `CheckpointError` naming the file and field.
- Only block-level adapters (`method: mtlora`, placement ffn / attention / both, any N, any routing groups) are
  supported: component-level methods (hydralora, lora) adapt single projections that vLLM fuses (qkv, gate_up)
  and are rejected with a ConfigError naming `method`.
- Each decoder layer's `self_attn` / `mlp` is wrapped (`layers.AdaptedAttention` / `AdaptedMLP`), which moves the
  base parameters under `.block.`; `load_weights` renames the checkpoint's base tensor names to match and hands
  them to vLLM's own loader (stacking q/k/v and gate/up, sharding for tensor parallelism), then copies the adapter
  tensors (replicated on every rank) and returns every parameter name it filled, so vLLM's completeness check
  covers the adapter too. With pipeline parallelism only the layers this rank owns get an adapter.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM

from mtlora.checkpoint import load_adapter
from mtlora.config import AdapterConfig
from mtlora.errors import ConfigError
from mtlora.sites import site_dims

from .layers import WRAPPERS, BlockAdapter

logger = logging.getLogger(__name__)

ARCHITECTURE = "MtloraLlamaForCausalLM"
ADAPTER_KEY = "mtlora_adapter"   # hf_config attribute holding the adapter directory


class MtloraLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose decoder layers add a block-level mtLoRA delta to attention and/or the MLP."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hf_config = vllm_config.model_config.hf_config
        path = getattr(hf_config, ADAPTER_KEY, None)
        if not path:
            raise ConfigError(f"the model config has no {ADAPTER_KEY!r}: start vLLM with hf_overrides "
                              f"{{\"architectures\": [\"{ARCHITECTURE}\"], \"{ADAPTER_KEY}\": \"/path/to/adapter\"}}",
                              field=ADAPTER_KEY)
        config, tensors = load_adapter(path, model_config=hf_config)
        if config.method != "mtlora":
            raise ConfigError(f"{path}: the vLLM backend serves block-level adapters (method 'mtlora') only, "
                              f"got {config.method!r}; serve it with the native engine", field="method")
        self.adapter_path = str(path)
        self.adapter_config: AdapterConfig = config
        self._adapter_tensors: dict[str, torch.Tensor] | None = tensors   # CPU copies until load_weights
        self._wrap_layers(config, hf_config, vllm_config.model_config.dtype)
        logger.info("mtlora adapter %s: %s placement, %d experts, rank %d, layers %d..%d", path, config.placement,
                    config.num_experts, config.rank, self.model.start_layer, self.model.end_layer - 1)

    def _wrap_layers(self, config: AdapterConfig, hf_config, dtype: torch.dtype) -> None:
        # d_in == d_out == hidden_size for both block-level sites; ask the site table rather than assume it.
        for idx in range(self.model.start_layer, self.model.end_layer):
            layer = self.model.layers[idx]
            for site in config.sites():
                d_in, d_out = site_dims(hf_config, site)
                adapter = BlockAdapter(d_in, d_out, config, dtype=dtype)
                setattr(layer, site, WRAPPERS[site](getattr(layer, site), adapter))

    def _base_name(self, name: str) -> str:
        """Checkpoint name of a base tensor -> its name under the wrappers (`...mlp.x` -> `...mlp.block.x`)."""
        sites = "|".join(self.adapter_config.sites())
        return re.sub(rf"^(model\.layers\.\d+\.)({sites})\.", r"\1\2.block.", name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights((self._base_name(n), t) for n, t in weights)
        loaded |= self._load_adapter()
        return loaded

    @torch.no_grad()
    def _load_adapter(self) -> set[str]:
        """Copy the validated adapter tensors into this rank's layers; returns the parameter names filled."""
        tensors = self._adapter_tensors
        if tensors is None:
            raise ConfigError(f"{self.adapter_path}: adapter tensors were already loaded once", field=ADAPTER_KEY)
        params = dict(self.named_parameters())
        filled: set[str] = set()
        for idx in range(self.model.start_layer, self.model.end_layer):
            for site in self.adapter_config.sites():
                adapter = self.model.layers[idx].get_submodule(site).adapter
                for leaf, param in adapter.named_parameters():
                    param.copy_(tensors[f"layers.{idx}.{site}.{leaf}"].to(param.dtype))
                    filled.add(f"model.layers.{idx}.{site}.adapter.{leaf}")
                adapter.refresh()
        missing = filled - set(params)
        if missing:   # a naming bug here would otherwise surface as vLLM's "weights not initialized" error
            raise ConfigError(f"internal: adapter parameters {sorted(missing)[:3]} do not exist", field="model")
        self._adapter_tensors = None
        logger.info("loaded %d mtlora adapter tensors from %s", len(filled), self.adapter_path)
        return filled
