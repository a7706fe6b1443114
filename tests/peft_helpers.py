"""PEFT LoRA adapters written by the `peft` library itself, and the logits of peft's own `PeftModel`, for tests.

Contract: `write_peft_adapter(path, model_dir, seed, **lora_config)` builds `peft.get_peft_model` on the LLaMA in
`model_dir` with `LoraConfig(**lora_config)`, overwrites every LoRA weight with random non-zero values (PEFT
initialises B to zero, which would make any adapter look right) and `save_pretrained`s it to `path`.
`peft_logits(model_dir, path, ids)` is `PeftModel.from_pretrained(...)`'s fp32 logits [T, V] for one sequence.
`PEFT_CASES` are the LoraConfig variants every PEFT test runs over (each honoured field at least once).
"""

from __future__ import annotations

from pathlib import Path

import torch

PEFT_CASES: dict[str, dict] = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-proj": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"]),
    "all-linear-rslora": dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True),
    "rank-alpha-pattern": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                               rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 3},
                               alpha_pattern={"down_proj": 5}),
    "rslora-rank-pattern": dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], use_rslora=True,
                                rank_pattern={"o_proj": 6}),
    "layers-to-transform": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"],
                                layers_to_transform=[1], layers_pattern="layers"),
    "regex-targets": dict(r=4, lora_alpha=8, target_modules=r".*\.layers\.0\.self_attn\.(q|k)_proj|.*\.up_proj"),
    "exclude-modules": dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "up_proj"],
                            exclude_modules=r"model\.layers\.1\.self_attn\.v_proj"),
}


def _base(model_dir: str | Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


def write_peft_adapter(path: str | Path, model_dir: str | Path, seed: int = 0, safe: bool = True,
                       **lora_config) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_base(model_dir), LoraConfig(**lora_config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(path), safe_serialization=safe)
    return Path(path)


@torch.no_grad()
def peft_logits(model_dir: str | Path, adapter: str | Path, ids: list[int]) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(model_dir), str(adapter)).eval()
    return model(input_ids=torch.tensor([ids])).logits[0].float()
