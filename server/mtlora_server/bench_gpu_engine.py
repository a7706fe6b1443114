"""Items 2 and 3 of `mtlora-bench gpu`: the engine on CUDA against the CPU reference, and CUDA graphs vs eager.

Contract:
- One random small LLaMA (`mtlora.testing.make_tiny_model_dir`, sharper logits than the default init so greedy
  choices are not near-ties) and random adapters of every method and placement are written under the item's
  scratch directory; nothing is downloaded.
- Item 2 (`run_engine`), engine in fp32: per adapter (and the base) prompt logprobs within `LOGPROB_TOL_FP32` of
  `mtlora.reference.ReferenceModel` on the CPU and greedy tokens equal to its cached greedy decode; a mixed
  batch (every adapter and the base together) equal to each request run alone (tokens equal, prompt logprobs
  within the same tolerance); a prefix-cache hit (same prompt again, cached tokens > 0) equal to the miss.
- Item 3 (`run_graphs`): `enforce_eager=False` vs `enforce_eager=True`, same requests (batch sizes across the
  engine's decode buckets, or a default set), then one adapter removed and another installed in both engines and
  the same again; in fp32 (the strict check: logprobs within `TOLERANCES["float32"]`) and, on CUDA, in bf16.
  Greedy tokens must be identical, except at a position where the eager engine's own top-2 logprobs are within
  the tie gap (counted and reported as "ties"; the rest of that sequence is not compared); sampled-token logprobs
  within the dtype's tolerance. The tie gap is twice the logprob tolerance: when each of two logprobs may move by
  the tolerance between the two paths, their gap may move by twice that. fp32 is the correctness check. bf16 is a
  gross-error check only: two bf16 paths that sum in different orders (bucketed GEMM shapes, the graph's
  token-gather adapter path vs the eager Triton kernel) round hidden states differently in every layer; on the
  first H200 runs sampled logprobs differed by up to 0.06 (about 4 bf16 ulps of this model's logits, |logit| < 4:
  flips' gaps come in multiples of 1/64), so the bound is 0.125, while a wrong KV row or adapter moves logprobs
  by O(1). Every divergence is listed with the eager top-2 gap (`divergences`). Whether graphs
  were really captured is looked up defensively (`graph_info`) and is itself a check.
- In the dry run both run on the CPU at toy size (the CUDA result needs a GPU; this only exercises the script).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LOGPROB_TOL_FP32 = 1e-3
LOGPROB_TOL_BF16 = 0.125              # gross errors only; fp32 is the strict check (module doc)
TOLERANCES = {"float32": LOGPROB_TOL_FP32, "bfloat16": LOGPROB_TOL_BF16}   # graphs vs eager, sampled logprobs
DEFAULT_BATCHES = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33)


def _model_overrides(dry: bool) -> dict:
    if dry:
        return dict(initializer_range=0.08)
    return dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.08)


def _adapter_kinds(hidden: int) -> dict[str, dict]:
    """One adapter per method / placement; routing groups that divide this model's dims (g 2 and 4)."""
    return {"mt_ffn": dict(method="mtlora", placement="ffn", rank=4, num_experts=4, routing_group_size=hidden // 4),
            "mt_attn": dict(method="mtlora", placement="attention", rank=4, num_experts=3),
            "mt_both": dict(method="mtlora", placement="both", rank=8, num_experts=2, routing_group_size=hidden // 2),
            "hydra": dict(method="hydralora", rank=4, num_experts=3, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
            "lora": dict(method="lora", rank=4, target_modules=["q_proj", "v_proj", "down_proj"]),
            "mt_big": dict(method="mtlora", placement="ffn", rank=16, num_experts=8, routing_group_size=hidden // 2)}


def setup_model(ctx) -> tuple[Path, dict[str, str]]:
    """The small model and its adapters under ctx.workdir (built once per run, shared by items 2 and 3)."""
    if "engine_model" in ctx.shared:
        return ctx.shared["engine_model"]
    from mtlora.testing import make_tiny_model_dir
    from .engine.model import ModelConfig
    from .engine.testing import write_random_adapter

    root = ctx.workdir / "engine"
    model_dir = make_tiny_model_dir(root / "model", seed=ctx.seed, **_model_overrides(ctx.dry_run))
    from mtlora.base import load_config
    hf = load_config(model_dir)
    hidden = ModelConfig.from_dir(model_dir).hidden_size
    paths = {name: str(write_random_adapter(root / name, hf, seed=ctx.seed + i, **cfg))
             for i, (name, cfg) in enumerate(_adapter_kinds(hidden).items())}
    ctx.shared["engine_model"] = (model_dir, paths)
    return model_dir, paths


def _core(ctx, model_dir, adapters: dict[str, str], **kw):
    from .engine.core import EngineCore
    from .engine.testing import tiny_engine_args

    base = dict(device=ctx.device, kv_cache_memory=64 << 20, max_num_batched_tokens=512, max_num_seqs=64,
                max_model_len=256, max_adapters=8)
    base.update(kw)
    return EngineCore(tiny_engine_args(model_dir, adapters=adapters, **base))


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _req(rid: str, ids: list[int], adapter: str | None, max_tokens: int = 6, **kw):
    from .engine.types import GenerationRequest, SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)
    return GenerationRequest(rid, ids, params, adapter=adapter)


def _run(core, requests) -> dict:
    """run_to_completion, plus each request's num_cached_tokens (from its first output)."""
    from .engine.testing import Finished

    results = {r.request_id: Finished() for r in requests}
    cached: dict[str, int] = {}
    for r in requests:
        core.add_request(r)
    for _ in range(10_000):
        if not core.has_work():
            break
        for out in core.step():
            if out.request_id not in cached:
                cached[out.request_id] = out.num_cached_tokens
            results[out.request_id].add(out)
        if core.last_step_idle:
            core.registry.wait_for_load(0.05)
    for rid, res in results.items():
        res.num_cached_tokens = cached.get(rid, 0)
    return results


def _plp(res) -> torch.Tensor:
    return torch.tensor([x.logprob for x in res.prompt_logprobs[1:]], dtype=torch.float64)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() and a.shape == b.shape else (0.0 if a.shape == b.shape
                                                                                 else float("inf"))


def run_engine(ctx, res) -> None:
    from mtlora.reference import ReferenceModel

    res.targets = {"prompt_logprobs_max_abs_diff": LOGPROB_TOL_FP32, "greedy": "equal",
                   "mixed_vs_serial": "tokens equal, prompt logprobs within the same tolerance",
                   "prefix_hit_vs_miss": "tokens equal, logprobs within the same tolerance, cached tokens > 0"}
    if ctx.dry_run:
        res.metrics["note"] = "dry run: engine on CPU at toy size (exercises the script; CUDA needs a GPU)"
    model_dir, paths = setup_model(ctx)
    core = _core(ctx, model_dir, paths, dtype="float32")
    per, ok_lp, ok_greedy = {}, True, True
    for k, name in enumerate([None, *paths]):
        if ctx.budget.left() < 10:
            res.truncated = True
            break
        ids = _prompt(11 + k, 37)
        got = _run(core, [_req("a", ids, name, prompt_logprobs=0)])["a"]
        ref = ReferenceModel(model_dir, paths.get(name))
        want_tokens = ref.greedy_cached(ids, 6)
        diff = _maxdiff(_plp(got), torch.tensor(ref.prompt_logprobs(ids)[1:], dtype=torch.float64))
        per[name or "base"] = {"prompt_logprob_max_diff": diff, "greedy_equal": got.tokens[0] == want_tokens}
        ok_lp &= diff <= LOGPROB_TOL_FP32
        ok_greedy &= got.tokens[0] == want_tokens
    res.metrics["vs_reference"] = per
    res.checks["prompt_logprobs_vs_reference"] = bool(per) and ok_lp
    res.checks["greedy_vs_reference"] = bool(per) and ok_greedy
    for step in (_mixed_vs_serial, _prefix_hit_vs_miss):
        if ctx.budget.left() > 5:
            step(res, core, list(paths))
        else:
            res.truncated = True
    res.metrics["table"] = {"vs reference": f"max prompt-logprob diff "
                            f"{max((v['prompt_logprob_max_diff'] for v in per.values()), default=float('nan')):.2e}"
                            f", greedy equal {sum(v['greedy_equal'] for v in per.values())}/{len(per)}"}


def _mixed_vs_serial(res, core, names: list[str]) -> None:
    reqs = [_req(f"r{i}", _prompt(100 + i, 9 + 11 * i), ([None] + names)[i % (len(names) + 1)],
                 max_tokens=4 + i % 4, prompt_logprobs=0) for i in range(2 * len(names) + 2)]
    mixed = _run(core, reqs)
    worst, same = 0.0, True
    for r in reqs:
        alone = _run(core, [r])[r.request_id]
        same &= alone.tokens == mixed[r.request_id].tokens
        worst = max(worst, _maxdiff(_plp(alone), _plp(mixed[r.request_id])))
    res.metrics["mixed_vs_serial"] = {"requests": len(reqs), "tokens_equal": same, "prompt_logprob_max_diff": worst}
    res.checks["mixed_batch_equals_serial"] = same and worst <= LOGPROB_TOL_FP32


def _prefix_hit_vs_miss(res, core, names: list[str]) -> None:
    rows = {}
    for k, name in enumerate([None, names[0]]):
        ids = _prompt(300 + k, 70)
        miss = _run(core, [_req("m", ids, name, max_tokens=6, logprobs=0, prompt_logprobs=0)])["m"]
        hit = _run(core, [_req("h", ids, name, max_tokens=6, logprobs=0, prompt_logprobs=0)])["h"]
        lp = lambda f: torch.tensor([x.logprob for x in f.logprobs[0]], dtype=torch.float64)   # noqa: E731
        rows[name or "base"] = {"cached_tokens_hit": hit.num_cached_tokens, "cached_tokens_miss":
                                miss.num_cached_tokens, "tokens_equal": hit.tokens == miss.tokens,
                                "logprob_max_diff": max(_maxdiff(lp(hit), lp(miss)), _maxdiff(_plp(hit), _plp(miss)))}
    res.metrics["prefix_hit_vs_miss"] = rows
    res.checks["prefix_hit_equals_miss"] = all(
        r["tokens_equal"] and r["logprob_max_diff"] <= LOGPROB_TOL_FP32 and r["cached_tokens_hit"] > 0
        for r in rows.values())


# -- item 3 ------------------------------------------------------------------------------------------------------
def graph_info(core) -> dict:
    """What the engine says about its CUDA graphs / compiled decode, looked up defensively (attribute names of
    the compiled-decode module: runner.decode_graphs with .mode, .buckets and a dict of captured graphs)."""
    runner = getattr(core, "runner", None)
    dg = getattr(runner, "decode_graphs", None)
    info = {"decode_graphs": type(dg).__name__ if dg is not None else None, "mode": getattr(dg, "mode", None),
            "buckets": list(getattr(dg, "buckets", None) or [])}
    captured = 0
    for value in (vars(dg).values() if dg is not None else ()):
        if isinstance(value, dict):
            for v in value.values():
                first = v[0] if isinstance(v, tuple) and v else v
                captured += isinstance(first, torch.cuda.CUDAGraph)
    info["graphs_captured"] = captured
    stats = core.stats() if hasattr(core, "stats") else None
    for name in dir(stats) if stats is not None else ():
        if "graph" in name.lower() and not name.startswith("_"):
            info[f"stats.{name}"] = getattr(stats, name)
    return info


def _batches(info: dict, dry: bool) -> list[int]:
    if dry:
        return [1, 2, 3]
    edges = sorted({n for b in info.get("buckets") or [] for n in (b - 1, b, b + 1) if 1 <= n <= 33})
    return edges or list(DEFAULT_BATCHES)


def _compare_round(eager, graphs, batches: list[int], names: list, tag: str, seed: int, tol: float) -> dict:
    """Same requests through both engines; first-divergence analysis per sequence (see the module contract): a flip
    is a tie when the eager top-2 gap is within 2 * tol."""
    mism = ties = compared = 0
    worst, divergences = 0.0, []
    for B in batches:
        reqs = [_req(f"{tag}{B}_{i}", _prompt(seed + 97 * B + i, 5 + (7 * i) % 23), names[i % len(names)],
                     max_tokens=10, logprobs=5) for i in range(B)]   # top 5: a flip's gap is known
        a, b = _run(eager, reqs), _run(graphs, reqs)
        for r in reqs:
            ta, tb = a[r.request_id].tokens[0], b[r.request_id].tokens[0]
            la, lb = a[r.request_id].logprobs[0], b[r.request_id].logprobs[0]
            for t in range(min(len(ta), len(tb))):
                compared += 1
                if ta[t] != tb[t]:
                    top = dict(la[t].top)
                    gap = top[ta[t]] - top[tb[t]] if tb[t] in top else None   # None: not in eager's top 5
                    tie = gap is not None and gap <= 2 * tol
                    ties += tie
                    mism += not tie
                    divergences.append({"request": r.request_id, "position": t, "eager_top2_gap": gap, "tie": tie})
                    break
                worst = max(worst, abs(la[t].logprob - lb[t].logprob))
    return {"batches": batches, "tokens_compared": compared, "mismatches": mism, "ties": ties,
            "logprob_max_diff": worst, "divergences": divergences}


def _gaps(divergences: list[dict]) -> str:
    """The largest eager top-2 gaps at divergences, for the table ('none', or e.g. '[0.0625, 0.031, ...]')."""
    gaps = sorted((float("inf") if d["eager_top2_gap"] is None else d["eager_top2_gap"] for d in divergences),
                  reverse=True)
    return "none" if not gaps else "[" + ", ".join(f"{g:.3g}" for g in gaps[:6]) + (", ...]" if len(gaps) > 6 else "]")


def _graph_rounds(ctx, res, model_dir, paths: dict[str, str], dtype: str) -> tuple[dict, dict]:
    """Both rounds (adapters as loaded, then one swapped for a bigger one) for one dtype; (rounds, graph_info)."""
    names = list(paths)
    first = {n: paths[n] for n in names[:3]}
    tol = TOLERANCES[dtype]
    eager = _core(ctx, model_dir, first, dtype=dtype, enforce_eager=True)
    graphs = _core(ctx, model_dir, first, dtype=dtype, enforce_eager=False)
    batches = _batches(graph_info(graphs), ctx.dry_run)
    rounds = {"adapters_1": _compare_round(eager, graphs, batches, [None, *names[:3]], "a", ctx.seed, tol)}
    if ctx.budget.left() > 10:
        for core in (eager, graphs):              # unload one adapter, load another (different r / N / g)
            core.remove_adapter(names[1])
            core.install_adapter(names[5], *core.read_adapter(paths[names[5]]), paths[names[5]])
        rounds["adapters_2"] = _compare_round(eager, graphs, batches, [None, names[0], names[2], names[5]], "b",
                                              ctx.seed + 1, tol)
    else:
        res.truncated = True
    info = graph_info(graphs)
    res.metrics.setdefault("graph_info_eager", graph_info(eager))
    del eager, graphs
    return rounds, info


def run_graphs(ctx, res) -> None:
    res.targets = {"greedy": "identical (a flip where eager's top-2 gap <= 2 x the logprob tolerance is a tie)",
                   "logprob_max_abs_diff": TOLERANCES, "graphs_captured": "> 0 (the compiled decode really ran)"}
    if ctx.dry_run:
        res.metrics["note"] = "dry run: CPU at toy size (exercises the script; CUDA graphs need a GPU)"
    model_dir, paths = setup_model(ctx)
    rounds, infos = {}, {}
    for dtype in ("float32", "bfloat16") if ctx.device == "cuda" else ("float32",):
        if rounds and ctx.budget.left() < 20:
            res.truncated = True
            break
        per, infos[dtype] = _graph_rounds(ctx, res, model_dir, paths, dtype)
        rounds.update({f"{dtype}/{k}": v for k, v in per.items()})
        tol = TOLERANCES[dtype]
        res.checks[f"greedy_identical_{dtype}"] = all(r["mismatches"] == 0 for r in per.values())
        res.checks[f"logprobs_within_tol_{dtype}"] = all(r["logprob_max_diff"] <= tol for r in per.values())
    info = infos.get("bfloat16") or infos["float32"]
    res.metrics.update(rounds=rounds, graph_info=info)
    if ctx.device == "cuda":
        res.checks["graphs_captured"] = all(i["graphs_captured"] > 0 for i in infos.values())
    else:
        res.metrics["graphs_captured_check"] = "skipped: CUDA graphs need a GPU"
    res.metrics["table"] = {k: f"{r['tokens_compared']} tokens, {r['mismatches']} mismatches, {r['ties']} ties, "
                               f"max logprob diff {r['logprob_max_diff']:.2e}, eager top-2 gaps at flips "
                               f"{_gaps(r['divergences'])}" for k, r in rounds.items()}
    res.metrics["table"]["graphs"] = f"captured {info['graphs_captured']} (mode {info['mode']})"
