"""Training data: response-only labels, malformed-record errors, skip counting, hashed cache, HF conversion."""

from __future__ import annotations

import json
import logging

import pytest

from mtlora.errors import ConfigError
from mtlora.testing import _byte_tokenizer
from mtlora_train.data import (IGNORE_INDEX, Collator, EpochSampler, Record, convert_hf_row, load_dataset,
                               read_file, tokenize_records)


@pytest.fixture(scope="module")
def tok():
    return _byte_tokenizer()


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_labels_cover_response_and_eos_only(tok):
    rec = Record("Say hi", "to Bob", "hi Bob", "greet")
    ex = tokenize_records([rec], tok, 512, "official")[0]
    ids = ex["input_ids"]
    prompt = tok("Say hi\nto Bob")["input_ids"] + [tok.eos_token_id]
    assert ids[: ex["prompt_len"]] == prompt
    assert ids[ex["prompt_len"]:] == tok("hi Bob", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    from mtlora_train.data import SFTDataset

    item = SFTDataset([ex], "x")[0]
    assert (item["labels"][: ex["prompt_len"]] == IGNORE_INDEX).all()
    assert item["labels"][ex["prompt_len"]:].tolist() == ids[ex["prompt_len"]:]
    assert tok.decode(ids[ex["prompt_len"]:-1]) == "hi Bob"


def test_prompt_formats_and_truncation(tok):
    rec = Record("Q", "", "answer", "t")
    plain = tokenize_records([rec], tok, 512, "plain")[0]
    assert tok.decode(plain["input_ids"][: plain["prompt_len"]]) == "Q\n"
    chat = tokenize_records([rec], tok, 512, "chat")[0]
    assert "user" in tok.decode(chat["input_ids"][: chat["prompt_len"]])
    qa = tokenize_records([Record("Add", "1 2", "3", "t")], tok, 512, "qa")[0]
    assert tok.decode(qa["input_ids"]) == "Q: Add\n1 2\nA: 3</s>"
    assert tok.decode(qa["input_ids"][qa["prompt_len"]:]) == " 3</s>"
    cut = tokenize_records([rec], tok, 4, "official")[0]
    assert len(cut["input_ids"]) == 4 and cut["prompt_len"] == 2
    assert tokenize_records([Record("a long prompt", "", "x", "t")], tok, 5, "official") == []


def test_collator_pads_with_ignored_labels():
    import torch

    items = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
             {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}]
    b = Collator(pad_token_id=0)(items)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("bad,message", [
    ('{"instruction": "x", "output": 3}', "field 'output' must be a string"),
    ('{"instruction": "x"', "invalid JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"output": "y"}', "field 'instruction'"),
    ('{"instruction": "x", "output": "y", "input": 5}', "field 'input'"),
])
def test_malformed_record_names_file_and_line(tmp_path, bad, message):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, "", bad])
    with pytest.raises(ConfigError) as exc:
        read_file(f)
    assert f"{f}:line 3" in str(exc.value) and message in str(exc.value)


def test_skip_bad_records_counts(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, "{oops", {"instruction": 1},
                                            {"instruction": "c", "input": None, "output": "d"}])
    records, bad = read_file(f, skip_bad_records=True)
    assert [r.output for r in records] == ["b", "d"] and bad == 2


def test_json_array_file_errors_name_record(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}]))
    with pytest.raises(ConfigError, match=r"d.json: record #1: field 'output'"):
        read_file(f)


def test_non_utf8_file_is_a_config_error_naming_the_file(tmp_path, tok):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps({"instruction": "caf\u00e9", "output": "x"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.jsonl.*UTF-8"):
        read_file(bad)
    with pytest.raises(ConfigError, match=r"latin1\.jsonl.*UTF-8"):
        load_dataset(str(tmp_path), tok, 64, cache_dir=tmp_path / "cache")


def test_json_file_that_is_not_an_array_says_so(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}, indent=2), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"d\.json.*JSON array"):
        read_file(path)


def test_cache_reuses_unchanged_and_retokenises_changed_file(tmp_path, tok, caplog):
    data = tmp_path / "data"
    data.mkdir()
    a = _write_jsonl(data / "a.jsonl", [{"instruction": "one", "output": "1", "task_type": "n"}])
    _write_jsonl(data / "b.json", [{"instruction": "two", "output": "2"}])
    cache = tmp_path / "cache"
    first = load_dataset(str(data), tok, 64, cache_dir=cache)
    assert len(first) == 2 and len(list(cache.glob("*.pt"))) == 2
    with caplog.at_level(logging.INFO, logger="mtlora_train.data"):
        again = load_dataset(str(data), tok, 64, cache_dir=cache)
    assert caplog.text.count("read from cache") == 2 and again.fingerprint == first.fingerprint
    _write_jsonl(a, [{"instruction": "one", "output": "uno"}])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mtlora_train.data"):
        changed = load_dataset(str(data), tok, 64, cache_dir=cache)
    assert caplog.text.count("read from cache") == 1                 # only b.json came from the cache
    assert changed.fingerprint != first.fingerprint
    decoded = tok.decode(changed[0]["input_ids"][changed.examples[0]["prompt_len"]:-1])
    assert decoded == "uno"
    other_len = load_dataset(str(data), tok, 32, cache_dir=cache)  # other settings: another key
    assert other_len.fingerprint != changed.fingerprint


def test_hf_dataset_id_is_converted(tmp_path, tok):
    def fake_hub(name, skip):
        assert name == "databricks/databricks-dolly-15k"
        rows = [{"instruction": "Why?", "context": "Because.", "response": "Ok", "category": "open_qa"}]
        return [Record(**convert_hf_row(r)) for r in rows]

    ds = load_dataset("databricks/databricks-dolly-15k", tok, 64, cache_dir=tmp_path, hf_reader=fake_hub)
    assert ds.task_types() == ["open_qa"]
    assert tok.decode(ds.examples[0]["input_ids"][: ds.examples[0]["prompt_len"] - 1]) == "Why?\nBecause."


def test_unconvertible_hf_row_and_missing_source_are_clear_errors(tmp_path, tok):
    with pytest.raises(ConfigError, match="Dolly"):
        convert_hf_row({"text": "x"})
    with pytest.raises(ConfigError, match="no .json or .jsonl files"):
        load_dataset(str(tmp_path), tok, 64, cache_dir=tmp_path / "c")


def test_epoch_sampler_is_a_seeded_permutation():
    s = EpochSampler(10, seed=3)
    e0 = list(s)
    assert sorted(e0) == list(range(10)) and list(s) == e0
    s.set_epoch(1)
    assert list(s) != e0


def test_shared_bigbench_records_are_valid(shared_data):
    records, bad = read_file(shared_data / "bigbench_mt" / "train.jsonl")
    assert bad == 0 and len(records) == 6215
    assert len({r.task_type for r in records}) == 16
