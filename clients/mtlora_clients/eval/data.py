"""Benchmark loaders: the standard on-disk layouts, or the Hugging Face hub when `datasets` is available.

Layouts (read unchanged from the upstream downloads):
- MMLU: `<dir>/dev/<subject>_dev.csv` (few-shot exemplars) and `<dir>/test/<subject>_test.csv`; no header,
  columns `question, A, B, C, D, answer-letter`.
- BBH (and any `tasks` folder): one `<task>.json` per task holding `{"examples": [{"input", "target"}, ...]}`.
Bad input raises `mtlora.errors.ConfigError` naming the file and the row/field.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mtlora.errors import ConfigError

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)


@dataclass(frozen=True)
class MCQ:
    """One MMLU question: four choices and the correct letter."""

    question: str
    choices: tuple[str, str, str, str]
    answer: str


@dataclass(frozen=True)
class Example:
    """One BBH-format example."""

    input: str
    target: str


@dataclass
class MMLUSubject:
    dev: list[MCQ]
    test: list[MCQ]


def _select(available: list[str], wanted: list[str] | None, what: str, where: str) -> list[str]:
    if not wanted:
        return available
    missing = [w for w in wanted if w not in available]
    if missing:
        raise ConfigError(f"unknown {what} {missing}; available: {', '.join(available)}", field="--tasks", path=where)
    return list(wanted)


def _read_text(path: Path) -> str:
    """A benchmark file's text; unreadable or non-UTF-8 files are ConfigErrors naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start}: {e.reason})", field="--data-dir", path=str(path)) from e
    except OSError as e:
        raise ConfigError(f"cannot read: {e}", field="--data-dir", path=str(path)) from e


def _read_mmlu_csv(path: Path) -> list[MCQ]:
    rows = []
    try:
        parsed = list(csv.reader(io.StringIO(_read_text(path), newline="")))
    except csv.Error as e:
        raise ConfigError(f"not valid CSV: {e}", field="--data-dir", path=str(path)) from e
    for i, row in enumerate(parsed):
        if len(row) != 6:
            raise ConfigError(f"row {i + 1} has {len(row)} columns, expected 6 "
                              "(question,A,B,C,D,answer)", field=f"row {i + 1}", path=str(path))
        answer = row[5].strip()
        if answer not in LETTERS:
            raise ConfigError(f"row {i + 1}: answer {answer!r} is not one of A/B/C/D",
                              field=f"row {i + 1}.answer", path=str(path))
        rows.append(MCQ(row[0], (row[1], row[2], row[3], row[4]), answer))
    return rows


def load_mmlu_dir(root: Path, subjects: list[str] | None = None) -> dict[str, MMLUSubject]:
    """Subjects found in `<root>/test`, each with its dev exemplars; both files must exist."""
    root = Path(root)
    test_dir, dev_dir = root / "test", root / "dev"
    if not test_dir.is_dir() or not dev_dir.is_dir():
        raise ConfigError("expected the MMLU layout dev/<subject>_dev.csv and test/<subject>_test.csv",
                          field="--data-dir", path=str(root))
    available = sorted(p.name[: -len("_test.csv")] for p in test_dir.glob("*_test.csv"))
    out = {}
    for subject in _select(available, subjects, "MMLU subjects", str(root)):
        dev_path = dev_dir / f"{subject}_dev.csv"
        if not dev_path.is_file():
            raise ConfigError("few-shot file missing", field="dev", path=str(dev_path))
        out[subject] = MMLUSubject(_read_mmlu_csv(dev_path), _read_mmlu_csv(test_dir / f"{subject}_test.csv"))
    return out


def _read_bbh_json(path: Path) -> list[Example]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"not valid JSON: {e}", path=str(path)) from e
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise ConfigError('expected {"examples": [{"input", "target"}, ...]}', field="examples", path=str(path))
    out = []
    for i, ex in enumerate(data["examples"]):
        for key in ("input", "target"):
            if not isinstance(ex, dict) or not isinstance(ex.get(key), str):
                raise ConfigError(f"examples[{i}].{key} missing or not a string", field=f"examples[{i}].{key}",
                                  path=str(path))
        if not ex["target"].strip():
            raise ConfigError(f"examples[{i}].target is empty", field=f"examples[{i}].target", path=str(path))
        out.append(Example(ex["input"], ex["target"]))
    return out


def load_bbh_dir(root: Path, tasks: list[str] | None = None) -> dict[str, list[Example]]:
    """Every `<task>.json` of a folder (BBH's own layout; `tasks` folders use the same)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError("not a folder of <task>.json files", field="--data-dir", path=str(root))
    available = sorted(p.stem for p in root.glob("*.json"))
    if not available:
        raise ConfigError("no <task>.json files found", field="--data-dir", path=str(root))
    return {t: _read_bbh_json(root / f"{t}.json") for t in _select(available, tasks, "tasks", str(root))}


def _hub_datasets(what: str, flag_help: str):
    """Import `datasets` or explain exactly what to pass instead."""
    try:
        import datasets  # optional: only for runs without --data-dir
    except ImportError as e:
        raise ConfigError(f"no --data-dir given and the `datasets` library is not installed, so {what} cannot be "
                          f"fetched from the Hugging Face hub. Pass {flag_help} (or `pip install datasets`).",
                          field="--data-dir") from e
    return datasets


def _load_hub_config(datasets, repo: str, name: str, layout: str):
    """`datasets.load_dataset(repo, name)`; any failure becomes a ConfigError saying which --data-dir layout to pass."""
    try:
        return datasets.load_dataset(repo, name)
    except Exception as e:  # network, auth or cache failures all end in the same advice
        raise ConfigError(f"could not load {repo}/{name} from the hub ({e}); pass --data-dir DIR with {layout}",
                          field="--data-dir") from e


def load_mmlu_hub(subjects: list[str] | None) -> dict[str, MMLUSubject]:
    """cais/mmlu from the hub (one config per subject, splits dev/test, answer as an index)."""
    from .categories import SUBJECT_TO_CATEGORY

    datasets = _hub_datasets("MMLU", "--data-dir DIR where DIR holds dev/<subject>_dev.csv and "
                                     "test/<subject>_test.csv (e.g. /work/shared/data/mmlu)")
    out = {}
    for subject in _select(sorted(SUBJECT_TO_CATEGORY), subjects, "MMLU subjects", "cais/mmlu"):
        ds = _load_hub_config(datasets, "cais/mmlu", subject, "the dev/ and test/ CSV folders")
        out[subject] = MMLUSubject(*[[MCQ(r["question"], tuple(r["choices"]), LETTERS[r["answer"]])
                                      for r in ds[split]] for split in ("dev", "test")])
    return out


def load_bbh_hub(tasks: list[str] | None) -> dict[str, list[Example]]:
    """lukaemon/bbh from the hub (one config per task, split test)."""
    datasets = _hub_datasets("BBH", "--data-dir DIR where DIR holds one <task>.json per BBH task "
                                    "(e.g. /work/shared/data/bbh)")
    out = {}
    for task in _select(list(BBH_TASKS), tasks, "BBH tasks", "lukaemon/bbh"):
        ds = _load_hub_config(datasets, "lukaemon/bbh", task, "one <task>.json per task")
        out[task] = [Example(r["input"], r["target"]) for r in ds["test"]]
    return out


def data_hash(obj) -> str:
    """sha256 of a canonical JSON dump of the loaded data: two runs with equal hashes saw the same items."""
    def default(o):
        return o.__dict__ if hasattr(o, "__dict__") else str(o)

    blob = json.dumps(obj, default=default, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()
