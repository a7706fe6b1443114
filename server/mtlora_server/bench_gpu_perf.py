"""Item 4 of `mtlora-bench gpu`: LLaMA-2-7B-shaped bf16 numbers against the device's own bounds.

Contract:
- The model is the engine's `LlamaDecoder` with random bf16 weights made on the device from the LLaMA-2-7B config
  (`LLAMA2_7B`; nothing is read from disk), a KV pool sized for the largest batch, and 8 random mtLoRA adapters
  (16 experts, r 16, g 2, FFN block placement) in `AdapterSlots`. Steps are built by `runner.build_batch`.
- Bounds, measured first on this device: copy bandwidth (a 2 GiB device-to-device copy: bytes read + written /
  time) and bf16 matmul peak (8192^3 `torch.mm`). Decode bound = bytes a step must read (every linear weight once,
  lm_head included, plus each sequence's K/V) / bandwidth. Prefill bound = useful FLOPs (2 x linear params x
  tokens + causal attention) / peak.
- Decode at batch 1, 16, 64, 256 (context `CTX` tokens each): the eager forward and the same forward captured in
  one CUDA graph (the Triton adapter path included, which proves it capturable end to end); step time = median
  of CUDA-event timings, the step's host-side batch building is reported apart. Targets: the better of the two
  within `DECODE_TARGET` x the bound at batch 1-64; mtLoRA overhead (every token on its own adapter among the 8,
  vs the bare base, same path) <= `OVERHEAD_TARGET` at every decode batch and for the prefill.
- Decode attention is the engine's: on CUDA the Triton kernel reading the paged pool in place
  (`LlamaDecoder.enable_paged_kernel`, engine/triton_attention.py). `attention_ab` times the base step at the
  largest batch <= 64 again with the torch gather path, so a report shows what the kernel is worth.
- The norms, silu * up and rope are the engine's too: on CUDA triton_fused.py's one kernel each (`row_ops`).
- `profile`: the eager mtLoRA step at batch 1 and 64 under `torch.profiler`, the kernels with the most device time
  (name, calls, microseconds) and their total: where the step's time goes, for the next kernel to write.
- Dry run: a toy config on the CPU, perf_counter timings, no graphs, no targets (the numbers mean nothing).
"""

from __future__ import annotations

import logging
import statistics
import time
from types import SimpleNamespace

import torch

log = logging.getLogger(__name__)

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=4096)
TOY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
DECODE_BATCHES, CTX, PREFILL = (1, 16, 64, 256), 512, (4, 512)      # prefill: 4 prompts x 512 tokens
DECODE_TARGET, OVERHEAD_TARGET, N_ADAPTERS = 1.3, 0.10, 8


def _timer(cuda: bool):
    """fn, reps -> median seconds (CUDA events on the device, perf_counter on the CPU)."""
    def measure(fn, reps: int = 10) -> float:
        fn()
        if cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return measure


def device_bounds(device: str, dry: bool) -> dict:
    measure = _timer(device == "cuda")
    n = (1 << 20) if dry else (1 << 30)                                         # bf16 elements: 2 MiB / 2 GiB
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t_copy = measure(lambda: dst.copy_(src))
    m = 256 if dry else 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    t_mm = measure(lambda: torch.mm(a, a), reps=5 if dry else 20)
    return {"copy_bandwidth_GBps": 2 * n * 2 / t_copy / 1e9, "bf16_matmul_TFLOPS": 2 * m ** 3 / t_mm / 1e12}


def build_model(cfg: dict, device: str, seed: int):
    """LlamaDecoder with random bf16 weights created on `device` (std 0.02, norms 1)."""
    from .engine.model import LlamaDecoder, ModelConfig

    c = ModelConfig(**cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(dtype=torch.bfloat16, device=device)
    rnd = lambda *shape: torch.randn(*shape, generator=g, **kw) * 0.02          # noqa: E731
    q, kv, d, F = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size, \
        c.intermediate_size
    layers = [{"in_norm": torch.ones(d, **kw), "post_norm": torch.ones(d, **kw), "qkv": rnd(q + 2 * kv, d),
               "o": rnd(d, q), "gate_up": rnd(2 * F, d), "down": rnd(d, F)} for _ in range(c.num_hidden_layers)]
    weights = {"embed": rnd(c.vocab_size, d), "norm": torch.ones(d, **kw), "lm_head": rnd(c.vocab_size, d),
               "layers": layers}
    return LlamaDecoder(c, weights, torch.bfloat16, torch.device(device), max_len=max(CTX, PREFILL[1]) + 8)


def build_adapters(model, device: str, seed: int):
    """8 random mtLoRA FFN-block adapters (N 16, r 16, g 2) in AdapterSlots on the device."""
    from mtlora.config import AdapterConfig
    from mtlora.inject import expected_shapes
    from .engine.lora_ops import AdapterSlots

    c = model.cfg
    hf = SimpleNamespace(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim)
    cfg = AdapterConfig(method="mtlora", placement="ffn", rank=16, num_experts=16,
                        routing_group_size=c.hidden_size // 2)
    slots = AdapterSlots(hf, max_adapters=N_ADAPTERS, max_rank=16, max_experts=16, max_groups=2,
                         dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for s in range(N_ADAPTERS):
        tensors = {name: torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) * 0.05
                   for name, shape in expected_shapes(hf, cfg).items()}
        slots.load(s, cfg, tensors)
    adapter_bytes = sum(t.numel() * t.element_size() for t in tensors.values())   # one adapter
    return slots, adapter_bytes


def _chunks(B: int, q_len: int, ctx: int, blocks_per_seq: int, block_size: int, adapters: bool):
    """B fake sequences with contiguous block ranges: a chunk of q_len tokens after `ctx` cached ones each."""
    from .engine.scheduler import Chunk, Sequence

    chunks = []
    for b in range(B):
        seq = Sequence(seq_id=b, token_ids=[(7 * b + i) % 200 + 3 for i in range(ctx + q_len)], prompt_len=ctx + q_len,
                       adapter_slot=b % N_ADAPTERS if adapters else -1,
                       blocks=list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)))
        chunks.append(Chunk(seq, ctx, q_len, logit_positions=[ctx + q_len - 1]))   # the sampling row only
    return chunks


def _graph_time(measure, forward) -> float:
    """Capture forward() in a CUDA graph (warm-up on a side stream first) and time its replay."""
    from .bench_gpu_tune import capture_graph

    graph = capture_graph(forward)
    t = measure(graph.replay)
    del graph
    return t


def decode_row(env, B: int, adapters: bool) -> dict:
    """One decode measurement: eager (and, on CUDA, graph-replayed) step time at batch B."""
    from .engine.runner import build_batch

    model, pool, slots, measure, cuda = env["model"], env["pool"], env["slots"], env["measure"], env["cuda"]
    chunks = _chunks(B, 1, CTX, env["blocks_per_seq"], pool.block_size, adapters)
    sites = {s: {"mlp"} for s in range(N_ADAPTERS)}
    t0 = time.perf_counter()
    batch = build_batch(chunks, pool.block_size, model.device, sites)
    host_build = time.perf_counter() - t0
    fwd = lambda: model.forward(batch, pool, slots if adapters else None)       # noqa: E731
    with torch.inference_mode():
        row = {"eager_ms": measure(fwd) * 1e3, "host_build_ms": host_build * 1e3}
        if cuda:
            try:
                row["graph_ms"] = _graph_time(measure, fwd) * 1e3
            except Exception as exc:   # a capture failure is a finding, recorded next to the eager number
                row["graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return row


def attention_ab(env, B: int) -> dict:
    """The base decode step at batch B with the engine's decode attention and again with the torch gather path."""
    model = env["model"]
    kernel = model.cuda_paged
    row = {"batch": B, "engine_path": decode_row(env, B, False)}
    model.cuda_paged = None
    try:
        row["torch_gather"] = decode_row(env, B, False)
    finally:
        model.cuda_paged = kernel
    return row


def profile_step(env, B: int, top: int = 12) -> dict:
    """The eager mtLoRA step at batch B under torch.profiler: the `top` kernels by device time (CPU ops in the dry
    run), with calls and microseconds, and the total over every kernel."""
    from torch.profiler import ProfilerActivity, profile

    from .engine.runner import build_batch

    model, pool, slots, cuda = env["model"], env["pool"], env["slots"], env["cuda"]
    chunks = _chunks(B, 1, CTX, env["blocks_per_seq"], pool.block_size, True)
    batch = build_batch(chunks, pool.block_size, model.device, {s: {"mlp"} for s in range(N_ADAPTERS)})
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        model.forward(batch, pool, slots)                                      # warm (Triton compiles, cuBLAS)
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=acts) as prof:
            model.forward(batch, pool, slots)
            if cuda:
                torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0 and (not cuda or e.device_type.name == "CUDA")]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return {"batch": B, "total_us": round(sum(getattr(e, key) for e in events), 1),
            "top": [{"name": e.key[:90], "calls": e.count, "us": round(getattr(e, key), 1)} for e in events[:top]]}


def prefill_row(env, adapters: bool) -> dict:
    from .engine.runner import build_batch

    model, pool, slots, measure = env["model"], env["pool"], env["slots"], env["measure"]
    P, L = env["prefill"]
    chunks = _chunks(P, L, 0, env["blocks_per_seq"], pool.block_size, adapters)
    batch = build_batch(chunks, pool.block_size, model.device, {s: {"mlp"} for s in range(N_ADAPTERS)})
    with torch.inference_mode():
        t = measure(lambda: model.forward(batch, pool, slots if adapters else None), reps=5)
    return {"ms": t * 1e3, "tokens_per_s": P * L / t}


def weight_bytes(model) -> int:
    """Bytes of every weight a decode step reads once (embedding rows aside: B rows only)."""
    per_layer = sum(t.numel() * t.element_size() for w in model.layers for t in w.values())
    return per_layer + model.lm_head.numel() * model.lm_head.element_size() + model.final_norm.numel() * 2


def kv_bytes(model, B: int, ctx: int) -> int:
    c = model.cfg
    return 2 * B * ctx * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2      # K and V, bf16


def prefill_flops(model, P: int, L: int) -> float:
    """Useful FLOPs: 2 x linear params x tokens (lm_head only for the P logit rows) + causal attention."""
    c = model.cfg
    lin = sum(model.layers[0][k].numel() for k in ("qkv", "o", "gate_up", "down")) * c.num_hidden_layers
    attn = 2 * 2 * c.num_attention_heads * c.head_dim * (L * (L + 1) / 2) * c.num_hidden_layers * P
    return 2 * lin * P * L + 2 * model.lm_head.numel() * P + attn


def _setup(ctx) -> dict:
    from .engine.kv_cache import KVCachePool

    cfg = TOY if ctx.dry_run else LLAMA2_7B
    model = build_model(cfg, ctx.device, ctx.seed)
    if ctx.device == "cuda":                                                   # as the engine does on CUDA
        model.enable_paged_kernel(torch.bfloat16)
        model.enable_fused_ops()
    elif ctx.dry_run:   # the dry run exercises the attention A/B through the Triton interpreter (the fused row
        from .engine import triton_attention       # kernels are checked by tests/unit/test_triton_fused.py)
        model.cuda_paged = triton_attention if triton_attention.available("cpu") else None
    slots, adapter_bytes = build_adapters(model, ctx.device, ctx.seed + 1)
    batches = (1, 4) if ctx.dry_run else DECODE_BATCHES
    prefill = (2, 16) if ctx.dry_run else PREFILL
    block_size = 16
    per_seq = -(-max(CTX + 1, prefill[1]) // block_size)                       # decode: CTX cached + 1 new
    c = model.cfg
    pool = KVCachePool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, per_seq * max(batches), block_size,
                       torch.bfloat16, ctx.device)
    return {"model": model, "slots": slots, "pool": pool, "blocks_per_seq": per_seq, "batches": batches,
            "prefill": prefill, "adapter_bytes": adapter_bytes, "cuda": ctx.device == "cuda",
            "measure": _timer(ctx.device == "cuda")}


def _decode(ctx, res, env, bounds) -> dict:
    rows = {}
    bw = bounds["copy_bandwidth_GBps"] * 1e9
    for B in env["batches"]:
        if ctx.budget.left() < 15:
            res.truncated = True
            break
        base, mt = decode_row(env, B, False), decode_row(env, B, True)
        bytes_base = weight_bytes(env["model"]) + kv_bytes(env["model"], B, CTX)
        bytes_mt = bytes_base + min(B, N_ADAPTERS) * env["adapter_bytes"]
        best = lambda r: min(v for k, v in r.items() if k in ("eager_ms", "graph_ms"))   # noqa: E731
        rows[B] = {"base": base, "mtlora": mt, "bytes_base": bytes_base, "bytes_mtlora": bytes_mt,
                   "bound_ms": bytes_base / bw * 1e3, "bound_mtlora_ms": bytes_mt / bw * 1e3,
                   "base_over_bound": best(base) / (bytes_base / bw * 1e3),
                   "mtlora_overhead": best(mt) / best(base) - 1}
        log.info("decode B=%d: base %.2f ms, mtlora %.2f ms, bound %.2f ms", B, best(base), best(mt),
                 rows[B]["bound_ms"])
    return rows


def run(ctx, res) -> None:
    res.targets = {"decode_over_bandwidth_bound_batch_1_64": f"<= {DECODE_TARGET}",
                   "mtlora_overhead": f"<= {OVERHEAD_TARGET:.0%} (decode at every batch, prefill)",
                   "adapters": "8 mtLoRA FFN-block adapters, N 16, r 16, g 2; every token on its own among them"}
    if ctx.dry_run:
        res.metrics["note"] = "dry run: toy config on CPU; numbers are meaningless, targets not checked"
    bounds = device_bounds(ctx.device, ctx.dry_run)
    res.metrics["bounds"] = bounds
    env = _setup(ctx)
    res.metrics["model"] = {"config": "LLaMA-2-7B" if not ctx.dry_run else "toy", "weight_GB":
                            weight_bytes(env["model"]) / 1e9, "context": CTX, "adapter_MB": env["adapter_bytes"] / 1e6}
    from .engine import triton_molora
    res.metrics["tile_table"] = [[m, str(c)] for m, c in triton_molora.TILE_TABLE]
    res.metrics["decode_attention"] = "triton, in place" if env["model"].cuda_paged is not None else "torch gather"
    res.metrics["row_ops"] = "triton fused" if env["model"].fused is not None else "torch"
    decode = _decode(ctx, res, env, bounds)
    res.metrics["decode"] = decode
    ab_batch = max((B for B in env["batches"] if B <= 64), default=None)
    if env["model"].cuda_paged is not None and ab_batch and ctx.budget.left() > 25:
        res.metrics["attention_ab"] = attention_ab(env, ab_batch)
    res.metrics["profile"] = [profile_step(env, B) for B in (env["batches"][0], ab_batch)
                              if B and ctx.budget.left() > 20]
    prefill = {}
    if ctx.budget.left() > 10:
        base, mt = prefill_row(env, False), prefill_row(env, True)
        P, L = env["prefill"]
        bound_s = prefill_flops(env["model"], P, L) / (bounds["bf16_matmul_TFLOPS"] * 1e12)
        prefill = {"prompts": P, "tokens_each": L, "base": base, "mtlora": mt,
                   "bound_tokens_per_s": P * L / bound_s, "base_fraction_of_bound": base["tokens_per_s"] * bound_s
                   / (P * L), "mtlora_overhead": mt["ms"] / base["ms"] - 1}
    else:
        res.truncated = True
    res.metrics["prefill"] = prefill
    res.metrics["table"] = _table(decode, prefill, bounds)
    res.metrics["table"].update(_extra_rows(res.metrics))
    if ctx.dry_run or ctx.device != "cuda":
        res.status, res.reason = "skipped", "targets need a CUDA device (ran at toy size to exercise the code)"
        return
    res.checks["decode_within_1.3x_bound_b1_64"] = bool(decode) and all(
        r["base_over_bound"] <= DECODE_TARGET for B, r in decode.items() if B <= 64)
    res.checks["mtlora_overhead_le_10pct"] = bool(decode) and bool(prefill) and all(
        r["mtlora_overhead"] <= OVERHEAD_TARGET for r in [*decode.values(), prefill])


def _table(decode: dict, prefill: dict, bounds: dict) -> dict:
    out = {"bounds": f"copy {bounds['copy_bandwidth_GBps']:.0f} GB/s, bf16 mm {bounds['bf16_matmul_TFLOPS']:.0f} "
                     "TFLOPS"}
    for B, r in decode.items():
        g = lambda x: f"{x.get('graph_ms', float('nan')):.2f}"                  # noqa: E731
        out[f"decode B={B}"] = (f"base eager {r['base']['eager_ms']:.2f} / graph {g(r['base'])} ms, bound "
                                f"{r['bound_ms']:.2f} ms (x{r['base_over_bound']:.2f}); mtlora eager "
                                f"{r['mtlora']['eager_ms']:.2f} / graph {g(r['mtlora'])} ms, overhead "
                                f"{r['mtlora_overhead']:+.1%}")
    if prefill:
        out["prefill"] = (f"{prefill['prompts']}x{prefill['tokens_each']}: base {prefill['base']['tokens_per_s']:.0f}"
                          f" tok/s ({prefill['base_fraction_of_bound']:.0%} of bound "
                          f"{prefill['bound_tokens_per_s']:.0f}), mtlora overhead {prefill['mtlora_overhead']:+.1%}")
    return out


def _extra_rows(metrics: dict) -> dict:
    """Table lines for the attention A/B and the profiles' top kernels."""
    out = {}
    ab = metrics.get("attention_ab")
    if ab:
        best = lambda r: min(v for k, v in r.items() if k in ("eager_ms", "graph_ms"))   # noqa: E731
        out[f"attention B={ab['batch']}"] = (f"{metrics['decode_attention']} {best(ab['engine_path']):.2f} ms vs torch "
                                            f"gather {best(ab['torch_gather']):.2f} ms (base step, better path)")
    for p in metrics.get("profile", []):
        top = ", ".join(f"{e['name'][:40]} {e['us'] / 1e3:.2f}ms x{e['calls']}" for e in p["top"][:4])
        out[f"profile B={p['batch']}"] = f"kernels {p['total_us'] / 1e3:.2f} ms; top: {top}"
    return out
