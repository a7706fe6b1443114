"""`mtlora-bench ops`: the adapter work of one decode step, alone (no base model): kernel vs stacked vs per-slot.

What it times: `AdapterSlots.apply_shared` for every layer and every group of sites sharing an input, exactly as
the model's forward calls it, for DECODE rows (one row per request) spread over the loaded slots, the runner's
layout (each slot's rows contiguous). Adapters: the engine bench's four (`bench_engine.adapter_specs`: mtlora FFN,
mtlora attention, hydralora, lora) in turn over `--slots`, or `--kinds lora` (all plain LoRA, q/k/v/o, r 16);
random weights (scale 0.02). Rows per slot: equal (`--zipf 0`), or Zipf-like (slot k gets ~1/(k+1)^s of the rows,
at least one). Three paths, alternating round by round in one process so the machine's drift hits all alike:
`kernel` (the engine's default on CPU: every small slot of a site group in one C++ call, engine/cpu_adapters.py;
left out with a note when it cannot be built), `stacked` (the torch fallback: same-shape small slots together,
engine/slot_stack.py) and `per_slot` (every slot on its own, `lora_ops.STACK_MIN_SLOTS` raised past the number
of slots). Reports medians (ms per step) and the ratios to per_slot.
Only the model's config.json is read (dims and layer count). CPU; on CUDA the Triton path runs instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

GROUPS = {"attn_in": ["self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
          "mlp_in": ["mlp", "mlp.gate_proj", "mlp.up_proj"], "o_in": ["self_attn.o_proj"],
          "act_in": ["mlp.down_proj"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtlora-bench ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory or name (config.json only; default SmolLM2)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="slot and input dtype")
    p.add_argument("--slots", type=int, default=4, help="adapters loaded, one per slot (default 4)")
    p.add_argument("--kinds", default="mix", choices=["mix", "lora"],
                   help="mix: the engine bench's 4 adapters in turn; lora: all plain LoRA q/k/v/o r 16")
    p.add_argument("--rows", type=int, default=64, help="decode rows in the step (default 64)")
    p.add_argument("--zipf", type=float, default=0.0, help="rows per slot ~ 1/(k+1)^s (0: equal; default 0)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per path (default 3)")
    p.add_argument("--iters", type=int, default=10, help="timed steps per round (default 10)")
    p.add_argument("--routing-stats", action="store_true",
                   help="time the step the engine samples routing statistics on (every ROUTING_STATS_EVERY-th "
                        "step): every call records into a RoutingStats, flushed at the step's end as the runner does")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    return p


def model_dims(model: str | None) -> SimpleNamespace:
    from mtlora.base import resolve_model

    c = json.loads((Path(resolve_model(model)) / "config.json").read_text())
    heads = c["num_attention_heads"]
    return SimpleNamespace(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                           num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
                           num_key_value_heads=c.get("num_key_value_heads", heads),
                           head_dim=c.get("head_dim") or c["hidden_size"] // heads)


def rows_per_slot(rows: int, slots: int, zipf: float) -> list[int]:
    """Decode rows of each slot: equal shares, or Zipf-like shares (each slot at least one row)."""
    if rows < slots:
        raise ValueError(f"--rows {rows} is fewer than --slots {slots} (every slot needs a row)")
    w = [1.0 / (k + 1) ** zipf for k in range(slots)]
    out = [max(1, int(rows * x / sum(w))) for x in w]
    out[0] += rows - sum(out)
    return out


def load_slots(cfg, slots: int, kinds: str, dtype: torch.dtype):
    from mtlora.config import AdapterConfig
    from mtlora.reference import random_adapter_tensors
    from mtlora_server.bench_engine import adapter_specs
    from mtlora_server.engine.lora_ops import AdapterSlots

    specs = adapter_specs(cfg.hidden_size)
    names = list(specs) if kinds == "mix" else ["lora"]
    table = AdapterSlots(cfg, max_adapters=slots, max_rank=16, max_experts=8, max_groups=4, dtype=dtype)
    for s in range(slots):
        config = AdapterConfig(**specs[names[s % len(names)]])
        table.load(s, config, random_adapter_tensors(config, cfg, seed=s, scale=0.02))
    return table


def step_fn(cfg, table, counts: list[int], dtype: torch.dtype, routing_stats: bool = False):
    """One decode step's adapter work (every layer, every site group), as the forward calls it; with
    `routing_stats`, a sampled step (records into a RoutingStats, flushed at the end)."""
    from mtlora.sites import site_dims
    from mtlora_server.engine.lora_ops import RoutingStats, SlotPlan

    idx = torch.cat([torch.full((c,), s, dtype=torch.long) for s, c in enumerate(counts)])     # [T]
    T, plan = idx.shape[0], SlotPlan(idx)
    g = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(T, site_dims(cfg, v[0])[0], generator=g).to(dtype) for k, v in GROUPS.items()}
    outs = {k: [(s, torch.zeros(T, site_dims(cfg, s)[1], dtype=dtype)) for s in v] for k, v in GROUPS.items()}

    stats = RoutingStats() if routing_stats else None

    def run() -> None:
        for layer in range(cfg.num_hidden_layers):
            active = set(table.active_sites(layer))
            for k in GROUPS:
                targets = [(s, o) for s, o in outs[k] if s in active]
                if targets:
                    table.apply_shared(layer, xs[k], targets, idx, stats=stats, plan=plan)
        if stats is not None:
            stats.flush()
    return run


def main(argv: list[str] | None = None) -> int:
    from mtlora_server.engine import cpu_adapters, lora_ops

    args = build_parser().parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cfg = model_dims(args.model)
    counts = rows_per_slot(args.rows, args.slots, args.zipf)
    table = load_slots(cfg, args.slots, args.kinds, dtype)
    run = step_fn(cfg, table, counts, dtype, args.routing_stats)
    default_min = lora_ops.STACK_MIN_SLOTS
    ext = cpu_adapters.kernel()
    paths = [("stacked", default_min, None), ("per_slot", args.slots + 1, None)]
    if ext is None:
        print("kernel path left out: the CPU adapter kernel is unavailable here (see the log)")
    else:
        paths.insert(0, ("kernel", default_min, ext))
    times: dict[str, list[float]] = {name: [] for name, _, _ in paths}
    try:
        for _ in range(args.rounds):
            for path, minimum, kernel in paths:
                lora_ops.STACK_MIN_SLOTS = minimum
                table.cpu_kernel = kernel
                run()                                                       # warm (packs, stacks)
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    run()
                    times[path].append((time.perf_counter() - t0) * 1e3)
    finally:
        lora_ops.STACK_MIN_SLOTS = default_min
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"slots": args.slots, "kinds": args.kinds, "rows_per_slot": counts, "dtype": args.dtype,
              "layers": cfg.num_hidden_layers, "routing_stats": args.routing_stats, "ms_per_step": med,
              "stacked_over_per_slot": med["stacked"] / med["per_slot"], "threads": torch.get_num_threads(),
              "kernel_over_stacked": med["kernel"] / med["stacked"] if "kernel" in med else None}
    print(f"adapter work of one {'sampled ' if args.routing_stats else ''}decode step ({args.slots} slots, "
          f"{args.kinds}, rows {counts}, {args.dtype}, {cfg.num_hidden_layers} layers, "
          f"{torch.get_num_threads()} threads)")
    for k, v in med.items():
        print(f"  {k:9s} {v:8.2f} ms   (every step: {' '.join(f'{t:.1f}' for t in times[k])})")
    print(f"  stacked / per_slot: {result['stacked_over_per_slot']:.2f}x")
    if result["kernel_over_stacked"] is not None:
        print(f"  kernel / stacked: {result['kernel_over_stacked']:.2f}x, kernel / per_slot: "
              f"{med['kernel'] / med['per_slot']:.2f}x")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
