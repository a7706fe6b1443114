"""`run_eval(args) -> results dict`: evaluate one or more served models on a suite, resumably.

Contract:
- `args` carries the CLI fields (suite, base_url, model, api_key, data_dir, protocol, num_fewshot, tasks, limit,
  concurrency, output, timeout, max_retries); `transport` lets tests inject an `httpx.MockTransport`.
- Each finished item is appended at once to `<output>/<model>/<task>.jsonl` as
  `{"index", "prompt_sha", ...record}`; a rerun reuses every line whose prompt hash still matches and sends
  requests only for the rest (a line cut short by a kill is ignored and redone).
- A failed item (HTTP error after retries, malformed reply) is logged with its task and index, listed under
  `errors` and excluded from the accuracy; it is not written to the .jsonl, so a rerun retries it.
- A 404 stops the whole run at once with a ConfigError naming --base-url and --model: the route or the model is
  missing, so every other question would fail the same way (items already scored stay in the .jsonl files).
- Writes `results.json`, `report.md` and (several models) `comparison.png` into `<output>`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from mtlora.errors import ConfigError

from ..http import CompletionClient, RetryPolicy, ServerReplyError
from . import data as data_mod
from . import report
from .categories import category_of
from .tasks import Task, build_tasks

log = logging.getLogger(__name__)


def model_dirname(model: str) -> str:
    """A filesystem-safe folder name for a model/adapter name (org/name -> org__name)."""
    return model.replace("/", "__").replace("\\", "__")


def load_data(args: Namespace) -> dict:
    """The suite's data from --data-dir or, without it, the hub."""
    wanted = [t for t in (args.tasks or "").split(",") if t] or None
    if args.suite == "tasks" and not args.data_dir:
        raise ConfigError("`tasks` needs --data-dir: a folder of BBH-format <task>.json files", field="--data-dir")
    if args.suite == "mmlu":
        return data_mod.load_mmlu_dir(Path(args.data_dir), wanted) if args.data_dir else data_mod.load_mmlu_hub(wanted)
    return data_mod.load_bbh_dir(Path(args.data_dir), wanted) if args.data_dir else data_mod.load_bbh_hub(wanted)


def read_done(path: Path, task: Task) -> dict[int, dict]:
    """Records already in the resume file whose prompt still matches the current run."""
    done: dict[int, dict] = {}
    if not path.exists():
        return done
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        try:
            rec = json.loads(line)
            i = int(rec["index"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s line %d is incomplete (interrupted write?); that item is redone", path, n + 1)
            continue
        if 0 <= i < len(task.items) and rec.get("prompt_sha") == task.prompt_sha(i):
            done[i] = rec
    return done


def _ends_with_newline(path: Path) -> bool:
    """Whether the file's last byte is a newline (read without loading the whole file)."""
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


class _Appender:
    """Appends JSON lines and flushes each, so a kill loses at most the line being written."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a", encoding="utf-8")
        if self.f.tell() and not _ends_with_newline(path):
            self.write_raw("\n")  # end the partial line a kill left, so the next record starts cleanly

    def write(self, rec: dict) -> None:
        self.write_raw(json.dumps(rec, ensure_ascii=False) + "\n")

    def write_raw(self, text: str) -> None:
        self.f.write(text)
        self.f.flush()

    def close(self) -> None:
        self.f.close()


async def _worker(queue, client, model, appenders, records, errors, bar, req_s) -> None:
    while True:
        try:
            task, i = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        t0 = time.perf_counter()
        try:
            rec = await task.evaluate(client, model, i)
        except ServerReplyError as e:
            if e.status == 404:
                raise ConfigError(f"the server at {client.base_url} answered 404 ({e}); check --base-url (the "
                                  "server root, e.g. http://127.0.0.1:8000, or the same with /v1) and --model",
                                  field="--base-url") from None
            errors.append({"task": task.name, "index": i, "error": str(e)})
            log.error("model %s task %s index %d: %s", model, task.name, i, e)
        else:
            rec = {"index": i, "prompt_sha": task.prompt_sha(i), **rec}
            appenders[task.name].write(rec)
            records[task.name][i] = rec
        req_s[task.name] += time.perf_counter() - t0
        bar.update(1)


async def evaluate_model(args: Namespace, model: str, tasks: list[Task], transport=None) -> dict[str, Any]:
    """Run every pending item of `tasks` for one model; returns per-task records, errors and counters."""
    out_dir = Path(args.output) / model_dirname(model)
    records = {t.name: read_done(out_dir / f"{t.name}.jsonl", t) for t in tasks}
    n_resumed = sum(len(r) for r in records.values())
    queue: asyncio.Queue = asyncio.Queue()
    for t in tasks:
        for i in range(len(t.items)):
            if i not in records[t.name]:
                queue.put_nowait((t, i))
    pending = queue.qsize()
    appenders = {t.name: _Appender(out_dir / f"{t.name}.jsonl") for t in tasks}
    errors: list[dict] = []
    req_s = {t.name: 0.0 for t in tasks}
    policy = RetryPolicy(max_retries=args.max_retries, base_s=getattr(args, "retry_base_s", 0.5))
    t0 = time.perf_counter()
    bar = tqdm(total=pending + n_resumed, initial=n_resumed, desc=model, unit="q", dynamic_ncols=True)
    try:
        async with CompletionClient(args.base_url, args.api_key, args.timeout, policy, transport) as client:
            await _check_model(client, model)
            workers = [asyncio.ensure_future(_worker(queue, client, model, appenders, records, errors, bar, req_s))
                       for _ in range(max(1, args.concurrency))]
            try:
                await asyncio.gather(*workers)
            except BaseException:           # one worker hit a fatal error (a 404): stop the others too
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                raise
            n_requests, n_retries = client.n_requests, client.n_retries
    finally:
        bar.close()
        for a in appenders.values():
            a.close()
    wall = time.perf_counter() - t0
    return {"records": records, "errors": errors, "resumed": n_resumed, "evaluated": pending - len(errors),
            "wall_s": wall, "request_s": req_s, "n_requests": n_requests, "n_retries": n_retries}


async def _check_model(client: CompletionClient, model: str) -> None:
    """Fail fast on a model name the server does not list (instead of one 404 per question)."""
    ids = await client.served_models()
    if ids is None:
        log.warning("could not list the server's models; going on with %s", model)
    elif model not in ids:
        raise ConfigError(f"model {model!r} is not served at {client.base_url}; served: {ids}", field="--model")


def summarise(suite: str, tasks: list[Task], run: dict) -> dict[str, Any]:
    """Per-task accuracy and the suite average (micro for MMLU, macro over tasks otherwise)."""
    per_task, cats = {}, {}
    for t in tasks:
        recs = run["records"][t.name]
        n_err = sum(1 for e in run["errors"] if e["task"] == t.name)
        correct = sum(1 for r in recs.values() if r["correct"])
        per_task[t.name] = {"accuracy": correct / len(recs) if recs else None, "n": len(recs), "correct": correct,
                            "errors": n_err, "request_s": round(run["request_s"][t.name], 3)}
        if suite == "mmlu":
            c = cats.setdefault(category_of(t.name), [0, 0])
            c[0], c[1] = c[0] + correct, c[1] + len(recs)
    n = sum(v["n"] for v in per_task.values())
    scored = [v["accuracy"] for v in per_task.values() if v["accuracy"] is not None]
    if suite == "mmlu":
        average = sum(v["correct"] for v in per_task.values()) / n if n else None
    else:
        average = sum(scored) / len(scored) if scored else None
    out = {"tasks": per_task, "average": average, "average_kind": "micro" if suite == "mmlu" else "macro",
           "n": n, "n_errors": len(run["errors"]), "errors": run["errors"], "resumed": run["resumed"],
           "evaluated": run["evaluated"], "wall_s": round(run["wall_s"], 3),
           "questions_per_s": round(run["evaluated"] / run["wall_s"], 3) if run["wall_s"] > 0 else None,
           "n_requests": run["n_requests"], "n_retries": run["n_retries"]}
    if suite == "mmlu":
        out["categories"] = {k: {"accuracy": c / m if m else None, "n": m} for k, (c, m) in sorted(cats.items())}
    return out


def run_eval(args: Namespace | dict, transport: httpx.AsyncBaseTransport | None = None) -> dict[str, Any]:
    """Evaluate every `--model` and write the reports; returns the results dict (also saved as results.json)."""
    args = Namespace(**args) if isinstance(args, dict) else args
    args = Namespace(**{**vars(default_args()), **vars(args)})
    models = [m for m in args.model.split(",") if m]
    if not models:
        raise ConfigError("no model given", field="--model")
    loaded = load_data(args)
    tasks = build_tasks(args.suite, args.protocol, loaded, args.num_fewshot, args.limit, args.max_new_tokens)
    results: dict[str, Any] = {
        "server": args.base_url, "suite": args.suite, "protocol": args.protocol,
        "data": str(args.data_dir) if args.data_dir else "hub", "data_hash": data_mod.data_hash(loaded),
        "num_fewshot": args.num_fewshot, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
        "concurrency": args.concurrency, "models": {},
    }
    for model in models:
        log.info("evaluating %s on %s (%s protocol, %d tasks)", model, args.suite, args.protocol, len(tasks))
        run = asyncio.run(evaluate_model(args, model, tasks, transport))
        results["models"][model] = summarise(args.suite, tasks, run)
    results["n_errors"] = sum(m["n_errors"] for m in results["models"].values())
    report.write_all(results, Path(args.output))
    return results


def default_args() -> Namespace:
    """Defaults for every field run_eval reads (the CLI fills the same ones)."""
    return Namespace(suite="bbh", base_url="http://127.0.0.1:8000", model="", api_key=None, data_dir=None,
                     protocol="paper", num_fewshot=None, tasks=None, limit=None, max_new_tokens=None, concurrency=8,
                     output="eval-results", timeout=600.0, max_retries=5, retry_base_s=0.5)
