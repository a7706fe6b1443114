"""`mtlora-bench train` runs the real recipe for each method and reports comparable rows (timings not asserted)."""

from __future__ import annotations

import json

from mtlora_clients import bench
from mtlora_train.bench import main


def test_train_bench_times_every_method_and_counts_parameters(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "bench.json"
    code = bench.main(["train", "--model", str(tiny_model_dir), "--data", str(shared_data / "bigbench_mt"),
                       "--seq-len", "1024", "--batch-size", "1", "--warmup", "0", "--steps", "1", "--rank", "4",
                       "--experts", "2", "--output", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"mtlora", "hydralora", "lora"}
    assert rows["hydralora"]["x_hydralora"] == 1.0
    # tiny model: hidden 64, 2 layers, q/k/v 64->64, 64->32 (GQA); r=4, N=2
    assert rows["lora"]["trainable_params"] == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4)
    assert rows["mtlora"]["trainable_params"] == 2 * (4 * 64 + 2 * 64 * 4 + 2 * 2 * 64)   # g=2 router
    assert all(r["step_s"] > 0 for r in rows.values())


def test_train_bench_help_lists_every_flag(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--methods", "--rank", "--experts", "--batch-size", "--seq-len", "--warmup",
                 "--steps", "--bf16", "--output"):
        assert flag in text
