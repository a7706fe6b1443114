"""Reports of an evaluation: terminal table, `results.json`, `report.md`, and `comparison.png` for several models.

Contract: `write_all(results, out_dir)` prints the table (stdout) and writes the files; it reads only the
results dict produced by `runner.run_eval`, so reports can be regenerated from a saved results.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROTOCOL_NOTES = {
    "paper": "paper protocol: BBH is scored LENIENTLY (the target only has to appear somewhere in the lower-cased "
             "32-token output, so 'valid' matches 'invalid'); MMLU takes the first character of a 1-token greedy "
             "answer.",
    "harness": "harness protocol (lm-evaluation-harness style): MMLU by log-likelihood of ' A'..' D'; BBH by "
               "exact match of the extracted answer (stops at 'Q:' or a blank line).",
}


def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per task (then per MMLU category), one column per model, the average last."""
    models = list(results["models"])
    names = list(next(iter(results["models"].values()))["tasks"]) if models else []
    rows = [[t] + [_pct(results["models"][m]["tasks"][t]["accuracy"]) for m in models] for t in names]
    if results["suite"] == "mmlu" and models:
        for cat in results["models"][models[0]].get("categories", {}):
            rows.append([f"[{cat}]"] + [_pct(results["models"][m]["categories"][cat]["accuracy"]) for m in models])
    kind = results["models"][models[0]]["average_kind"] if models else "macro"
    rows.append([f"AVERAGE ({kind})"] + [_pct(results["models"][m]["average"]) for m in models])
    rows.append(["errors"] + [str(results["models"][m]["n_errors"]) for m in models])
    return ["task"] + models, rows


def format_table(results: dict[str, Any]) -> str:
    header, rows = table_rows(results)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    sep = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([line(header), sep] + [line(r) for r in rows[:-2]] + [sep] + [line(r) for r in rows[-2:]])


def markdown(results: dict[str, Any]) -> str:
    header, rows = table_rows(results)
    out = [f"# mtlora-eval: {results['suite']} ({results['protocol']} protocol)", "",
           f"- server: `{results['server']}`", f"- data: `{results['data']}` (sha256 `{results['data_hash'][:16]}`)",
           f"- few-shot: {results['num_fewshot'] if results['num_fewshot'] is not None else 'default'}, "
           f"limit: {results['limit']}, concurrency: {results['concurrency']}",
           f"- {PROTOCOL_NOTES[results['protocol']]}", "", "Accuracy in %.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.strip() for c in r) + " |" for r in rows]
    out += ["", "| model | n | errors | resumed | wall s | questions/s | requests | retries |",
            "|---|---|---|---|---|---|---|---|"]
    for m, r in results["models"].items():
        out.append(f"| {m} | {r['n']} | {r['n_errors']} | {r['resumed']} | {r['wall_s']} | {r['questions_per_s']} "
                   f"| {r['n_requests']} | {r['n_retries']} |")
    errs = [(m, e) for m, r in results["models"].items() for e in r["errors"]]
    if errs:
        out += ["", f"## Errors ({len(errs)}, not scored; rerun to retry them)", ""]
        out += [f"- {m} / {e['task']} #{e['index']}: {e['error']}" for m, e in errs[:200]]
    return "\n".join(out) + "\n"


def write_chart(results: dict[str, Any], path: Path) -> None:
    """Grouped horizontal bars: one group per task (MMLU: per category), one bar per model, plus the average."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    models = list(results["models"])
    first = results["models"][models[0]]
    groups = list(first.get("categories", {})) if results["suite"] == "mmlu" else list(first["tasks"])
    get = (lambda m, g: results["models"][m]["categories"][g]["accuracy"]) if results["suite"] == "mmlu" else (
        lambda m, g: results["models"][m]["tasks"][g]["accuracy"])
    labels = groups + ["AVERAGE"]
    height = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(9, 1 + 0.35 * len(labels) * max(1, len(models) / 2)))
    try:
        for k, m in enumerate(models):
            vals = [100 * (get(m, g) or 0.0) for g in groups] + [100 * (results["models"][m]["average"] or 0.0)]
            ax.barh([i + k * height for i in range(len(labels))], vals, height=height, label=m)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("accuracy (%)")
        ax.set_title(f"{results['suite']} ({results['protocol']} protocol)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)    # pyplot keeps every open figure alive; a failed save must not leak one


def write_all(results: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    print(format_table(results))
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "report.md").write_text(markdown(results))
    if len(results["models"]) > 1:
        write_chart(results, out_dir / "comparison.png")
    log.info("wrote %s/results.json and report.md", out_dir)
