"""Loaders, MMLU categories, prompt formats, resume-file reading, and the torch-free import contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtlora.errors import ConfigError
from mtlora_clients.eval import data
from mtlora_clients.eval.categories import CATEGORIES, SUBJECT_TO_CATEGORY
from mtlora_clients.eval.runner import _Appender, load_data, model_dirname, read_done
from mtlora_clients.eval.tasks import build_tasks
from mtlora_clients.eval.runner import default_args

REPO = Path(__file__).resolve().parents[2]


def test_client_never_imports_torch():
    code = ("import sys; import mtlora_clients, mtlora_clients.http, mtlora_clients.bench, "
            "mtlora_clients.eval.cli, mtlora_clients.eval.runner, mtlora_clients.eval.report; "
            "mtlora_clients.eval.cli.build_parser().format_help(); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "clients")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_mmlu_layout_counts_and_categories(shared_data):
    mmlu = data.load_mmlu_dir(shared_data / "mmlu")
    assert len(mmlu) == 57
    assert sum(len(s.dev) for s in mmlu.values()) == 285
    assert sum(len(s.test) for s in mmlu.values()) == 14042
    assert set(mmlu) == set(SUBJECT_TO_CATEGORY)  # the category map covers exactly the 57 subjects
    assert {k: len(v) for k, v in CATEGORIES.items()} == {"STEM": 18, "humanities": 13, "social sciences": 12,
                                                          "other": 14}
    q = mmlu["abstract_algebra"].dev[0]
    assert q.answer == "B" and q.choices == ("0", "1", "2", "3")


def test_bbh_layout_counts(shared_data):
    bbh = data.load_bbh_dir(shared_data / "bbh")
    assert len(bbh) == 27 and tuple(sorted(bbh)) == data.BBH_TASKS
    assert sum(len(v) for v in bbh.values()) == 6511
    tasks = build_tasks("bbh", "paper", bbh, None, None)
    assert sum(len(t.items) for t in tasks) == 6511 - 27 * 3  # the 3 shots of each file are not scored


def test_prompt_formats_exact():
    ex = [data.Example("in0", "t0"), data.Example("in1", "t1"), data.Example("in2", "t2"), data.Example("x", "y")]
    (bbh,) = build_tasks("bbh", "paper", {"t": ex}, 2, None)
    assert bbh.prompt(0) == "Q: in0\nA: t0\n\nQ: in1\nA: t1\n\nQ: in2\nA:"
    q = data.MCQ(" What? ", ("a", "b", "c", "d"), "C")
    subj = data.MMLUSubject(dev=[q], test=[q])
    (paper,) = build_tasks("mmlu", "paper", {"high_school_physics": subj}, 1, None)
    assert paper.prompt(0) == ("Question:  What? \nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n"
                               "Question:  What? \nA. a\nB. b\nC. c\nD. d\nAnswer:")
    (harness,) = build_tasks("mmlu", "harness", {"high_school_physics": subj}, 1, None)
    assert harness.prompt(0) == ("The following are multiple choice questions (with answers) about high school "
                                 "physics.\n\nWhat?\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\nWhat?\nA. a\nB. b\nC. c\n"
                                 "D. d\nAnswer:")


def test_fewshot_and_limit_validation():
    ex = [data.Example(f"i{k}", "t") for k in range(4)]
    (t,) = build_tasks("tasks", "harness", {"t": ex}, 1, 2)
    assert [e.input for e in t.items] == ["i1", "i2"]
    with pytest.raises(ConfigError, match="num-fewshot"):
        build_tasks("bbh", "paper", {"t": ex}, 4, None)  # nothing left to score


def test_bad_mmlu_csv_names_file_and_row(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "dev" / "s_dev.csv").write_text("q,a,b,c,d,A\n")
    (tmp_path / "test" / "s_test.csv").write_text("q,a,b,c,d,A\nq2,a,b,c,d,E\n")
    with pytest.raises(ConfigError, match=r"s_test\.csv.*row 2.*'E'"):
        data.load_mmlu_dir(tmp_path)
    (tmp_path / "test" / "s_test.csv").write_text("q,a,b,A\n")
    with pytest.raises(ConfigError, match=r"s_test\.csv.*4 columns"):
        data.load_mmlu_dir(tmp_path)
    with pytest.raises(ConfigError, match="dev/<subject>_dev.csv"):
        data.load_mmlu_dir(tmp_path / "dev")


def test_non_utf8_benchmark_files_name_the_file(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "dev" / "s_dev.csv").write_text("q,a,b,c,d,A\n")
    (tmp_path / "test" / "s_test.csv").write_bytes("caf\u00e9,a,b,c,d,A\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"s_test\.csv.*UTF-8"):
        data.load_mmlu_dir(tmp_path)
    bbh = tmp_path / "bbh"
    bbh.mkdir()
    (bbh / "t.json").write_bytes('{"examples": [{"input": "caf\u00e9", "target": "x"}]}'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"t\.json.*UTF-8"):
        data.load_bbh_dir(bbh)


@pytest.mark.parametrize("content,match", [
    ("{", "not valid JSON"), ('{"rows": []}', "examples"),
    ('{"examples": [{"input": "x"}]}', r"examples\[0\]\.target"), ('{"examples": [{"input": "x", "target": " "}]}',
                                                                  "empty"),
])
def test_bad_bbh_json_names_file_and_field(tmp_path, content, match):
    (tmp_path / "t.json").write_text(content)
    with pytest.raises(ConfigError, match=match) as e:
        data.load_bbh_dir(tmp_path)
    assert "t.json" in str(e.value)


def test_unknown_task_lists_available(shared_data):
    with pytest.raises(ConfigError, match="unknown tasks.*snarks"):
        data.load_bbh_dir(shared_data / "bbh", ["nope"])


def test_without_data_dir_and_without_datasets_says_what_to_pass(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail, as when not installed
    a = default_args()
    a.suite = "mmlu"
    with pytest.raises(ConfigError, match="Pass --data-dir DIR where DIR holds dev/"):
        load_data(a)
    a.suite = "bbh"
    with pytest.raises(ConfigError, match="one <task>.json per BBH task"):
        load_data(a)
    a.suite = "tasks"
    with pytest.raises(ConfigError, match="`tasks` needs --data-dir"):
        load_data(a)


class _HubStandIn:
    """A stand-in for the `datasets` module serving the shared copies in the hub's schemas (cais/mmlu rows:
    question, choices, answer index; lukaemon/bbh rows: input, target), so the conversion code runs offline."""

    def __init__(self, shared_data):
        self.mmlu = data.load_mmlu_dir(shared_data / "mmlu", ["anatomy", "virology"])
        self.bbh = data.load_bbh_dir(shared_data / "bbh", ["snarks"])
        self.calls = []

    def load_dataset(self, repo, name):
        self.calls.append((repo, name))
        if repo == "cais/mmlu":
            subject = self.mmlu[name]
            return {split: [{"question": q.question, "subject": name, "choices": list(q.choices),
                             "answer": "ABCD".index(q.answer)} for q in getattr(subject, split)]
                    for split in ("dev", "test")}
        if repo == "lukaemon/bbh":
            return {"test": [{"input": e.input, "target": e.target} for e in self.bbh[name]]}
        raise FileNotFoundError(f"{repo}/{name} is not on this stand-in hub")


def test_hub_route_converts_the_hub_schemas_to_the_same_items(monkeypatch, shared_data):
    hub = _HubStandIn(shared_data)
    monkeypatch.setitem(sys.modules, "datasets", hub)
    a = default_args()
    a.suite, a.tasks = "mmlu", "anatomy,virology"
    assert data.data_hash(load_data(a)) == data.data_hash(hub.mmlu)
    a.suite, a.tasks = "bbh", "snarks"
    assert data.data_hash(load_data(a)) == data.data_hash(hub.bbh)
    assert hub.calls == [("cais/mmlu", "anatomy"), ("cais/mmlu", "virology"), ("lukaemon/bbh", "snarks")]
    a.suite, a.tasks = "mmlu", "astronomy"                # the stand-in hub fails: say which --data-dir to pass
    with pytest.raises(ConfigError, match="could not load cais/mmlu/astronomy.*--data-dir DIR with the dev/"):
        load_data(a)


def test_read_done_skips_partial_line_and_changed_prompts(tmp_path):
    ex = [data.Example(f"i{k}", "t") for k in range(6)]
    (t,) = build_tasks("bbh", "paper", {"t": ex}, 1, None)
    path = tmp_path / "t.jsonl"
    lines = [json.dumps({"index": 0, "prompt_sha": t.prompt_sha(0), "correct": True}),
             json.dumps({"index": 1, "prompt_sha": "stale", "correct": True}),  # other protocol / shots
             json.dumps({"index": 9, "prompt_sha": "x", "correct": True})]      # out of range
    path.write_text("\n".join(lines) + '\n{"index": 2, "prompt_sh')            # cut by a kill
    assert list(read_done(path, t)) == [0]
    app = _Appender(path)  # appending after the cut line starts a fresh line
    app.write({"index": 2, "prompt_sha": t.prompt_sha(2), "correct": False})
    app.close()
    assert sorted(read_done(path, t)) == [0, 2]


def test_model_dirname_is_a_single_path_component():
    assert model_dirname("org/name") == "org__name" and "/" not in model_dirname("a/b/c")


def test_resume_key_separates_protocols_and_budgets():
    ex = [data.Example(f"i{k}", "t") for k in range(5)]
    (paper,) = build_tasks("bbh", "paper", {"t": ex}, 3, None)
    (harness,) = build_tasks("bbh", "harness", {"t": ex}, 3, None)
    (short,) = build_tasks("bbh", "harness", {"t": ex}, 3, None, max_new_tokens=16)
    assert paper.prompt(0) == harness.prompt(0)  # same text ...
    assert len({paper.prompt_sha(0), harness.prompt_sha(0), short.prompt_sha(0)}) == 3  # ... different records
    assert short.max_tokens == 16 and harness.max_tokens == 256 and paper.max_tokens == 32


def test_cli_bad_arguments_exit_2_with_message(capsys, tmp_path):
    from mtlora_clients.eval import cli

    assert cli.main(["tasks", "--base-url", "http://x", "--model", "m", "--output", str(tmp_path)]) == 2
    assert "`tasks` needs --data-dir" in capsys.readouterr().err
    assert cli.main(["bbh", "--base-url", "http://x", "--model", "m", "--limit", "0"]) == 2
    assert "--limit must be positive" in capsys.readouterr().err
    assert cli.main(["bbh", "--base-url", "http://x", "--model", "m", "--timeout", "0"]) == 2
    assert "--timeout must be positive" in capsys.readouterr().err
    assert cli.main(["bbh", "--base-url", "http://x", "--model", "m", "--num-fewshot", "-1"]) == 2
    assert "--num-fewshot must be >= 0" in capsys.readouterr().err
    assert cli.main(["bbh", "--base-url", "http://x", "--model", "m", "--max-retries", "-1"]) == 2
    assert "--max-retries must be >= 0" in capsys.readouterr().err
    help_text = cli.build_parser().format_help()
    for flag in ("--base-url", "--model", "--api-key", "--data-dir", "--protocol", "--num-fewshot", "--tasks",
                 "--limit", "--concurrency", "--output", "--max-new-tokens"):
        assert flag in help_text


def test_appender_ends_a_partial_line_before_appending(tmp_path):
    from mtlora_clients.eval.runner import _Appender

    path = tmp_path / "m" / "t.jsonl"
    path.parent.mkdir()
    path.write_text('{"index": 0, "prompt_sha": "a"}\n{"index": 1, "pro', encoding="utf-8")   # a kill mid-line
    app = _Appender(path)
    app.write({"index": 2})
    app.close()
    assert path.read_text(encoding="utf-8").splitlines()[1:] == ['{"index": 1, "pro', '{"index": 2}']
    app = _Appender(path)          # a clean end: nothing added
    app.close()
    assert path.read_text(encoding="utf-8").endswith('{"index": 2}\n')
