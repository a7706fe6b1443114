"""`mtlora-train study`: train every arm of a method comparison, serve them in one server, evaluate, report.

Contract:
- A study YAML (first line: the command) has `output_dir`, `common` (TrainConfig fields shared by every arm: data,
  budget, optimiser), `seeds` (default seeds), `arms` ({name: TrainConfig overrides | null}; null = the base model,
  not trained; an arm may set its own `seeds: [..]`, else it runs the first default seed) and `eval` (see
  `EvalSettings`). Every trained arm gets the same `max_steps` x batch x `max_seq_length` budget and, for one seed,
  the same data order (an epoch's order depends only on seed + epoch).
- Runs live in `<output_dir>/runs/<arm>-s<seed>/`: `arm_config.yaml` (the run as a plain `mtlora-train --config`),
  the recipe's checkpoints, `adapter/`, `log_history.jsonl`, pictures, and `study_timing.json` (steps and seconds
  of every training invocation). Resumable: an arm whose `adapter/` and `log_history.jsonl` exist is skipped; an
  arm with a `checkpoint-*` resumes from the newest one (the recipe's exact resume); otherwise it starts.
- Then (unless `--skip_eval`) one `mtlora-serve` serves the base model and every adapter (`--adapter NAME=DIR`),
  `mtlora-eval tasks` scores them under each protocol in `eval.protocols` into `<output_dir>/eval/<protocol>/`
  (resumable: finished items are reused), and the held-out answer cross-entropy per task is computed in-process
  (mtlora_train.study_report.heldout_ce). `<output_dir>/study.json` collects everything and `report.md` holds the
  tables (per task and macro; mean and spread over seeds) and pictures (study_report.write_report).
- `--smoke` shrinks the study to a few steps and examples on any model (for tests and a dry run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtlora.errors import ConfigError, MtloraError

logger = logging.getLogger(__name__)

STUDY_KEYS = {"output_dir", "common", "seeds", "arms", "eval"}


@dataclass
class EvalSettings:
    data_dir: str = "../shared/data/bigbench_mt/test"
    protocols: list[str] = field(default_factory=lambda: ["harness", "paper"])
    limit: int | None = 50              # items per task (after the shots), for accuracy and held-out CE
    num_fewshot: int = 3
    concurrency: int = 64
    max_new_tokens: int | None = None
    ce_batch_size: int = 16
    serve_args: list[str] = field(default_factory=list)   # extra mtlora-serve flags
    startup_timeout: float = 600.0


@dataclass
class Run:
    arm: str
    seed: int | None                    # None: the untrained base model
    overrides: dict[str, Any] | None

    @property
    def name(self) -> str:
        return self.arm if self.seed is None else f"{self.arm}-s{self.seed}"


@dataclass
class Study:
    output_dir: Path
    common: dict[str, Any]
    runs: list[Run]
    eval: EvalSettings
    source: str = "<study>"

    def run_dir(self, run: Run) -> Path:
        return self.output_dir / "runs" / run.name


# -- config --------------------------------------------------------------------------------------------------------
def load_study(path: str | Path, output_dir: str | None = None) -> Study:
    """Parse and validate a study YAML; every error names the file and key."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the study config: {exc}", path=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping", path=str(path))
    unknown = sorted(set(data) - STUDY_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; expected {sorted(STUDY_KEYS)}", field=unknown[0], path=str(path))
    seeds = data.get("seeds") or [42]
    runs = []
    for arm, over in (data.get("arms") or {}).items():
        if over is None:
            runs.append(Run(arm, None, None))
            continue
        if not isinstance(over, dict):
            raise ConfigError(f"arm {arm!r}: expected a mapping of mtlora-train options or null (base model)",
                              field=f"arms.{arm}", path=str(path))
        over = dict(over)
        for seed in over.pop("seeds", None) or seeds[:1]:
            runs.append(Run(arm, int(seed), over))
    if not runs:
        raise ConfigError("no arms", field="arms", path=str(path))
    ev = data.get("eval") or {}
    bad = sorted(set(ev) - {f for f in EvalSettings.__dataclass_fields__})
    if bad:
        raise ConfigError(f"unknown eval key(s) {bad}", field=f"eval.{bad[0]}", path=str(path))
    study = Study(Path(output_dir or data.get("output_dir") or "output/study"), dict(data.get("common") or {}),
                  runs, EvalSettings(**ev), str(path))
    for run in study.runs:
        if run.seed is not None:
            train_config(study, run)                          # validate every arm before anything runs
    for p in study.eval.protocols:
        if p not in ("harness", "paper"):
            raise ConfigError(f"eval.protocols: unknown protocol {p!r}", field="eval.protocols", path=str(path))
    return study


def train_config(study: Study, run: Run):
    """The TrainConfig of one trained run: common, then the arm's overrides, then seed and output folder."""
    from mtlora_train.config import TrainConfig, field_names

    fields = {**study.common, **(run.overrides or {}), "seed": run.seed, "output_dir": str(study.run_dir(run))}
    unknown = sorted(set(fields) - field_names())
    if unknown:
        raise ConfigError(f"arm {run.arm!r}: unknown mtlora-train option(s) {unknown}", field=unknown[0],
                          path=study.source)
    if isinstance(fields.get("target_modules"), str):
        fields["target_modules"] = [m.strip() for m in fields["target_modules"].split(",") if m.strip()]
    try:
        return TrainConfig(**fields).validate()
    except ConfigError as exc:
        raise ConfigError(f"arm {run.arm!r}: {exc}", field=exc.field, path=study.source) from None


def apply_smoke(study: Study) -> None:
    """A few steps and examples: checks the whole path, measures nothing."""
    study.common.update(max_steps=2, save_steps=1, logging_steps=1, per_device_train_batch_size=2,
                        gradient_accumulation_steps=1, max_seq_length=min(int(study.common.get("max_seq_length",
                                                                                                 128)), 128))
    study.eval.limit = 2
    study.eval.num_fewshot = min(study.eval.num_fewshot, 1)
    study.eval.max_new_tokens = 8


# -- training ------------------------------------------------------------------------------------------------------
def run_state(run_dir: Path) -> str:
    """'done' (final adapter written), 'resume' (a checkpoint exists) or 'new'."""
    from mtlora_train import state

    if (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "log_history.jsonl").is_file():
        return "done"
    return "resume" if state.list_checkpoints(run_dir) else "new"


def write_arm_config(cfg, path: Path) -> None:
    import yaml

    values = {k: v for k, v in cfg.to_dict().items() if v is not None and k not in ("resume_from_checkpoint",)}
    if isinstance(values.get("target_modules"), list):
        values["target_modules"] = ",".join(values["target_modules"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# mtlora-train --config {path}\n" + yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


def train_run(study: Study, run: Run) -> str:
    """Train (or resume, or skip) one run; returns what was done."""
    from mtlora_train.recipe import MtloraRecipe

    run_dir = study.run_dir(run)
    status = run_state(run_dir)
    if status == "done":
        logger.info("%s: finished adapter found, skipped", run.name)
        return "skipped"
    cfg = train_config(study, run)
    write_arm_config(cfg, run_dir / "arm_config.yaml")
    if status == "resume":
        cfg.resume_from_checkpoint = "last"
    logger.info("%s: %s training (%s)", run.name, "resuming" if status == "resume" else "starting",
                cfg.adapter_config().method)
    recipe = MtloraRecipe(cfg).setup()
    start_step, t0 = recipe.global_step, time.perf_counter()
    recipe.train()
    timing_file = run_dir / "study_timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {"invocations": []}
    timing["invocations"].append({"steps": recipe.global_step - start_step,
                                  "seconds": time.perf_counter() - t0, "resumed_at": start_step})
    timing_file.write_text(json.dumps(timing, indent=1) + "\n", encoding="utf-8")
    del recipe
    return "resumed" if status == "resume" else "trained"


# -- serving and evaluation ----------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model: str | None, adapters: dict[str, Path], settings: EvalSettings, log_path: Path):
    """`mtlora-serve` with the base model (served as `base`) and every adapter; yields the base URL."""
    import httpx

    port = _free_port()
    script = Path(sys.executable).with_name("mtlora-serve")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mtlora_server.cli"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "base"]
    cmd += ["--model", model] if model else []
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    cmd += list(settings.serve_args)
    logger.info("starting %s (log: %s)", " ".join(cmd), log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + settings.startup_timeout
            while True:
                if proc.poll() is not None:
                    raise MtloraError(f"mtlora-serve exited with {proc.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise MtloraError(f"mtlora-serve did not come up in {settings.startup_timeout:.0f} s; see {log_path}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def evaluate(study: Study, names: list[str], url: str) -> dict[str, dict]:
    """`mtlora-eval tasks` under each protocol; {protocol: results dict}."""
    from mtlora_clients.eval.runner import run_eval

    out = {}
    for protocol in study.eval.protocols:
        args = dict(suite="tasks", base_url=url, model=",".join(names), data_dir=study.eval.data_dir,
                    protocol=protocol, num_fewshot=study.eval.num_fewshot, limit=study.eval.limit,
                    concurrency=study.eval.concurrency, max_new_tokens=study.eval.max_new_tokens,
                    output=str(study.output_dir / "eval" / protocol))
        logger.info("mtlora-eval tasks --protocol %s --model %s", protocol, args["model"])
        out[protocol] = run_eval(args)
    return out


# -- the study -----------------------------------------------------------------------------------------------------
def run_study(study: Study, skip_eval: bool = False, only: list[str] | None = None) -> dict:
    from mtlora_train import study_report

    study.output_dir.mkdir(parents=True, exist_ok=True)
    trained = [r for r in study.runs if r.seed is not None and (not only or r.arm in only)]
    for i, run in enumerate(trained, 1):
        logger.info("=== run %d/%d: %s", i, len(trained), run.name)
        train_run(study, run)
    if skip_eval:
        return {}
    missing = [r.name for r in study.runs if r.seed is not None and run_state(study.run_dir(r)) != "done"]
    if missing:
        raise ConfigError(f"runs {missing} are not finished; train them (without --only) before evaluating, or "
                          "pass --skip_eval", field="only")
    model = study.common.get("model_name_or_path")
    adapters = {r.name: study.run_dir(r) / "adapter" for r in study.runs if r.seed is not None}
    names = [r.name for r in study.runs]
    with serve(model, adapters, study.eval, study.output_dir / "serve.log") as url:
        accuracy = evaluate(study, names, url)
    ce = study_report.heldout_ce(study, adapters)
    summary = study_report.collect(study, accuracy, ce)
    (study.output_dir / "study.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    study_report.write_report(study, summary)
    logger.info("report: %s", study.output_dir / "report.md")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtlora-train study", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Train every arm of a study YAML (resumably), serve them all in one "
                                            "mtlora-serve, score them with mtlora-eval (each protocol) and the "
                                            "held-out answer cross-entropy, and write report.md (docs/training.md).")
    p.add_argument("--config", required=True, help="study YAML (e.g. training/configs/study_smollm2_bigbench.yaml)")
    p.add_argument("--output_dir", default=None, help="override the YAML's output_dir")
    p.add_argument("--only", default=None, help="comma-separated arm names to train now (others untouched); "
                                                "evaluation still covers every arm, so combine with --skip_eval")
    p.add_argument("--skip_eval", action="store_true", help="train only (no serving, evaluation or report)")
    p.add_argument("--smoke", action="store_true", help="2 steps per arm, 2 items per task: an end-to-end dry run")
    p.add_argument("--model_name_or_path", default=None, help="override common.model_name_or_path (base model)")
    p.add_argument("--dataset_dir", default=None, help="override common.dataset_dir")
    p.add_argument("--eval_data_dir", default=None, help="override eval.data_dir (BBH-layout <task>.json folder)")
    p.add_argument("--list", action="store_true", help="print the runs and their state (done/resume/new), then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        study = load_study(ns.config, ns.output_dir)
        for key, value in (("model_name_or_path", ns.model_name_or_path), ("dataset_dir", ns.dataset_dir)):
            if value:
                study.common[key] = value
        if ns.eval_data_dir:
            study.eval.data_dir = ns.eval_data_dir
        if ns.smoke:
            apply_smoke(study)
        if ns.list:
            for run in study.runs:
                print(f"{run.name:24s} {'base model' if run.seed is None else run_state(study.run_dir(run))}")
            return 0
        only = [a.strip() for a in ns.only.split(",")] if ns.only else None
        run_study(study, skip_eval=ns.skip_eval, only=only)
        return 0
    except MtloraError as exc:
        print(f"mtlora-train study: error: {exc}", file=sys.stderr)
        return 2


__all__ = ["EvalSettings", "Run", "Study", "load_study", "run_study", "asdict"]
