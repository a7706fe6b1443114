"""End to end: the real `mtlora-eval` CLI against the real `mtlora-serve` process (tiny model, base + adapter).

The exact-accuracy checks live in test_eval_fake_server.py (a server with known answers); here the point is that
every protocol's requests are accepted by our server, every item is scored (no errors), the comparison artefacts
are written, and the harness log-likelihood path agrees with the engine's own echo logprobs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from mtlora.testing import make_tiny_model_dir
from mtlora_clients.eval.data import load_mmlu_dir
from mtlora_clients.eval.tasks import build_tasks
from serve_helpers import serve_process, write_adapter


def _eval_cmd() -> list[str]:
    script = Path(sys.executable).with_name("mtlora-eval")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mtlora_clients.eval.cli"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    # The byte-level test tokenizer makes real benchmark prompts long: give the tiny model a 4k context.
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-4k"), max_position_embeddings=4096)
    adapter = write_adapter(tmp_path_factory.mktemp("adapters") / "skill", model_dir)
    with serve_process(["--model", str(model_dir), "--adapter", f"skill={adapter}",
                        "--served-model-name", "base", "--dtype", "float32"]) as url:
        yield url


@pytest.mark.parametrize("suite,protocol,data,extra", [
    ("tasks", "paper", "bigbench_mt/test", ["--tasks", "winowhy,matrixshapes", "--max-new-tokens", "8"]),
    ("mmlu", "harness", "mmlu", ["--tasks", "anatomy,virology"]),
    ("mmlu", "paper", "mmlu", ["--tasks", "anatomy"]),
    ("bbh", "harness", "bbh", ["--tasks", "navigate", "--max-new-tokens", "8"]),
])
def test_eval_cli_scores_every_item_against_real_server(served, shared_data, tmp_path, suite, protocol, data, extra):
    out = tmp_path / "out"
    cmd = _eval_cmd() + [suite, "--base-url", served, "--model", "base,skill", "--protocol", protocol,
                         "--data-dir", str(shared_data / data), "--num-fewshot", "0", "--limit", "3",
                         "--concurrency", "4", "--output", str(out)] + extra
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["n_errors"] == 0
    assert set(results["models"]) == {"base", "skill"}
    for summary in results["models"].values():
        n_tasks = len(extra[1].split(","))
        assert summary["n_errors"] == 0
        assert summary["n"] == 3 * n_tasks
        assert 0.0 <= summary["average"] <= 1.0
    assert (out / "report.md").is_file() and (out / "comparison.png").stat().st_size > 1000


def test_harness_loglikelihood_matches_server_echo_logprobs(served, shared_data, tmp_path):
    """The harness protocol's recorded log-likelihoods equal what the server reports for the same text."""
    out = tmp_path / "out"
    cmd = _eval_cmd() + ["mmlu", "--base-url", served, "--model", "skill", "--protocol", "harness",
                         "--data-dir", str(shared_data / "mmlu"), "--num-fewshot", "0", "--limit", "1",
                         "--tasks", "anatomy", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = [json.loads(line) for line in (out / "skill" / "anatomy.jsonl").read_text().splitlines()]
    (task,) = build_tasks("mmlu", "harness", load_mmlu_dir(shared_data / "mmlu", ["anatomy"]), 0, 1)
    context = task.prompt(0)
    for letter, ll in record["logprobs"].items():
        body = {"model": "skill", "prompt": context + " " + letter, "max_tokens": 0, "echo": True,
                "logprobs": 1, "temperature": 0}
        lp = httpx.post(served + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
        # Every token that ends after the context belongs to the continuation (a token straddling the boundary
        # is conditioned on the same context, as the client documents).
        cont = [v for v, tok, off in zip(lp["token_logprobs"], lp["tokens"], lp["text_offset"])
                if off + len(tok) > len(context)]
        assert cont, "the continuation must map to at least one token"
        assert sum(cont) == pytest.approx(ll, abs=1e-4)
