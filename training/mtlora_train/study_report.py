"""The study's measurements beyond accuracy, its summary and its report (used by mtlora_train.study).

Contract:
- `heldout_ce(study, adapters)` -> {run name: {task: CE}}: teacher-forced cross-entropy of the test split's answers,
  per task the token-weighted mean over the answer tokens (` {target}` + EOS) of the same items the accuracy scores
  (after the `num_fewshot` shot examples, at most `limit`), prompted zero-shot in the training layout
  (`Q: {input}\\nA:`, `prompt_format` qa); base model loaded once, each adapter attached in turn
  (`mtlora.inject`, the training code path), batched, eval mode, fp32, the LM head on answer positions only.
  Each model's values are kept in `<output_dir>/heldout_ce/<name>.json` with what they depend on (the adapter's
  files by name, size and mtime; model, items): a later evaluation recomputes only what changed.
- `collect(study, accuracy, ce)` -> the summary dict written as study.json: per run (trainable parameters, steps,
  wall seconds per step, mean training CE of the last 10% of steps, per-task accuracy per protocol and CE) and per
  arm the mean and spread over its seeds (spread = (max - min) / 2, i.e. +- half the range; n seeds given).
- `write_report(study, summary)` writes report.md (macro table, one per-task table per protocol and for CE) and
  study_loss.png (training CE of every run), linking each run's loss/spectrum/routing pictures.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


# -- held-out cross-entropy ----------------------------------------------------------------------------------------
def test_items(study) -> dict[str, list[dict]]:
    """{task: [{input_ids, prompt_len}]} of the scored test items in the training (qa) layout."""
    from mtlora.base import load_tokenizer, resolve_model
    from mtlora_clients.eval.data import load_bbh_dir
    from mtlora_train.data import Record, tokenize_records

    tok = load_tokenizer(resolve_model(study.common.get("model_name_or_path")))
    max_len = int(study.common.get("max_seq_length", 512))
    out = {}
    for task, examples in load_bbh_dir(Path(study.eval.data_dir)).items():
        items = examples[study.eval.num_fewshot:]
        if study.eval.limit:
            items = items[: study.eval.limit]
        out[task] = tokenize_records([Record(ex.input, "", ex.target, task) for ex in items], tok, max_len, "qa")
    return out


@torch.no_grad()
def _task_ce(model, items: list[dict], batch_size: int, pad_id: int) -> float:
    from mtlora_train.data import IGNORE_INDEX, Collator

    collate = Collator(pad_id)
    nll, count = 0.0, 0
    for s in range(0, len(items), batch_size):
        chunk = items[s: s + batch_size]
        batch = collate([{"input_ids": torch.tensor(it["input_ids"]),
                          "labels": torch.tensor([IGNORE_INDEX] * it["prompt_len"] + it["input_ids"][it["prompt_len"]:])}
                         for it in chunk])
        labels = batch["labels"][:, 1:]                                   # [B, T-1]
        keep = labels != IGNORE_INDEX
        # The LM head on the answer positions only: the [B, T, vocab] logits of every prompt token cost ~10x the
        # time of the whole pass otherwise (the same trick as training's `_answer_ce`, same values).
        hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state    # [B, T, d]
        logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()                     # [n, vocab]
        nll += float(torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum"))
        count += int(keep.sum())
    return nll / max(count, 1)


def heldout_ce(study, adapters: dict[str, Path]) -> dict[str, dict[str, float]]:
    from mtlora import inject
    from mtlora.base import load_base_model, resolve_model
    from mtlora.checkpoint import load_adapter

    paths: dict[str, Path | None] = {"base": None, **adapters}
    out: dict[str, dict[str, float]] = {}
    for name, path in paths.items():                  # values computed before for the same adapter files
        cached = _ce_cache_read(study, name, path)
        if cached is not None:
            out[name] = cached
    names = [n for n in paths if n not in out]
    if not names:
        return out
    logger.info("held-out CE: %d models cached, computing %s", len(out), ", ".join(names))
    items = test_items(study)
    model = load_base_model(resolve_model(study.common.get("model_name_or_path")), torch.float32, "cpu").eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    bar = tqdm(total=len(names) * len(items), desc="held-out CE", unit="task")
    for name in names:
        if name != "base":
            config, tensors = load_adapter(adapters[name], model.config)
            inject.attach(model, config)
            inject.load_adapter_state(model, tensors, source=str(adapters[name]))
            model.eval()
        try:
            out[name] = {}
            for task, its in items.items():
                out[name][task] = _task_ce(model, its, study.eval.ce_batch_size, pad)
                bar.update(1)
        finally:
            if name != "base":
                inject.detach(model)
        _ce_cache_write(study, name, paths[name], out[name])
    bar.close()
    return out


def _ce_cache_key(study, path: Path | None) -> dict[str, Any]:
    """What a held-out CE value depends on: the adapter's files (name, size, mtime), the model and the items."""
    files = sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in path.iterdir() if f.is_file()) \
        if path is not None else []
    return json.loads(json.dumps({"adapter": None if path is None else str(path), "files": files,
                                  "model": study.common.get("model_name_or_path"),
                                  "max_seq_length": study.common.get("max_seq_length"),
                                  "data_dir": str(study.eval.data_dir), "limit": study.eval.limit,
                                  "num_fewshot": study.eval.num_fewshot}))


def _ce_cache_read(study, name: str, path: Path | None) -> dict[str, float] | None:
    f = study.output_dir / "heldout_ce" / f"{name}.json"
    try:
        saved = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return saved["tasks"] if saved.get("key") == _ce_cache_key(study, path) else None


def _ce_cache_write(study, name: str, path: Path | None, tasks: dict[str, float]) -> None:
    f = study.output_dir / "heldout_ce" / f"{name}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": _ce_cache_key(study, path), "tasks": tasks}, indent=1) + "\n")
    tmp.replace(f)


# -- summary -------------------------------------------------------------------------------------------------------
def _run_info(run_dir: Path) -> dict[str, Any]:
    from mtlora.checkpoint import load_adapter

    info: dict[str, Any] = {}
    _, tensors = load_adapter(run_dir / "adapter")
    info["trainable_params"] = sum(t.numel() for t in tensors.values())
    hist = [json.loads(x) for x in (run_dir / "log_history.jsonl").read_text().splitlines() if x.strip()]
    info["steps"] = len(hist)
    tail = hist[-max(1, len(hist) // 10):]
    info["train_ce_last10pct"] = sum(e["ce"] for e in tail) / len(tail) if tail else None
    timing = run_dir / "study_timing.json"
    if timing.is_file():
        inv = json.loads(timing.read_text())["invocations"]
        steps = sum(i["steps"] for i in inv)
        info["s_per_step"] = sum(i["seconds"] for i in inv) / steps if steps else None
    return info


def _mean_spread(values: list[float | None]) -> dict[str, Any]:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "spread": None, "n": 0}
    return {"mean": sum(v) / len(v), "spread": (max(v) - min(v)) / 2, "n": len(v), "values": v}


def collect(study, accuracy: dict[str, dict], ce: dict[str, dict[str, float]]) -> dict[str, Any]:
    runs: dict[str, dict] = {}
    for run in study.runs:
        r: dict[str, Any] = {"arm": run.arm, "seed": run.seed}
        if run.seed is not None:
            r.update(_run_info(study.run_dir(run)))
        else:
            r["trainable_params"] = 0
        for protocol, res in accuracy.items():
            m = res["models"][run.name]
            r[protocol] = {"tasks": {t: v["accuracy"] for t, v in m["tasks"].items()}, "macro": m["average"],
                           "errors": m["n_errors"]}
        r["heldout_ce"] = {"tasks": ce[run.name], "macro": sum(ce[run.name].values()) / len(ce[run.name])}
        runs[run.name] = r
    arms: dict[str, dict] = {}
    for arm in dict.fromkeys(r.arm for r in study.runs):
        members = [runs[r.name] for r in study.runs if r.arm == arm]
        a: dict[str, Any] = {k: _mean_spread([m.get(k) for m in members])
                             for k in ("trainable_params", "s_per_step", "train_ce_last10pct")}
        for metric in list(accuracy) + ["heldout_ce"]:
            tasks = list(members[0][metric]["tasks"])
            a[metric] = {"macro": _mean_spread([m[metric]["macro"] for m in members]),
                         "tasks": {t: _mean_spread([m[metric]["tasks"][t] for m in members]) for t in tasks}}
        arms[arm] = a
    return {"source": study.source, "common": study.common, "eval": study.eval.__dict__, "runs": runs, "arms": arms}


# -- report --------------------------------------------------------------------------------------------------------
def _fmt(ms: dict, scale: float = 1.0, digits: int = 1) -> str:
    if ms.get("mean") is None:
        return "-"
    s = f"{ms['mean'] * scale:.{digits}f}"
    if ms["n"] > 1:
        s += f" ± {ms['spread'] * scale:.{digits}f}"
    return s


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def write_report(study, summary: dict) -> Path:
    arms = summary["arms"]
    protocols = [p for p in study.eval.protocols if p in next(iter(arms.values()))]
    lines = [f"# Study report ({summary['source']})", "",
             f"Budget per trained arm: {study.common.get('max_steps')} steps x batch "
             f"{study.common.get('per_device_train_batch_size')} x {study.common.get('max_seq_length')} tokens; "
             f"eval: {study.eval.data_dir}, {study.eval.num_fewshot} shots, first {study.eval.limit} items per task. "
             "Values: mean ± half the range over seeds (n > 1 only). Accuracy in %; CE in nats per answer token.", ""]
    head = ["arm", "seeds", "trainable params", "s / step", "train CE (last 10%)", "held-out CE"] + \
        [f"{p} macro" for p in protocols]
    rows = []
    for arm, a in arms.items():
        n = a["heldout_ce"]["macro"]["n"]
        rows.append([arm, str(n), _fmt(a["trainable_params"], digits=0), _fmt(a["s_per_step"], digits=2),
                     _fmt(a["train_ce_last10pct"], digits=3), _fmt(a["heldout_ce"]["macro"], digits=3)] +
                    [_fmt(a[p]["macro"], 100) for p in protocols])
    lines += _table(head, rows) + [""]
    for metric, scale, digits in [(p, 100, 1) for p in protocols] + [("heldout_ce", 1, 3)]:
        title = "held-out answer cross-entropy" if metric == "heldout_ce" else f"accuracy, {metric} protocol"
        tasks = list(next(iter(arms.values()))[metric]["tasks"])
        rows = [[t] + [_fmt(arms[a][metric]["tasks"][t], scale, digits) for a in arms] for t in tasks]
        rows.append(["**macro**"] + [f"**{_fmt(arms[a][metric]['macro'], scale, digits)}**" for a in arms])
        lines += [f"## Per task: {title}", ""] + _table(["task"] + list(arms), rows) + [""]
    plot = plot_study_losses(study, summary)
    lines += ["## Pictures", "", f"![training CE of every run]({plot.name})" if plot else "", ""]
    for name, r in summary["runs"].items():
        if r["seed"] is None:
            continue
        pics = [f"![{p}](runs/{name}/{p}.png)" for p in ("loss", "spectrum", "routing")
                if (study.run_dir(next(x for x in study.runs if x.name == name)) / f"{p}.png").is_file()]
        lines.append(f"- {name}: " + " ".join(pics))
    path = study.output_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def plot_study_losses(study, summary: dict) -> Path | None:
    try:
        from mtlora_train.plots import _pyplot, _save
        plt = _pyplot()
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in study.runs:
        if run.seed is None:
            continue
        hist = [json.loads(x) for x in (study.run_dir(run) / "log_history.jsonl").read_text().splitlines() if x]
        ce = torch.tensor([e["ce"] for e in hist], dtype=torch.float64)
        w = max(1, len(ce) // 20)
        smooth = ce.unfold(0, w, 1).mean(-1) if len(ce) >= w else ce
        ax.plot(range(w, w + len(smooth)), smooth.tolist(), lw=1.2, label=run.name)
    ax.set_xlabel("step")
    ax.set_ylabel("training CE (moving mean)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, study.output_dir / "study_loss.png")
