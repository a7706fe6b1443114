"""DDP through `torchrun` on CPU (gloo): two processes with one sequence each train exactly what one process with
both sequences trains (equal-length data, so the per-process mean losses average to the single-process mean), the
logged losses are the mean over processes, and only one process writes the adapter."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import torch

from mtlora.checkpoint import load_adapter
from mtlora.testing import make_tiny_model_dir


def _equal_length_mixture(path):
    """Two tasks whose prompts and answers have the same length in bytes (the tiny model's byte tokenizer)."""
    rng, rows = random.Random(0), []
    for i in range(16):
        word = "".join(rng.choice("abcdefgh") for _ in range(4))
        task = i % 2
        rows.append({"instruction": ("Write it in capitals", "Write it in reverse!")[task], "input": word,
                     "output": (word.upper(), word[::-1])[task], "task_type": str(task)})
    path.mkdir()
    (path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _train(launcher: list[str], model_dir, data, out, batch: int) -> subprocess.CompletedProcess:
    args = ["--method", "mtlora", "--model_name_or_path", str(model_dir), "--dataset_dir", str(data),
            "--output_dir", str(out), "--lora_rank", "4", "--lora_nums", "4", "--enable_block_adapter",
            "--block_adapter_type", "ffn", "--enable_fine_grained_routing", "--routing_group_size", "32",
            "--lora_dropout", "0", "--learning_rate", "1e-2", "--max_steps", "4", "--save_steps", "0",
            "--logging_steps", "1", "--max_seq_length", "64", "--enable_spectral_reg", "--spectral_reg_steps", "2",
            "--per_device_train_batch_size", str(batch), "--data_cache_dir", str(out.parent / f"cache-{out.name}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(launcher + ["-m", "mtlora_train.cli"] + args, env=env, capture_output=True, text=True,
                          timeout=600)


def test_torchrun_ddp_on_cpu_equals_one_process_with_the_global_batch(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = _equal_length_mixture(tmp_path / "data")
    ddp = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                 model_dir, data, tmp_path / "ddp", batch=1)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = _train([sys.executable], model_dir, data, tmp_path / "one", batch=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert ddp.stderr.count("final adapter written") == 1          # the main process alone writes it
    assert ddp.stderr.count("step 4:") == 1                        # and logs

    def history(run):
        return [json.loads(line) for line in (tmp_path / run / "log_history.jsonl").read_text().splitlines()]

    h_ddp, h_one = history("ddp"), history("one")
    assert [e["step"] for e in h_ddp] == [1, 2, 3, 4] and h_ddp[-1]["spectral"] > 0
    for a, b in zip(h_ddp, h_one):
        assert a.keys() == b.keys()
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k])), (a["step"], k, a[k], b[k])
    base_cfg = json.loads((model_dir / "config.json").read_text())
    from transformers import LlamaConfig

    _, t_ddp = load_adapter(tmp_path / "ddp" / "adapter", LlamaConfig(**base_cfg))
    _, t_one = load_adapter(tmp_path / "one" / "adapter", LlamaConfig(**base_cfg))
    assert t_ddp.keys() == t_one.keys()
    for k in t_one:
        torch.testing.assert_close(t_ddp[k], t_one[k], atol=1e-5, rtol=1e-4)
    assert any(t_one[k].abs().sum() > 0 for k in t_one if k.endswith("lora_B"))   # it did train
