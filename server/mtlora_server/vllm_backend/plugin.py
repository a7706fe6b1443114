"""vLLM general plugin: registers `MtloraLlamaForCausalLM` with vLLM's model registry.

Declared in pyproject.toml under `[project.entry-points."vllm.general_plugins"]`, so vLLM calls `register()` in
every process it starts (API server, engine core, workers) once `mtlora` is installed in vLLM's environment
(`pip install --no-deps -e /path/to/mtlora`). The class is registered by "module:class" name: vLLM imports it only
when a model asks for that architecture, and registering twice is harmless (vLLM may call plugins repeatedly).
"""

from __future__ import annotations

ARCHITECTURE = "MtloraLlamaForCausalLM"
MODEL_CLASS = "mtlora_server.vllm_backend.model:MtloraLlamaForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
