"""Instruction data: reading, validation, tokenisation with response-only labels, caching, batching.

Contract:
- `read_records(source)` reads a folder of `.json`/`.jsonl` files (sorted by name), one such file, or a Hugging Face
  dataset id (only when `source` is not a local path; needs the `datasets` package and a reachable hub; Dolly-15k
  style columns are converted on the fly by `convert_hf_row`). Records are objects with string `instruction` and
  `output`, optional string-or-null `input` and optional string `task_type`. A malformed record raises
  `ConfigError` naming the file and line (JSON Lines) or record index (JSON arrays); with `skip_bad_records=True`
  it is skipped and counted instead.
- `tokenize_records(...)`: prompt = instruction (+ "\\n" + input), laid out by `prompt_format` (official: prompt
  tokens + EOS as separator; plain: prompt + newline; qa: "Q: {prompt}\\nA:" and the response after a space, the
  layout of `mtlora-eval bbh|tasks`; chat: the tokenizer's chat template); input_ids = prompt + response tokens +
  EOS, truncated to `max_seq_length`; labels are -100 on the prompt, so the loss covers the response and EOS only.
  Examples left with no label token by truncation are dropped (counted in the log).
- `load_dataset(...)` caches the tokenised result per source file under `cache_dir`, keyed by a sha256 of the
  file's bytes, the tokenizer's vocabulary and specials, `max_seq_length`, `prompt_format` and the schema version:
  an edited file, or another tokenizer, is re-tokenised; unchanged files are read back.
- `Collator` pads right (pad id, labels -100) and returns input_ids/labels/attention_mask [B, T].
- `EpochSampler` is a seeded permutation per epoch (seed + epoch), so an epoch's order is reproducible on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mtlora.errors import ConfigError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CACHE_SCHEMA = 1
DATA_SUFFIXES = (".json", ".jsonl")


@dataclass
class Record:
    instruction: str
    input: str
    output: str
    task_type: str

    @property
    def prompt(self) -> str:
        return self.instruction + ("\n" + self.input if self.input else "")


# -- reading and validation ----------------------------------------------------------------------------------------
def parse_record(obj: Any, where: str) -> Record:
    """A validated Record from one decoded JSON value; `where` ("file:line N") prefixes every error."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("instruction", "output"):
        if not isinstance(obj.get(key), str):
            raise ConfigError(f"{where}: field {key!r} must be a string, got {obj.get(key)!r:.60}", field=key)
    inp = obj.get("input")
    if inp is not None and not isinstance(inp, str):
        raise ConfigError(f"{where}: field 'input' must be a string or null", field="input")
    task = obj.get("task_type", "default")
    if not isinstance(task, str):
        task = str(task)
    return Record(obj["instruction"], inp or "", obj["output"], task)


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); re-save the file as UTF-8",
                          field="dataset_dir") from None


def _iter_file(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """(location, decoded value) per record of `path`'s `text`; a JSON array file or JSON Lines (any suffix)."""
    if path.suffix == ".json" and not text.lstrip().startswith("[") and len(text.strip().splitlines()) > 1:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None                     # JSON Lines in a .json file; read line by line below
        if isinstance(whole, dict):
            raise ConfigError(f"{path}: expected a JSON array of records or JSON Lines (one object per line), "
                              "got one JSON object spanning several lines", field="dataset_dir")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:line {exc.lineno}: invalid JSON: {exc.msg}") from None
        for i, item in enumerate(items):
            yield f"{path}: record #{i}", item
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:line {lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{path}:line {lineno}", ConfigError(f"{path}:line {lineno}: invalid JSON: {exc.msg}")


def read_file(path: Path, skip_bad_records: bool = False, data: bytes | None = None) -> tuple[list[Record], int]:
    """Records of one file and the number skipped; `data`: the file's bytes when the caller has read them already."""
    records, bad = [], 0
    text = _decode(path, path.read_bytes() if data is None else data)
    for where, value in _iter_file(path, text):
        try:
            if isinstance(value, ConfigError):
                raise value
            records.append(parse_record(value, where))
        except ConfigError as exc:
            if not skip_bad_records:
                raise
            bad += 1
            logger.debug("skipping bad record: %s", exc)
    return records, bad


def data_files(source: str | Path) -> list[Path]:
    path = Path(source)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not files:
        raise ConfigError(f"no .json or .jsonl files in {path}", field="dataset_dir")
    return files


def convert_hf_row(row: dict) -> dict:
    """A Hugging Face instruction row as a training record (Dolly-15k: instruction/context/response/category)."""
    if {"instruction", "output"} <= set(row):
        return {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"],
                "task_type": str(row.get("task_type", "default"))}
    if {"instruction", "response"} <= set(row):
        return {"instruction": row["instruction"], "input": row.get("context") or "", "output": row["response"],
                "task_type": str(row.get("category", "default"))}
    raise ConfigError(f"cannot convert dataset row with columns {sorted(row)}; expected instruction/output or "
                      "instruction/context/response (Dolly-15k)", field="dataset_dir")


def read_hf_dataset(name: str, skip_bad_records: bool = False) -> list[Record]:
    """Download and convert a Hugging Face dataset (train split); errors say why it cannot be used."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{name!r} is not a local path, and loading it as a Hugging Face dataset needs the "
                          "`datasets` package (pip install datasets)", field="dataset_dir") from None
    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as exc:  # hub unreachable, unknown id, ...: say both routes that failed
        raise ConfigError(f"{name!r} is neither a local folder/file nor a loadable Hugging Face dataset: {exc}",
                          field="dataset_dir") from None
    records, bad = [], 0
    for i, row in enumerate(rows):
        try:
            records.append(parse_record(convert_hf_row(dict(row)), f"{name}: row {i}"))
        except ConfigError:
            if not skip_bad_records:
                raise
            bad += 1
    if bad:
        logger.warning("skipped %d malformed rows of %s", bad, name)
    return records


# -- tokenisation --------------------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.bos_token_id,
                   getattr(tokenizer, "chat_template", None),
                   tokenizer("a b", add_special_tokens=True)["input_ids"])).encode())
    return h.hexdigest()


def prompt_ids(tokenizer, prompt: str, prompt_format: str) -> list[int]:
    if prompt_format == "chat":
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    if prompt_format == "plain":
        return tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]
    if prompt_format == "qa":  # the BBH-style "Q: ...\nA: answer" layout `mtlora-eval bbh|tasks` prompts with
        return tokenizer(f"Q: {prompt}\nA:", add_special_tokens=True)["input_ids"]
    # official: the prompt, then EOS as the separator (the official template is "{instruction}</s>")
    return tokenizer(prompt, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]


def tokenize_records(records: list[Record], tokenizer, max_seq_length: int,
                     prompt_format: str = "official") -> list[dict]:
    """[{input_ids: list[int], prompt_len: int, task_type: str}]; labels are derived from prompt_len."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; training needs one to end responses", field="tokenizer")
    out, dropped = [], 0
    for rec in records:
        p = prompt_ids(tokenizer, rec.prompt, prompt_format)
        response = (" " + rec.output) if prompt_format == "qa" else rec.output   # "A: answer", as in the shots
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + r)[:max_seq_length]
        if len(ids) <= len(p):
            dropped += 1
            continue
        out.append({"input_ids": ids, "prompt_len": len(p), "task_type": rec.task_type})
    if dropped:
        logger.warning("dropped %d examples whose prompt fills max_seq_length=%d", dropped, max_seq_length)
    return out


# -- caching -------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("MTLORA_CACHE_DIR", Path.home() / ".cache" / "mtlora")) / "tokenized"


def _cache_key(file_bytes: bytes, tok_fp: str, max_seq_length: int, prompt_format: str, skip: bool) -> str:
    h = hashlib.sha256(file_bytes)
    h.update(f"|{tok_fp}|{max_seq_length}|{prompt_format}|{skip}|{CACHE_SCHEMA}".encode())
    return h.hexdigest()


def _load_file_cached(path: Path, tokenizer, tok_fp: str, max_seq_length: int, prompt_format: str,
                      skip_bad_records: bool, cache_dir: Path) -> tuple[list[dict], str]:
    data = path.read_bytes()
    key = _cache_key(data, tok_fp, max_seq_length, prompt_format, skip_bad_records)
    cached = cache_dir / f"{key}.pt"
    if cached.is_file():
        try:
            logger.info("tokenised %s read from cache %s", path.name, cached.name)
            return torch.load(cached, weights_only=True), key
        except Exception as exc:  # a torn or foreign cache file is rebuilt, not fatal
            logger.warning("ignoring unreadable cache %s: %s", cached, exc)
    records, bad = read_file(path, skip_bad_records, data)
    if bad:
        logger.warning("skipped %d malformed records in %s", bad, path)
    examples = tokenize_records(records, tokenizer, max_seq_length, prompt_format)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    torch.save(examples, tmp)
    os.replace(tmp, cached)  # atomic: concurrent readers see the old file or the whole new one
    return examples, key


def load_dataset(source: str, tokenizer, max_seq_length: int, prompt_format: str = "official",
                 cache_dir: str | Path | None = None, skip_bad_records: bool = False,
                 hf_reader: Callable[[str, bool], list[Record]] = read_hf_dataset) -> "SFTDataset":
    """Tokenised training examples of `source` (see the module docstring)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    tok_fp = tokenizer_fingerprint(tokenizer)
    if Path(source).exists():
        examples, keys = [], []
        for f in data_files(source):
            ex, key = _load_file_cached(f, tokenizer, tok_fp, max_seq_length, prompt_format, skip_bad_records,
                                        cache)
            examples.extend(ex)
            keys.append(key)
        fingerprint = hashlib.sha256("".join(keys).encode()).hexdigest()
    else:
        records = hf_reader(source, skip_bad_records)
        examples = tokenize_records(records, tokenizer, max_seq_length, prompt_format)
        fingerprint = hashlib.sha256(f"{source}|{tok_fp}|{len(examples)}".encode()).hexdigest()
    if not examples:
        raise ConfigError(f"no usable training examples in {source}", field="dataset_dir")
    return SFTDataset(examples, fingerprint)


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict], fingerprint: str):
        self.examples = examples
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        ids = torch.tensor(ex["input_ids"], dtype=torch.long)            # [T]
        labels = ids.clone()
        labels[: ex["prompt_len"]] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}

    def task_types(self) -> list[str]:
        return [ex["task_type"] for ex in self.examples]


@dataclass
class Collator:
    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.nn.utils.rnn.pad_sequence([x["input_ids"] for x in items], batch_first=True,
                                              padding_value=self.pad_token_id)            # [B, T]
        labels = torch.nn.utils.rnn.pad_sequence([x["labels"] for x in items], batch_first=True,
                                                 padding_value=IGNORE_INDEX)               # [B, T]
        mask = torch.zeros_like(ids)
        for i, x in enumerate(items):
            mask[i, : len(x["input_ids"])] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of range(n) drawn from seed + epoch; `set_epoch` picks the epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
