"""`mtlora-train gradient-conflict`: inter-task gradient conflict of component- vs block-level adapters.

The mechanism figure of the mtLoRA paper: per task t, the gradient g_t of the task's cross-entropy with respect to
all adapter parameters (one flat vector per adapter arm), then the pairwise cosine similarity C[s, t] between tasks.

Contract:
- `task_gradients(model, adapters, batches_by_task)` -> {task: {layer: flat fp32 gradient}}: the mean over the task's
  batches of d CE / d theta (model in eval mode: no dropout, deterministic), per decoder layer so that per-layer
  similarities come from the same pass. The base model is frozen; only adapter tensors get gradients.
- `init_task_gradients(model, arm_adapters, batches_by_task)` -> {arm: same}: the same numbers for several arms at
  their initialisation in ONE pass over the data: while every B is zero an adapter adds nothing to the forward and
  nothing to the backward Jacobian, so the gradient reaching each adapter site's output (delta = dL/d site output)
  is the base model's; hooks on the base model's sites record the site input x and delta, and each arm's own
  `MoLoRA` gives d<adapter(x), delta>/d theta (exact: `test_shared_pass_equals_attached_gradients`). Used by `run`
  for the arms measured at init (no `--adapter`); a trained adapter is measured attached (`task_gradients`).
- `cosine_matrix(grads)` -> (tasks, C [T, T], per-layer C [L, T, T]) from Gram matrices (the whole-model Gram is the
  sum of the per-layer Grams).
- `conflict_stats(C)`: over the T(T-1)/2 task pairs: `mean_similarity` (mean off-diagonal cosine: the statistic
  the official analysis script `tables/analysis/figS3_gradient_compare.py` compares; its "reduction" is
  (component - block) / component of this number, read there as "lower similarity = less conflict"),
  `conflict_share` (fraction of pairs with cosine < 0: the usual meaning of gradient conflict, as in PCGrad),
  `conflict_magnitude` (mean of max(0, -cos) over pairs) and `mean_abs_similarity`.
- `run(cfg)` loads the base model and the data once, attaches each arm in turn (`mtlora.inject.attach` /
  `detach`, seeded init; B = 0 at init so only B gets a gradient there, or the tensors of a trained adapter with
  `--adapter ARM=DIR`), writes `gradient_conflict.json` and `gradient_conflict.png` (a heatmap per arm, the
  distribution of off-diagonal cosines, and the per-layer mean similarity) to `--output_dir`, and returns the
  result dict. Reductions are reported for every (component arm, block arm) pair.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mtlora import inject
from mtlora.errors import ConfigError, MtloraError

logger = logging.getLogger(__name__)

# Arm name -> TrainConfig fields (N = experts, r = rank come from the command line).
ARMS = {
    "lora": dict(method="lora", target_modules=["q_proj", "v_proj"]),
    "hydralora": dict(method="hydralora", target_modules=["q_proj", "v_proj"]),
    "block": dict(method="mtlora", enable_block_adapter=True, block_adapter_type="ffn"),
    "block_lora": dict(method="mtlora", enable_block_adapter=True, block_adapter_type="ffn", lora_nums=1),
}
BLOCK_ARMS = ("block", "block_lora")


@dataclass
class ConflictConfig:
    model_name_or_path: str | None = None
    dataset_dir: str = "../shared/data/bigbench_mt"
    output_dir: str = "output/gradient_conflict"
    arms: list[str] = field(default_factory=lambda: ["lora", "hydralora", "block"])
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_nums: int = 8
    batches_per_task: int = 3
    batch_size: int = 4
    max_seq_length: int = 256
    prompt_format: str = "qa"
    max_tasks: int = 0
    seed: int = 42
    adapters: dict[str, str] = field(default_factory=dict)
    data_cache_dir: str | None = None


# -- measurement ---------------------------------------------------------------------------------------------------
def _layer_of(prefix: str) -> int:
    return int(prefix.split(".")[1])                         # "layers.3.mlp" -> 3


def task_gradients(model, adapters: dict, batches_by_task: dict[str, list[dict]],
                   progress: bool = True) -> dict[str, dict[int, torch.Tensor]]:
    """{task: {layer: flat mean gradient of the task's CE w.r.t. that layer's adapter tensors}}."""
    model.eval()
    out: dict[str, dict[int, torch.Tensor]] = {}
    total = sum(len(b) for b in batches_by_task.values())
    bar = tqdm(total=total, desc="gradients", unit="batch", disable=not progress)
    for task, batches in batches_by_task.items():
        for a in adapters.values():
            for p in a.parameters():
                p.grad = None
        for batch in batches:
            with torch.enable_grad():
                loss = model(**batch).loss / len(batches)
                loss.backward()
            bar.update(1)
        per_layer: dict[int, list[torch.Tensor]] = {}
        for prefix, a in adapters.items():
            for p in a.parameters():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                per_layer.setdefault(_layer_of(prefix), []).append(g.detach().float().reshape(-1))
        out[task] = {layer: torch.cat(gs) for layer, gs in sorted(per_layer.items())}
    bar.close()
    for a in adapters.values():
        for p in a.parameters():
            p.grad = None
    return out


def _site_module(model, prefix: str):
    layer = inject.decoder_layers(model)[_layer_of(prefix)]
    return layer.get_submodule(prefix.split(".", 2)[2])                  # "layers.3.self_attn.q_proj" -> q_proj


def init_task_gradients(model, arm_adapters: dict[str, dict], batches_by_task: dict[str, list[dict]],
                        progress: bool = True) -> dict[str, dict[str, dict[int, torch.Tensor]]]:
    """{arm: {task: {layer: flat gradient}}} of freshly initialised (B = 0) adapters of several arms, one pass.

    `arm_adapters`: {arm: {prefix: MoLoRA}} built by `inject.attach` and then detached (the base model runs bare).
    """
    for adapters in arm_adapters.values():
        for a in adapters.values():
            if bool(a.lora_B.detach().any()):
                raise ConfigError("the shared pass is exact only at initialisation (every B == 0)", field="adapter")
    prefixes = sorted({p for adapters in arm_adapters.values() for p in adapters})
    captured: dict[str, dict[str, torch.Tensor]] = {}

    def hook(prefix):
        def fn(module, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[prefix] = {"x": x.detach()}
            out = output[0] if isinstance(output, tuple) else output
            out.register_hook(lambda g: captured[prefix].__setitem__("delta", g.detach()))
        return fn

    handles = [_site_module(model, p).register_forward_hook(hook(p), with_kwargs=True) for p in prefixes]
    model.eval()
    for adapters in arm_adapters.values():
        for a in adapters.values():
            a.eval()
    sums = {arm: {} for arm in arm_adapters}
    bar = tqdm(total=sum(len(b) for b in batches_by_task.values()), desc="gradients (shared pass)", unit="batch",
               disable=not progress)
    try:
        for task, batches in batches_by_task.items():
            acc = {arm: {} for arm in arm_adapters}
            for batch in batches:
                captured.clear()
                with torch.enable_grad():
                    # the base is frozen: a grad-requiring input makes backward run through it
                    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
                    loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                 labels=batch["labels"]).loss
                    (loss / len(batches)).backward()
                for arm, adapters in arm_adapters.items():
                    for prefix, a in adapters.items():
                        c = captured[prefix]
                        params = list(a.parameters())
                        with torch.enable_grad():
                            y = a(c["x"])                                          # [B, T, d_out]
                            gs = torch.autograd.grad((y.float() * c["delta"].float()).sum(), params,
                                                     allow_unused=True)
                        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).float().reshape(-1)
                                          for g, p in zip(gs, params)])
                        acc[arm][prefix] = acc[arm].get(prefix, 0) + flat
                bar.update(1)
            for arm, adapters in arm_adapters.items():          # same layout as task_gradients
                per_layer: dict[int, list[torch.Tensor]] = {}
                for prefix in adapters:
                    per_layer.setdefault(_layer_of(prefix), []).append(acc[arm][prefix])
                sums[arm][task] = {layer: torch.cat(v) for layer, v in sorted(per_layer.items())}
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return sums


def cosine_matrix(grads: dict[str, dict[int, torch.Tensor]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(tasks, C [T, T], per-layer C [L, T, T]) of the task gradients (float64)."""
    tasks = list(grads)
    layers = list(next(iter(grads.values())))
    grams = []
    for layer in layers:
        m = torch.stack([grads[t][layer] for t in tasks]).double()          # [T, P_l]
        grams.append(m @ m.T)                                                # [T, T]
    gram = torch.stack(grams)                                                # [L, T, T]

    def cos(g: torch.Tensor) -> torch.Tensor:
        d = torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(1e-30).sqrt()      # [..., T]
        return g / (d[..., :, None] * d[..., None, :])

    return tasks, cos(gram.sum(0)), cos(gram)


def conflict_stats(c: torch.Tensor) -> dict[str, float]:
    """Statistics over the off-diagonal task pairs i < j of a cosine matrix (see the module docstring)."""
    i, j = torch.triu_indices(c.shape[0], c.shape[1], offset=1)
    v = c[i, j].double()
    return {"mean_similarity": float(v.mean()), "conflict_share": float((v < 0).double().mean()),
            "conflict_magnitude": float((-v).clamp_min(0).mean()), "mean_abs_similarity": float(v.abs().mean()),
            "pairs": int(v.numel())}


def reductions(stats: dict[str, dict]) -> dict[str, dict[str, float]]:
    """For every (component arm, block arm) pair: relative reduction (comp - block) / comp of each statistic."""
    out = {}
    for comp in (a for a in stats if a not in BLOCK_ARMS):
        for block in (a for a in stats if a in BLOCK_ARMS):
            out[f"{block}_vs_{comp}"] = {
                k: (stats[comp][k] - stats[block][k]) / stats[comp][k] if stats[comp][k] else float("nan")
                for k in ("mean_similarity", "conflict_share", "conflict_magnitude", "mean_abs_similarity")}
    return out


# -- data ----------------------------------------------------------------------------------------------------------
def task_batches(dataset, tasks: list[str], batches_per_task: int, batch_size: int, seed: int,
                 pad_id: int) -> dict[str, list[dict]]:
    """The same fixed sample of training examples per task for every arm."""
    from mtlora_train.data import Collator

    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(dataset.task_types()):
        by_task.setdefault(t, []).append(i)
    rng = random.Random(seed)
    collate = Collator(pad_id)
    out = {}
    for t in tasks:
        idx = by_task[t][:]
        rng.shuffle(idx)
        idx = idx[: batches_per_task * batch_size]
        out[t] = [collate([dataset[k] for k in idx[s: s + batch_size]]) for s in range(0, len(idx), batch_size)]
    return out


def _arm_config(cfg: ConflictConfig, arm: str):
    from mtlora_train.config import TrainConfig

    if arm not in ARMS:
        raise ConfigError(f"unknown arm {arm!r}; expected some of {sorted(ARMS)}", field="arms")
    fields = dict(lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_nums=cfg.lora_nums, lora_dropout=0.0)
    fields.update(ARMS[arm])
    return TrainConfig(**fields).validate().adapter_config()


# -- driver --------------------------------------------------------------------------------------------------------
def run(cfg: ConflictConfig, model=None, tokenizer=None, progress: bool = True) -> dict:
    from mtlora.base import load_base_model, load_tokenizer, resolve_model
    from mtlora_train.data import load_dataset

    if model is None:
        path = resolve_model(cfg.model_name_or_path)
        model = load_base_model(path, torch.float32, "cpu")
        tokenizer = tokenizer or load_tokenizer(path)
    model.requires_grad_(False)
    model.config.use_cache = False
    dataset = load_dataset(cfg.dataset_dir, tokenizer, cfg.max_seq_length, cfg.prompt_format, cfg.data_cache_dir)
    tasks = sorted(set(dataset.task_types()))
    if cfg.max_tasks:
        tasks = tasks[: cfg.max_tasks]
    if len(tasks) < 2:
        raise ConfigError(f"need at least 2 tasks (task_type) in {cfg.dataset_dir}, found {tasks}",
                          field="dataset_dir")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = task_batches(dataset, tasks, cfg.batches_per_task, cfg.batch_size, cfg.seed, pad)
    result = {"config": asdict(cfg), "tasks": tasks, "arms": {}}
    grads, counts = {}, {}
    at_init = {}
    for arm in cfg.arms:
        acfg = _arm_config(cfg, arm)
        torch.manual_seed(cfg.seed)
        adapters = inject.attach(model, acfg)
        try:
            for a in adapters.values():
                a.float().requires_grad_(True)
            counts[arm] = (acfg.method, sum(p.numel() for a in adapters.values() for p in a.parameters()))
            if arm in cfg.adapters:
                from mtlora.checkpoint import load_adapter

                _, tensors = load_adapter(cfg.adapters[arm], model.config)
                inject.load_adapter_state(model, tensors, source=cfg.adapters[arm])
                logger.info("arm %s (%s, %s params, %s): gradients of %d tasks", arm, acfg.method,
                            f"{counts[arm][1]:,}", cfg.adapters[arm], len(tasks))
                grads[arm] = task_gradients(model, adapters, batches, progress)
            else:
                at_init[arm] = adapters
        finally:
            inject.detach(model)
    if at_init:
        logger.info("arms %s at initialisation: one shared pass over %d tasks", list(at_init), len(tasks))
        grads.update(init_task_gradients(model, at_init, batches, progress))
    for arm in cfg.arms:
        _, c, c_layers = cosine_matrix(grads[arm])
        method, n = counts[arm]
        result["arms"][arm] = {"method": method, "trainable_params": n, "weights": cfg.adapters.get(arm, "init"),
                               "similarity_matrix": c.tolist(), "stats": conflict_stats(c),
                               "per_layer_mean_similarity": [conflict_stats(x)["mean_similarity"] for x in c_layers]}
        logger.info("arm %s: %s", arm, result["arms"][arm]["stats"])
    result["reductions"] = reductions({a: r["stats"] for a, r in result["arms"].items()})
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradient_conflict.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot(result, out / "gradient_conflict.png")
    return result


def plot(result: dict, path: Path) -> Path:
    from mtlora_train.plots import _pyplot, _save

    plt = _pyplot()
    arms, tasks = list(result["arms"]), result["tasks"]
    fig, axes = plt.subplots(1, len(arms) + 2, figsize=(4.3 * len(arms) + 8.5, 4.4))
    for ax, arm in zip(axes, arms):
        r = result["arms"][arm]
        im = ax.imshow(torch.tensor(r["similarity_matrix"]).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(tasks)), [t[:12] for t in tasks], rotation=90, fontsize=5)
        ax.set_yticks(range(len(tasks)), [t[:12] for t in tasks], fontsize=5)
        s = r["stats"]
        ax.set_title(f"{arm} ({r['method']}, {r['trainable_params'] / 1e6:.2f}M)\nmean cos {s['mean_similarity']:.3f}, "
                     f"neg pairs {100 * s['conflict_share']:.0f}%", fontsize=8)
    fig.colorbar(im, ax=axes[len(arms) - 1], fraction=0.046)
    box = axes[len(arms)]
    offdiag = []
    for arm in arms:
        c = torch.tensor(result["arms"][arm]["similarity_matrix"])
        i, j = torch.triu_indices(len(tasks), len(tasks), offset=1)
        offdiag.append(c[i, j].numpy())
    box.boxplot(offdiag)
    box.set_xticks(range(1, len(arms) + 1), arms, fontsize=8)
    box.axhline(0, color="gray", lw=0.8)
    box.set_title("task-pair gradient cosine", fontsize=9)
    line = axes[len(arms) + 1]
    for arm in arms:
        line.plot(result["arms"][arm]["per_layer_mean_similarity"], marker=".", label=arm)
    line.axhline(0, color="gray", lw=0.8)
    line.set_xlabel("layer")
    line.set_title("mean pairwise cosine per layer", fontsize=9)
    line.legend(fontsize=7)
    return _save(fig, path)


# -- CLI -----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = ConflictConfig()
    p = argparse.ArgumentParser(prog="mtlora-train gradient-conflict", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Inter-task gradient conflict of component-level (LoRA/HydraLoRA on q,v) "
                                            "vs block-level (FFN) adapters: per-task adapter gradients, pairwise "
                                            "cosine similarity, heatmaps and summary numbers (docs/training.md).")
    p.add_argument("--model_name_or_path", default=d.model_name_or_path, help="base model; default: the default model")
    p.add_argument("--dataset_dir", default=d.dataset_dir, help="training records with task_type (as mtlora-train)")
    p.add_argument("--output_dir", default=d.output_dir, help="where gradient_conflict.json/.png are written")
    p.add_argument("--arms", default=",".join(d.arms),
                   help=f"comma-separated arms out of {sorted(ARMS)} (block = FFN block, N experts; block_lora = "
                        "FFN block with one expert)")
    p.add_argument("--lora_rank", type=int, default=d.lora_rank, help="rank r of every arm")
    p.add_argument("--lora_alpha", type=float, default=d.lora_alpha, help="alpha of every arm (scaling alpha / r)")
    p.add_argument("--lora_nums", type=int, default=d.lora_nums, help="experts N of hydralora and block")
    p.add_argument("--batches_per_task", type=int, default=d.batches_per_task, help="batches averaged per task")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="examples per batch")
    p.add_argument("--max_seq_length", type=int, default=d.max_seq_length, help="truncate sequences to this length")
    p.add_argument("--prompt_format", default=d.prompt_format, help="prompt layout, as mtlora-train")
    p.add_argument("--max_tasks", type=int, default=d.max_tasks, help="use only the first N tasks (0: all)")
    p.add_argument("--seed", type=int, default=d.seed, help="adapter init and example sample")
    p.add_argument("--adapter", action="append", default=[], metavar="ARM=DIR",
                   help="measure at a trained adapter's weights instead of the (B = 0) initialisation; repeatable")
    p.add_argument("--data_cache_dir", default=None, help="tokenised-data cache, as mtlora-train")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        adapters = {}
        for spec in ns.adapter:
            arm, sep, path = spec.partition("=")
            if not sep:
                raise ConfigError(f"--adapter expects ARM=DIR, got {spec!r}", field="adapter")
            adapters[arm] = path
        cfg = ConflictConfig(**{k: v for k, v in vars(ns).items() if k not in ("arms", "adapter")},
                             arms=[a.strip() for a in ns.arms.split(",") if a.strip()], adapters=adapters)
        for arm in cfg.arms:
            _arm_config(cfg, arm)
        result = run(cfg)
    except MtloraError as exc:
        print(f"mtlora-train gradient-conflict: error: {exc}", file=sys.stderr)
        return 2
    for arm, r in result["arms"].items():
        print(f"{arm:12s} {r['stats']}")
    for name, red in result["reductions"].items():
        print(f"{name}: " + ", ".join(f"{k} {100 * v:+.1f}%" for k, v in red.items()))
    return 0
