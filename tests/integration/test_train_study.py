"""`mtlora-train study --smoke` end to end on a tiny random model: train 3 runs, serve them with the base model in
one `mtlora-serve`, score both protocols, held-out CE, report; then skip finished runs and resume an interrupted one
exactly."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from mtlora.checkpoint import load_adapter
from mtlora.testing import make_tiny_model_dir
from mtlora_train import study as study_mod
from mtlora_train.cli import main as train_main

TASKS = {"upper": ("Write the word in capitals", str.upper), "first": ("Give the first letter", lambda w: w[0])}

STUDY_YAML = """\
# mtlora-train study --config {path}
output_dir: {out}
seeds: [1, 2]
common:
  model_name_or_path: {model}
  dataset_dir: {data}
  data_cache_dir: {cache}
  prompt_format: qa
  lora_rank: 4
  lora_nums: 2
  lora_dropout: 0.0
  learning_rate: 0.01
  max_seq_length: 64
arms:
  base: null
  lora:
    method: lora
    target_modules: q_proj,v_proj
    seeds: [1, 2]
  mtlora:
    method: mtlora
    enable_block_adapter: true
    block_adapter_type: ffn
    enable_blc: true
    enable_fine_grained_routing: true
    routing_group_size: 32
    enable_spectral_reg: true
    spectral_reg_steps: 1
eval:
  data_dir: {test}
  protocols: [harness, paper]
  concurrency: 8
  serve_args: [--max-model-len, "256"]
"""


@pytest.fixture
def study_yaml(tmp_path):
    rng = random.Random(0)
    train, test = [], {t: [] for t in TASKS}
    for _ in range(6):
        for task, (instruction, fn) in TASKS.items():
            word = "".join(rng.choice("abcd") for _ in range(3))
            train.append({"instruction": instruction, "input": word, "output": fn(word), "task_type": task})
            test[task].append({"input": f"{instruction}\n{word}", "target": fn(word)})
    (tmp_path / "data" / "test").mkdir(parents=True)
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    for task, examples in test.items():
        (tmp_path / "data" / "test" / f"{task}.json").write_text(json.dumps({"examples": examples}))
    model = make_tiny_model_dir(tmp_path / "model")
    path = tmp_path / "study.yaml"
    path.write_text(STUDY_YAML.format(path=path, out=tmp_path / "out", model=model, data=tmp_path / "data",
                                      cache=tmp_path / "cache", test=tmp_path / "data" / "test"))
    return path


def test_study_smoke_end_to_end_skip_and_resume(study_yaml, capsys):
    assert train_main(["study", "--config", str(study_yaml), "--smoke"]) == 0
    out = study_yaml.parent / "out"
    summary = json.loads((out / "study.json").read_text())
    assert list(summary["runs"]) == ["base", "lora-s1", "lora-s2", "mtlora-s1"]
    for name, r in summary["runs"].items():
        for protocol in ("harness", "paper"):
            assert set(r[protocol]["tasks"]) == set(TASKS) and r[protocol]["errors"] == 0
        assert set(r["heldout_ce"]["tasks"]) == set(TASKS)
        assert all(v > 0 for v in r["heldout_ce"]["tasks"].values())
        if name != "base":
            assert r["steps"] == 2 and r["s_per_step"] > 0 and r["trainable_params"] > 0
    assert summary["arms"]["lora"]["heldout_ce"]["macro"]["n"] == 2
    # different adapters, different held-out CE (the CE really reads each adapter)
    ces = {n: r["heldout_ce"]["macro"] for n, r in summary["runs"].items()}
    assert len(set(round(v, 9) for v in ces.values())) == 4
    report = (out / "report.md").read_text()
    assert "| lora | 2 |" in report and "held-out answer cross-entropy" in report and "accuracy, harness" in report
    assert (out / "study_loss.png").is_file() and (out / "runs" / "mtlora-s1" / "arm_config.yaml").is_file()
    assert (out / "runs" / "mtlora-s1" / "arm_config.yaml").read_text().startswith("# mtlora-train --config")

    # the held-out CE is kept per model and reused while the adapter's files are unchanged
    from mtlora_train import study_report
    cached_study = study_mod.load_study(study_yaml)
    study_mod.apply_smoke(cached_study)
    adapters = {r.name: cached_study.run_dir(r) / "adapter" for r in cached_study.runs if r.seed is not None}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study_report, "_task_ce", lambda *a, **k: pytest.fail("a cached held-out CE was recomputed"))
        assert study_report.heldout_ce(cached_study, adapters) == {n: r["heldout_ce"]["tasks"]
                                                                   for n, r in summary["runs"].items()}
    (out / "heldout_ce" / "lora-s1.json").write_text("{}")                  # unreadable entry: recomputed
    again = study_report.heldout_ce(cached_study, adapters)
    assert again["lora-s1"] == pytest.approx(summary["runs"]["lora-s1"]["heldout_ce"]["tasks"], rel=1e-6)

    # skip: a rerun trains nothing
    run = next(r for r in study_mod.load_study(study_yaml).runs if r.name == "mtlora-s1")
    study = study_mod.load_study(study_yaml)
    study_mod.apply_smoke(study)
    assert study_mod.train_run(study, run) == "skipped"

    # resume: drop the final adapter and the last checkpoint; the run continues from checkpoint-1 exactly
    run_dir = out / "runs" / "mtlora-s1"
    _, before = load_adapter(run_dir / "adapter")
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "log_history.jsonl").unlink()
    shutil.rmtree(run_dir / "checkpoint-2")
    assert study_mod.run_state(run_dir) == "resume"
    assert study_mod.train_run(study, run) == "resumed"
    _, after = load_adapter(run_dir / "adapter")
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    timing = json.loads((run_dir / "study_timing.json").read_text())["invocations"]
    assert [i["resumed_at"] for i in timing] == [0, 1]

    assert train_main(["study", "--config", str(study_yaml), "--smoke", "--list"]) == 0
    assert "mtlora-s1" in capsys.readouterr().out


def test_study_config_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "s.yaml"
    bad.write_text("arms:\n  x:\n    method: lora\n    lora_rnk: 3\n")
    assert train_main(["study", "--config", str(bad)]) == 2
    assert "lora_rnk" in capsys.readouterr().err
    bad.write_text("arms:\n  base: null\nevals: {}\n")
    assert train_main(["study", "--config", str(bad)]) == 2
    assert "evals" in capsys.readouterr().err


def test_shipped_study_config_parses():
    s = study_mod.load_study("training/configs/study_smollm2_bigbench.yaml")
    names = [r.name for r in s.runs]
    assert names == ["base", "lora-s42", "lora-s43", "lora_lr5e4-s42", "lora_lr5e4-s43",
                     "hydralora-s42", "hydralora-s43", "hydralora_lr5e4-s42", "hydralora_lr5e4-s43",
                     "block_ffn-s42", "block_ffn_lr1e4-s42", "block_ffn_lr5e4-s42", "block_ffn_lr5e4-s43",
                     "block_ffn_alpha64-s42", "block_ffn_fgr-s42", "block_ffn_spectral-s42", "mtlora-s42", "mtlora-s43",
                     "mtlora_lr5e4-s42", "mtlora_lr5e4-s43"]
    configs = {r.name: study_mod.train_config(s, r) for r in s.runs if r.seed is not None}
    budgets = {(c.max_steps, c.per_device_train_batch_size, c.max_seq_length, c.lora_rank) for c in configs.values()}
    assert budgets == {(400, 8, 256, 16)}
    lrs = {name.rsplit("-s", 1)[0]: c.learning_rate for name, c in configs.items()}
    assert {arm for arm, lr in lrs.items() if lr == 5e-4} == {"lora_lr5e4", "hydralora_lr5e4", "block_ffn_lr5e4",
                                                                     "mtlora_lr5e4"}
    # the tuned full mtLoRA arm is the mtlora arm at the tuned lr, nothing else changed
    mt, mt5 = configs["mtlora-s42"].to_dict(), configs["mtlora_lr5e4-s42"].to_dict()
    assert {k for k in mt if mt[k] != mt5[k]} == {"learning_rate", "output_dir"}
    for arm in ("lora", "hydralora"):  # so are the fairness arms of the component-level methods
        a, a5 = configs[f"{arm}-s43"].to_dict(), configs[f"{arm}_lr5e4-s43"].to_dict()
        assert {k for k in a if a[k] != a5[k]} == {"learning_rate", "output_dir"}
