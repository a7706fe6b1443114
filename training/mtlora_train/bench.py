"""`mtlora-bench train`: optimizer-step time of mtlora vs hydralora vs lora on the same model and data, in one run.

Contract: for each method the real `MtloraRecipe` is set up on the same base model, data, batch size and sequence
length; `--warmup` steps are run untimed, then `--steps` optimizer steps are timed (forward, every loss term the
method uses, backward, clip, AdamW step). Printed as a table with ratios to the hydralora row (the paper reports
mtLoRA at 0.76x HydraLoRA's time) and written to JSON together with the trainable parameter counts.
Methods, as the paper compares them:
  mtlora    block-level FFN adapter + spectral regularisation (refreshed every step, its costliest setting)
            + fine-grained routing (g = 2) + balance loss
  hydralora component level on q_proj, v_proj + balance loss
  lora      plain LoRA on q_proj, v_proj
A timing is only comparable within one run; the machine's noise is reported as the spread over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mtlora_train.config import TrainConfig
from mtlora_train.losses import clear_routing
from mtlora_train.recipe import MtloraRecipe

logger = logging.getLogger(__name__)


def method_configs(args, hidden_size: int) -> dict[str, dict]:
    common = dict(lora_rank=args.rank, lora_nums=args.experts, lora_alpha=2.0 * args.rank, lora_dropout=0.05,
                  per_device_train_batch_size=args.batch_size, max_seq_length=args.seq_len, bf16=args.bf16,
                  save_steps=0, save_strategy="no", logging_steps=10**9, learning_rate=1e-4, seed=0,
                  prompt_format="qa")
    return {
        "mtlora": dict(common, method="mtlora", enable_block_adapter=True, block_adapter_type="ffn",
                       enable_spectral_reg=True, spectral_reg_lambda=1.0, spectral_reg_steps=1,
                       enable_fine_grained_routing=True, routing_group_size=hidden_size // 2, enable_blc=True),
        "hydralora": dict(common, method="hydralora", target_modules=["q_proj", "v_proj"], enable_blc=True),
        "lora": dict(common, method="lora", target_modules=["q_proj", "v_proj"], lora_nums=1),
    }


def time_steps(recipe: MtloraRecipe, warmup: int, steps: int) -> list[float]:
    """Seconds per optimizer step (gradient_accumulation_steps is 1 here, so one micro-batch per step)."""
    acc, times = recipe.accelerator, []
    batches = iter(recipe.loader)
    for i in range(warmup + steps):
        batch = next(batches)
        start = time.perf_counter()
        terms = recipe.loss_step(batch)
        acc.backward(terms["total"])
        acc.clip_grad_norm_(recipe.model.parameters(), 1.0)
        recipe.optimizer.step()
        recipe.optimizer.zero_grad(set_to_none=True)
        clear_routing(recipe.adapters.values())
        recipe.global_step += 1           # drives the spectral refresh schedule, as in train()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def run(args) -> dict:
    from mtlora.base import load_config, resolve_model

    model_dir = resolve_model(args.model)
    hidden = load_config(model_dir).hidden_size
    rows = {}
    with tempfile.TemporaryDirectory(prefix="mtlora-bench-train-") as tmp:
        for name, kw in method_configs(args, hidden).items():
            if args.methods and name not in args.methods:
                continue
            cfg = TrainConfig(model_name_or_path=str(model_dir), dataset_dir=args.data, output_dir=f"{tmp}/{name}",
                              data_cache_dir=f"{tmp}/cache", **kw)
            recipe = MtloraRecipe(cfg).setup()
            params = sum(p.numel() for p in recipe.model.parameters() if p.requires_grad)
            times = time_steps(recipe, args.warmup, args.steps)
            rows[name] = {"step_s": statistics.mean(times), "step_s_min": min(times),
                          "step_s_stdev": statistics.pstdev(times), "trainable_params": params}
            logger.info("%s: %.3f s/step (%d params)", name, rows[name]["step_s"], params)
            del recipe
    ref = rows.get("hydralora", {}).get("step_s")
    for row in rows.values():
        row["x_hydralora"] = row["step_s"] / ref if ref else None
    return {"model": str(model_dir), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "args": {k: v for k, v in vars(args).items() if k != "output"}, "rows": rows}


def print_table(result: dict) -> None:
    print(f"\n{'method':<10} {'s/step':>8} {'min':>8} {'stdev':>8} {'x hydralora':>12} {'trainable':>12}")
    for name, r in result["rows"].items():
        ratio = f"{r['x_hydralora']:.2f}" if r["x_hydralora"] is not None else "-"
        print(f"{name:<10} {r['step_s']:8.3f} {r['step_s_min']:8.3f} {r['step_s_stdev']:8.3f} {ratio:>12} "
              f"{r['trainable_params']:>12,}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtlora-bench train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="Base model directory or hub id (default: the embedded model).")
    p.add_argument("--data", default="../shared/data/bigbench_mt/train.jsonl",
                   help="Training records (.jsonl file or folder) in the mtLoRA schema.")
    p.add_argument("--methods", type=lambda s: s.split(","), default=None,
                   help="Comma-separated subset of mtlora,hydralora,lora (default: all three).")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r for every method.")
    p.add_argument("--experts", type=int, default=8, help="Experts N for mtlora and hydralora.")
    p.add_argument("--batch-size", type=int, default=4, help="Sequences per optimizer step.")
    p.add_argument("--seq-len", type=int, default=256, help="Maximum tokens per sequence (longer are cut).")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps per method.")
    p.add_argument("--steps", type=int, default=5, help="Timed steps per method.")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as in the paper's runs).")
    p.add_argument("--output", default=None, help="Write the result JSON here.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(args)
    print_table(result)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
