"""`mtlora-bench paired`: adapted and base runs alternate in one engine, every part timed, the paired ratios and the
adapter shares follow from the runs, the engine is left as it was, and bad flags are refused by argparse."""

from __future__ import annotations

import json

import pytest

from mtlora_server import bench_paired
from mtlora_server.bench_paired import Report, Run


@pytest.mark.parametrize("adapters", ["mix4", "lora4"])
def test_paired_runs_alternate_and_time_the_adapter_work(adapters, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "paired.json"
    assert bench_paired.main(["--model", str(tiny_model_dir), "--dtype", "float32", "--adapters", adapters,
                              "--num-prompts", "4", "--input-len", "8", "--output-len", "3", "--rounds", "2",
                              "--output", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [(r["round"], r["kind"]) for r in rep["runs"]] == [(0, "base"), (0, "adapted"), (1, "adapted"),
                                                              (1, "base")]
    for r in rep["runs"]:
        assert r["output_tokens"] == 4 * 3 and r["prefill_steps"] >= 1 and r["decode_steps"] >= 1
        assert 0 < r["prefill_s"] + r["decode_s"] <= r["wall"]
        assert r["kernel_s"] <= r["adapter_s"] <= r["prefill_s"] + r["decode_s"]
    base = [r for r in rep["runs"] if r["kind"] == "base"]
    adapted = [r for r in rep["runs"] if r["kind"] == "adapted"]
    from mtlora_server.engine import cpu_adapters
    built = cpu_adapters.kernel() is not None                       # else the torch path does the adapter work
    assert all(r["kernel_s"] == 0 for r in base) and all((r["kernel_s"] > 0) == built for r in adapted)
    assert max(r["adapter_s"] for r in base) < min(r["adapter_s"] for r in adapted)   # base: early returns only
    by = {(r["kind"], r["round"]): r["wall"] for r in rep["runs"]}
    assert rep["round_ratios"] == pytest.approx([by[("base", k)] / by[("adapted", k)] for k in (0, 1)])
    assert 0 < rep["adapter_share"] < 1 and 0 <= rep["kernel_share"] <= rep["adapter_share"]
    printed = capsys.readouterr().out
    assert "paired ratio (median of rounds)" in printed and "adapter work:" in printed


def test_interleaved_rounds_step_two_engines_in_turn(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """--interleave: per round both kinds' runs, their steps taken in turn (the first kind alternating by
    round), each run's wall the sum of its own steps, every token generated, the engines' runners restored."""
    from mtlora_server import bench_profile
    built, steps = [], []
    real_build = bench_profile.build_core

    def building(*args, **kwargs):
        core, names, vocab = real_build(*args, **kwargs)
        built.append(core)
        real_step = core.step

        def step():
            steps.append(len(built) - 1 - built[::-1].index(core))
            return real_step()
        core.step = step
        return core, names, vocab

    monkeypatch.setattr(bench_profile, "build_core", building)
    out = tmp_path / "interleaved.json"
    assert bench_paired.main(["--model", str(tiny_model_dir), "--dtype", "float32", "--num-prompts", "3",
                              "--input-len", "8", "--output-len", "4", "--rounds", "2", "--interleave",
                              "--output", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["interleaved"] and [(r["round"], r["kind"]) for r in rep["runs"]] == [
        (0, "base"), (0, "adapted"), (1, "adapted"), (1, "base")]
    for r in rep["runs"]:
        assert r["output_tokens"] == 3 * 4 and r["prefill_steps"] >= 1 and r["decode_steps"] >= 1
        assert r["wall"] == pytest.approx(r["prefill_s"] + r["decode_s"])
    assert len(built) == 2 and all("execute" not in vars(c.runner) for c in built)
    assert sum(a != b for a, b in zip(steps, steps[1:])) >= len(steps) // 2      # the engines took turns
    by = {(r["kind"], r["round"]): r["wall"] for r in rep["runs"]}
    assert rep["round_ratios"] == pytest.approx([by[("base", k)] / by[("adapted", k)] for k in (0, 1)])
    assert "not timed (--interleave" in capsys.readouterr().out


def test_timers_restore_the_engine(tiny_model_dir, tmp_path):
    import argparse

    from mtlora_server.bench_profile import build_core

    spec = argparse.Namespace(model=str(tiny_model_dir), dtype="float32", adapters="lora4", batch=2,
                              enforce_eager=False, seed=0)
    core, names, _ = build_core(spec, tmp_path)
    from mtlora_server.engine import model as model_module

    def hooks():
        return core.runner.execute, model_module._adapt, core.slots.cpu_kernel, core.model._linear, \
            vars(core.slots).get("bind_step")

    before = hooks()
    with bench_paired.timers(core) as acc:
        assert all(a is not b for a, b in zip(hooks()[:4], before) if b is not None)
        bench_paired.one_run(core, acc, "adapted", 0, [[5, 6, 7]] * 2, names, 2)
        assert acc["adapter_s"] > 0 and acc["prefill_steps"] >= 1 and acc["gemm_s"] > 0
    assert hooks() == before


def test_summarize_pairs_each_round_and_takes_medians():
    runs = [Run("base", 0, 10.0), Run("adapted", 0, 11.0, adapter_s=0.5, kernel_s=0.3),
            Run("adapted", 1, 12.0, adapter_s=0.4, kernel_s=0.2), Run("base", 1, 11.0),
            Run("base", 2, 9.0)]                                    # an unpaired run counts in no ratio
    rep = bench_paired.summarize(Report("mix4", "float32", 1, 1, 1, runs))
    assert rep.round_ratios == pytest.approx([10 / 11, 11 / 12])
    assert rep.paired_ratio == pytest.approx((10 / 11 + 11 / 12) / 2)
    assert rep.adapter_share == pytest.approx((0.5 / 11 + 0.4 / 12) / 2)
    assert rep.kernel_share == pytest.approx((0.3 / 11 + 0.2 / 12) / 2)


@pytest.mark.parametrize("flags", [["--rounds", "0"], ["--num-prompts", "-1"], ["--output-len", "x"],
                                   ["--adapters", "none"]])
def test_bad_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_paired.main(flags)
    assert exc.value.code == 2 and flags[0] in capsys.readouterr().err


def test_bench_cli_has_the_paired_subcommand(monkeypatch):
    from mtlora_clients import bench

    got = {}
    monkeypatch.setattr(bench_paired, "main", lambda argv: got.setdefault("argv", argv) and 0)
    assert bench.main(["paired", "--rounds", "3"]) == 0 and got["argv"] == ["--rounds", "3"]
    assert "paired" in bench.build_parser().format_help()
