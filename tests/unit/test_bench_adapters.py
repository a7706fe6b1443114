"""`mtlora-bench adapters` end to end on the tiny model: both rows served, rounds alternating the first row, each
row's median run reported and the ratio taken of the medians (bench_adapters.py)."""

import json
import logging

import pytest

from mtlora_server import bench_adapters

SMALL = ["--num-adapters", "6", "--max-adapters", "2", "--resident-adapters", "2", "--num-prompts", "6",
         "--input-len", "6", "--output-len", "3", "--load-repeats", "1", "--dtype", "float32"]


def test_rounds_alternate_the_rows_and_the_ratio_is_of_the_medians(tiny_model_dir, tmp_path, caplog, capsys):
    out = tmp_path / "a.json"
    with caplog.at_level(logging.INFO, logger="mtlora.bench_adapters"):
        assert bench_adapters.main(["--model", str(tiny_model_dir), *SMALL, "--repeats", "3",
                                    "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    res = report["results"]
    order = [r.getMessage().split(" (round")[0] for r in caplog.records if "(round" in r.getMessage()]
    assert order == ["many_adapters", "resident", "resident", "many_adapters", "many_adapters", "resident"]
    for row in ("many_adapters", "resident"):
        assert len(res[row]["runs_seconds"]) == 3
        assert round(res[row]["seconds"], 3) == sorted(res[row]["runs_seconds"])[1]      # the median run
        assert res[row]["output_tokens"] == 6 * 3                       # every request answered, every round
    assert res["many_adapters"]["distinct_adapters"] > 2 and res["many_adapters"]["loads"] > 0   # swaps happened
    assert res["resident"]["loads"] == 0
    assert report["ratio"] == res["many_adapters"]["tokens_per_s"] / res["resident"]["tokens_per_s"]
    assert len(report["round_ratios"]) == 3 and all(x > 0 for x in report["round_ratios"])
    printed = capsys.readouterr().out
    assert "medians of 3 round(s); per round:" in printed and printed.count("runs (s)") == 2


@pytest.mark.parametrize("argv,fragment", [
    (["--repeats", "0"], "argument --repeats: expected a positive integer"),
    (["--num-adapters", "-2"], "argument --num-adapters: expected a positive integer"),
    (["--load-repeats", "0"], "argument --load-repeats: expected a positive integer"),
    (["--num-adapters", "4", "--resident-adapters", "8"], "--resident-adapters (8) must not exceed --num-adapters"),
    (["--rate", "nan"], "--rate: expected requests/s >= 0"),
])
def test_bad_counts_are_refused_naming_the_flag(argv, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        bench_adapters.main([*argv, "--output", str(tmp_path / "a.json")])
    assert info.value.code == 2 and fragment in capsys.readouterr().err
