"""Pictures of a training run: loss terms over steps, the singular-value spectrum of the experts, expert routing.

Contract:
- `plot_history(history, path)`: CE, spectral and balance terms and the learning rate against the optimizer step
  (`history` as in `log_history.jsonl`).
- `expert_spectra(tensors) -> {site: [N, r]}`: singular values of every expert B_i (`*.lora_B`, [N, d_out, r]);
  `plot_spectrum(tensors, path)`: per expert, the spectrum normalised by its largest value, averaged over sites
  (band: min..max over sites) -- what the spectral regulariser acts on.
- `routing_usage(model, adapters, batches) -> {site: [N]}`: mean routing weight per expert over the real tokens of
  `batches` (eval mode, no grad); `plot_routing(usage, path)`: sites x experts heatmap.
- `write_training_plots(output_dir, history, tensors, usage=None)` writes loss.png, spectrum.png and (given
  usage) routing.png and returns their paths; without matplotlib it logs why and returns [].
- `python -m mtlora_train.plots OUTPUT_DIR [--routing]` draws loss.png and spectrum.png from what a finished run
  wrote; `--routing` also draws routing.png by rebuilding the run from its saved config (base model + data) and
  routing its first training batches through the final adapter, as the run itself does at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TERMS = (("ce", "cross-entropy"), ("spectral", "spectral term"), ("balance", "balance term"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict], path: Path) -> Path:
    plt = _pyplot()
    present = [(k, label) for k, label in TERMS if any(e.get(k) is not None for e in history)]
    fig, axes = plt.subplots(1, len(present) + 1, figsize=(4 * (len(present) + 1), 3.2))
    steps = [e["step"] for e in history]
    window = max(1, len(history) // 20)
    for ax, (key, label) in zip(axes, present):
        values = [e.get(key, float("nan")) for e in history]
        ax.plot(steps, values, lw=0.8, alpha=0.45 if window > 1 else 1.0)
        if window > 1:                                                     # per-step values are noisy
            smooth = torch.tensor(values, dtype=torch.float64).unfold(0, window, 1).mean(-1)
            ax.plot(steps[window - 1:], smooth.tolist(), lw=1.6, label=f"mean of {window} steps")
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xlabel("step")
    axes[-1].plot(steps, [e["lr"] for e in history], color="tab:gray", lw=1)
    axes[-1].set_title("learning rate")
    axes[-1].set_xlabel("step")
    return _save(fig, path)


def expert_spectra(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Singular values [N, r] of every site's expert matrices, on the CPU (matplotlib reads host memory; a run on
    CUDA hands over device tensors)."""
    return {name.removesuffix(".lora_B"): torch.linalg.svdvals(t.detach().float()).cpu() for name, t in tensors.items()
            if name.endswith(".lora_B")}                                    # [N, r] each


def plot_spectrum(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    plt = _pyplot()
    spectra = torch.stack(list(expert_spectra(tensors).values()))           # [sites, N, r]
    norm = spectra / spectra[..., :1].clamp_min(1e-12)                     # each spectrum / its largest value
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    k = torch.arange(1, norm.shape[-1] + 1)
    for i in range(norm.shape[1]):
        ax.plot(k, norm[:, i].mean(0), lw=1.2, label=f"expert {i}")
        ax.fill_between(k, norm[:, i].amin(0), norm[:, i].amax(0), alpha=0.12)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("sigma_k / sigma_1")
    ax.set_title(f"spectrum of B_i (mean over {norm.shape[0]} sites)")
    if norm.shape[1] <= 16:
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


@torch.no_grad()
def routing_usage(model, adapters: dict, batches) -> dict[str, torch.Tensor]:
    """Mean routing weight per expert ([N]) of every routed adapter site over the real tokens of `batches`."""
    routed = {name: a for name, a in adapters.items() if a.num_experts > 1}
    sums = {name: torch.zeros(a.num_experts, dtype=torch.float64) for name, a in routed.items()}
    count = 0.0
    was_training = model.training
    model.eval()
    previous = {name: a.record_routing for name, a in routed.items()}
    try:
        for a in routed.values():
            a.record_routing = True
        for batch in batches:
            mask = batch["attention_mask"]
            model(input_ids=batch["input_ids"], attention_mask=mask)
            m = mask.to(torch.float64)[..., None, None]                    # [B, T, 1, 1]
            for name, a in routed.items():
                w = a.last_routing.to(torch.float64)                        # [B, T, g, N]
                sums[name] += (w * m).sum(dim=(0, 1, 2)).cpu() / w.shape[2]
                a.last_routing = None
            count += float(mask.sum())
    finally:
        for name, a in routed.items():
            a.record_routing, a.last_routing = previous[name], None
        model.train(was_training)
    return {name: (s / max(count, 1.0)).float() for name, s in sums.items()}


def plot_routing(usage: dict[str, torch.Tensor], path: Path) -> Path:
    plt = _pyplot()
    names = list(usage)
    grid = torch.stack([usage[n].detach().float().cpu() for n in names]).numpy()   # [sites, N]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * grid.shape[1], 1.2 + 0.22 * len(names)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_yticks(range(len(names)), [n.removeprefix("layers.") for n in names], fontsize=6)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xlabel("expert")
    ax.set_title("mean routing weight")
    fig.colorbar(im, ax=ax, fraction=0.05)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def write_training_plots(output_dir: Path, history: list[dict], tensors: dict[str, torch.Tensor],
                         usage: dict[str, torch.Tensor] | None = None) -> list[Path]:
    try:
        _pyplot()
    except ImportError:
        logger.warning("matplotlib is not installed (pip install -e '.[train]'): no training plots")
        return []
    out = Path(output_dir)
    paths = [plot_history(history, out / "loss.png")] if history else []
    if any(k.endswith(".lora_B") for k in tensors):
        paths.append(plot_spectrum(tensors, out / "spectrum.png"))
    if usage:
        paths.append(plot_routing(usage, out / "routing.png"))
    return paths


def run_routing_usage(output_dir: Path) -> dict[str, torch.Tensor]:
    """`routing_usage` of a finished run: its config (mtlora_train.state.run_config), the final adapter, and the
    first training batches -- the numbers the run's own routing.png shows."""
    from mtlora_train import state
    from mtlora_train.config import TrainConfig, field_names
    from mtlora_train.recipe import MtloraRecipe

    saved = state.run_config(output_dir)
    known = field_names()
    fields = {k: v for k, v in saved.items() if k in known}
    fields.update(output_dir=str(output_dir), resume_from_checkpoint=None, report_to="none")
    cfg = TrainConfig(**fields)
    recipe = MtloraRecipe(cfg).setup()
    recipe.load_adapter_weights(output_dir / "adapter")
    return recipe.routing_usage()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtlora_train.plots", description="Draw loss.png and spectrum.png "
                                "from a finished mtlora-train output folder (log_history.jsonl and adapter/).")
    p.add_argument("output_dir", help="the run's --output_dir")
    p.add_argument("--routing", action="store_true",
                   help="also draw routing.png (mean routing weight per site and expert): loads the base model and "
                        "the training data named in the run's saved config and routes its first batches through "
                        "the final adapter (run from the directory the training ran in if its paths are relative)")
    ns = p.parse_args(argv)
    from mtlora.checkpoint import load_adapter
    from mtlora.errors import MtloraError

    out = Path(ns.output_dir)
    try:
        history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines() if line.strip()]
        _, tensors = load_adapter(out / "adapter")
        usage = run_routing_usage(out) if ns.routing else None
    except (MtloraError, OSError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    for path in write_training_plots(out, history, tensors, usage):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
