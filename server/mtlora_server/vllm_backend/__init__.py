"""vLLM backend for ONE mtlora adapter: `mtlora-serve --engine vllm --model DIR --adapter PATH`.

- `plugin.register` (the `vllm.general_plugins` entry point) registers `MtloraLlamaForCausalLM` (`model.py`):
  vLLM's LLaMA whose `self_attn` / `mlp` sub-blocks are wrapped with a block-level mtLoRA adapter (`layers.py`).
- `launch.serve(args)` validates the inputs here, then runs vLLM's OpenAI server with the right `--hf-overrides`.
Importing this package does not import vLLM (or torch): the model module is imported by vLLM itself.
See docs/vllm-backend.md.
"""

from __future__ import annotations

from .launch import add_arguments, build_command, serve

__all__ = ["add_arguments", "build_command", "serve"]
