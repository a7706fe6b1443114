"""Helpers for engine tests and examples: tiny engines, random adapters on disk, run-to-completion.

Nothing here downloads anything; everything works on `mtlora.testing.make_tiny_model_dir` models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mtlora.checkpoint import save_adapter
from mtlora.config import AdapterConfig
from mtlora.reference import random_adapter_tensors

from .args import EngineArgs
from .core import EngineCore
from .types import GenerationRequest, TokenLogprob

# One adapter per method and placement, small enough for the tiny model (d=64, ffn=128, 2 layers).
TINY_ADAPTERS: dict[str, dict] = {
    "mt_ffn": dict(method="mtlora", placement="ffn", rank=4, num_experts=4, routing_group_size=16),
    "mt_attn": dict(method="mtlora", placement="attention", rank=4, num_experts=3),
    "mt_both": dict(method="mtlora", placement="both", rank=8, num_experts=2, routing_group_size=32),
    "hydra": dict(method="hydralora", rank=4, num_experts=3,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "lora": dict(method="lora", rank=4, target_modules=["q_proj", "v_proj", "down_proj"]),
}


def write_random_adapter(path: str | Path, model_config, seed: int = 0, scale: float = 0.2, **config) -> Path:
    """A random, non-trivial adapter directory (every B non-zero) for `model_config` at `path`."""
    cfg = AdapterConfig(**config)
    return save_adapter(path, cfg, random_adapter_tensors(cfg, model_config, seed=seed, scale=scale))


def write_tiny_adapters(root: str | Path, model_config) -> dict[str, str]:
    """One random adapter of every TINY_ADAPTERS kind under `root`; returns name -> directory."""
    return {name: str(write_random_adapter(Path(root) / name, model_config, seed=i, **cfg))
            for i, (name, cfg) in enumerate(TINY_ADAPTERS.items())}


def tiny_engine_args(model_dir: str | Path, **overrides) -> EngineArgs:
    kw = dict(model=str(model_dir), dtype="float32", device="cpu", kv_cache_memory=1 << 20,
              max_num_batched_tokens=96, max_num_seqs=16, max_groups=8)
    kw.update(overrides)
    return EngineArgs(**kw)


@dataclass
class Finished:
    """Everything a request produced, reassembled from its stream of RequestOutputs."""

    tokens: dict[int, list[int]] = field(default_factory=dict)
    text: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    finish_reason: dict[int, str] = field(default_factory=dict)
    stop_reason: dict[int, object] = field(default_factory=dict)
    prompt_logprobs: list | None = None
    num_outputs: int = 0
    finished: bool = False

    def add(self, out) -> None:
        if self.num_outputs == 0:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_outputs += 1
        self.finished = out.finished
        for d in out.deltas:
            self.tokens.setdefault(d.index, []).extend(d.token_ids)
            self.text[d.index] = self.text.get(d.index, "") + d.text
            if d.logprobs is not None:
                self.logprobs.setdefault(d.index, []).extend(d.logprobs)
            if d.finish_reason is not None:
                assert d.index not in self.finish_reason, "a sequence finished twice"
                self.finish_reason[d.index] = d.finish_reason
                self.stop_reason[d.index] = d.stop_reason


def run_to_completion(core: EngineCore, requests: list[GenerationRequest], max_steps: int = 10_000
                      ) -> dict[str, Finished]:
    results = {r.request_id: Finished() for r in requests}
    for r in requests:
        core.add_request(r)
    for _ in range(max_steps):
        if not core.has_work():
            break
        for out in core.step():
            results.setdefault(out.request_id, Finished()).add(out)
        if core.last_step_idle:                       # every queued request waits for an adapter load
            core.registry.wait_for_load(0.05)
    return results
