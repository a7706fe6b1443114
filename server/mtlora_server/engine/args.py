"""`EngineArgs`: every knob of the serving engine, with defaults and validation (errors name the field).

`Engine.from_args(EngineArgs(...))` builds an engine; `dtype` goes through `mtlora.base.parse_dtype`, the project's
one dtype policy: "auto" means bf16 on CUDA (fp16 without bf16 support), bf16 on a CPU with native bf16 matmuls
(avx512_bf16 / amx), else fp32. `kv_cache_memory` is a byte budget for the KV pool (None: 1 GiB on
CPU, `gpu_memory_utilization` (default 0.85) of the memory free after loading on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from mtlora.errors import ConfigError


@dataclass
class EngineArgs:
    model: str | None = None                  # local dir or hub id; None: mtlora.base's default model
    dtype: str = "auto"                       # auto | float32 | bfloat16 | float16
    device: str = "auto"                      # auto (cuda if available) | cpu | cuda | cuda:N
    max_num_seqs: int = 64                    # sequences running at once
    max_model_len: int | None = None          # prompt + output tokens; None: the model's max_position_embeddings
    max_num_batched_tokens: int = 2048        # tokens per step (prefill chunks + decodes)
    kv_cache_memory: int | None = None        # bytes for the KV pool
    block_size: int = 16                      # tokens per KV block
    max_adapters: int = 8                     # adapter slots: adapters resident at once (any number registered)
    max_lora_rank: int = 16
    max_experts: int = 16
    max_groups: int = 4
    adapters: dict[str, str] = field(default_factory=dict)   # name -> adapter directory, registered at start
    adapter_cache_size: int = 2 << 30         # bytes of validated adapter tensors kept in host memory (0: none)
    preload_adapters: bool = False            # read registered adapters into the host cache at start-up
    served_model_name: str | None = None      # name of the bare base model in the API; None: the model's name
    max_waiting: int = 1024                   # waiting sequences before EngineOverloadedError
    seed: int = 0                             # seeds sampling of requests without their own seed
    enforce_eager: bool = False               # no CUDA graphs / compilation: every step eager
    decode_graphs: str = "auto"               # auto | cudagraph | compile | static (engine/decode_graphs.py)
    enable_prefix_caching: bool = True        # reuse the K/V blocks of prefixes computed before
    batch_invariant: bool = False             # a request's numbers never depend on its batch (engine/invariant.py)
    cpu_attention: str = "auto"               # CPU decode attention: auto | kernel | torch (engine/cpu_attention.py)
    cpu_adapters: str = "auto"                # CPU small-slot adapter work: auto | kernel | torch (cpu_adapters.py)
    cpu_fused_ops: str = "auto"               # CPU norms / silu * up / rope: auto | kernel | torch (cpu_fused.py)
    gpu_memory_utilization: float | None = None   # CUDA: KV cache share of the memory free after loading (0, 1]

    def __post_init__(self) -> None:
        positive = ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_adapters", "max_lora_rank",
                    "max_experts", "max_groups", "max_waiting")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}", field=name)
        if not isinstance(self.adapter_cache_size, int) or self.adapter_cache_size < 0:
            raise ConfigError(f"adapter_cache_size must be a number of bytes >= 0, got {self.adapter_cache_size!r}",
                              field="adapter_cache_size")
        for name in ("max_model_len", "kv_cache_memory"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}", field=name)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
            raise ConfigError(f"unknown dtype {self.dtype!r}; expected auto, float32, bfloat16 or float16",
                              field="dtype")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"unknown device {self.device!r}; expected auto, cpu, cuda or cuda:N", field="device")
        g = self.gpu_memory_utilization
        if g is not None and (not isinstance(g, (int, float)) or isinstance(g, bool) or not 0 < g <= 1):
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {g!r}", field="gpu_memory_utilization")
        if self.decode_graphs not in ("auto", "cudagraph", "compile", "static"):
            raise ConfigError(f"unknown decode_graphs {self.decode_graphs!r}; expected auto, cudagraph, compile or "
                              "static", field="decode_graphs")
        for name in ("cpu_attention", "cpu_adapters", "cpu_fused_ops"):
            if getattr(self, name) not in ("auto", "kernel", "torch"):
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; expected auto, kernel or torch",
                                  field=name)
        if not isinstance(self.adapters, dict):
            raise ConfigError("adapters must map names to adapter directories", field="adapters")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
