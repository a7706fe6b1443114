"""`mtlora-bench gpu --dry-run`: the GPU script runs end to end on the CPU (Triton interpreter, toy shapes), so a
broken script is a red CI rather than wasted GPU time. Checks the JSON report's structure, that item 1 (kernel
parity under the interpreter) passes, and that no item errors. The run takes about a minute on a busy CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_report(tmp_path_factory):
    pytest.importorskip("triton", reason="triton is not installed: the dry run needs its interpreter")
    out = tmp_path_factory.mktemp("bench-gpu")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["OUT"] = str(out / "device-out")                   # the device runner's return folder gets a copy too
    proc = subprocess.run([sys.executable, "-m", "mtlora_clients.bench", "gpu", "--dry-run", "--quiet",
                           "--output", str(out / "report" / "gpu.json"), "--workdir", str(out / "work")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report" / "gpu.json").read_text())
    return report, proc.stdout, out


def test_dry_run_report_structure(dry_report):
    report, stdout, out = dry_report
    assert report["schema"] == "mtlora-bench-gpu/1" and report["dry_run"] is True and report["device"] == "cpu"
    assert report["environment"]["triton_interpret"] == "1"
    assert list(report["items"]) == ["kernel", "engine", "graphs", "perf"]
    for name, item in report["items"].items():
        assert set(item) >= {"name", "status", "reason", "targets", "checks", "metrics", "seconds", "truncated"}
        assert item["status"] in ("pass", "skipped"), (name, item["status"], item["reason"],
                                                              item["metrics"].get("traceback"))
        assert item["targets"], name                                             # every item states its targets
    assert report["summary"] == {n: i["status"] for n, i in report["items"].items()} and report["ok"] is True
    assert json.loads((out / "device-out" / "gpu.json").read_text())["summary"] == report["summary"]
    assert "kernel" in stdout and "perf" in stdout                                # the human table


def test_dry_run_kernel_parity_passes_under_the_interpreter(dry_report):
    report, _, _ = dry_report
    kernel = report["items"]["kernel"]
    assert kernel["status"] == "pass", kernel["reason"]
    cases = kernel["metrics"]["cases"]
    assert {c["dtype"] for c in cases} == {"float32", "bfloat16", "float16"}
    assert any(c["adapter_rows"] == 0 for c in cases)                           # base-only batches
    assert any(c["adapter_rows"] > 0 and c["ref_max"] > 0.1 for c in cases)
    assert all(c["ok"] for c in cases)
    assert kernel["metrics"]["graph_replay"]["captured"] is False               # CUDA graphs need a GPU
    assert kernel["checks"]["metadata_swap_replay"] and kernel["metrics"]["graph_replay"]["replays"] == 4
    sweep = kernel["metrics"]["tile_sweep"]
    assert "interpreter timings mean nothing" in sweep["note"] and set(sweep["ms"]) == {"1", "20"}
    assert kernel["metrics"]["tile_table"][-1][0] >= 2 ** 40                     # the table covers every T


def test_dry_run_engine_items_ran_on_cpu_and_perf_says_why_skipped(dry_report):
    report, _, _ = dry_report
    engine, graphs, perf = (report["items"][k] for k in ("engine", "graphs", "perf"))
    assert engine["status"] == "pass" and set(engine["checks"]) == {
        "prompt_logprobs_vs_reference", "greedy_vs_reference", "mixed_batch_equals_serial", "prefix_hit_equals_miss"}
    assert graphs["status"] == "pass" and graphs["metrics"]["rounds"]["float32/adapters_2"]["tokens_compared"] > 0
    assert perf["status"] == "skipped" and "CUDA" in perf["reason"]
    assert set(perf["metrics"]["decode"]) and perf["metrics"]["prefill"]["base"]["tokens_per_s"] > 0
    # the Triton decode attention ran (interpreter) against the gather path, and the step was profiled
    assert perf["metrics"]["decode_attention"] == "triton, in place"
    assert perf["metrics"]["attention_ab"]["torch_gather"]["eager_ms"] > 0
    assert [p["batch"] for p in perf["metrics"]["profile"]] == [1, 4] and perf["metrics"]["profile"][0]["top"]


def test_bad_flags_are_rejected_with_the_flag_named(capsys):
    from mtlora_server import bench_gpu

    assert bench_gpu.main(["--items", "kernel,nope"]) == 2
    assert "--items" in capsys.readouterr().err
    assert bench_gpu.main(["--budget-scale", "0"]) == 2
    assert "--budget-scale" in capsys.readouterr().err


def test_outputs_copy_into_out_folder(monkeypatch, tmp_path):
    from mtlora_server.bench_gpu import _outputs

    monkeypatch.delenv("OUT", raising=False)
    assert _outputs(None) == [] and _outputs(str(tmp_path / "a.json")) == [tmp_path / "a.json"]
    monkeypatch.setenv("OUT", str(tmp_path / "o"))
    assert _outputs(None) == [tmp_path / "o" / "mtlora-bench-gpu.json"]
    assert _outputs(str(tmp_path / "x" / "g.json")) == [tmp_path / "x" / "g.json", tmp_path / "o" / "g.json"]
    assert _outputs(str(tmp_path / "o" / "g.json")) == [tmp_path / "o" / "g.json"]
