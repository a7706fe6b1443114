"""Slow serving checks (run with `-m slow`): the bounded soak and a schemathesis fuzz run finding no 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serve_helpers import MTLORA_CFG, serve_process, write_adapter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
HERE = Path(__file__).parent


def test_soak_1000_mixed_requests_with_disconnects():
    proc = subprocess.run([sys.executable, str(HERE / "soak.py"), "--requests", "1000", "--concurrency", "16",
                           "--disconnect-fraction", "0.2"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "soak passed" in proc.stdout and "'dropped'" in proc.stdout


def test_schemathesis_fuzz_finds_no_server_error(tmp_path, tiny_model_dir):
    root = tmp_path / "root"
    write_adapter(root / "moe", tiny_model_dir, **MTLORA_CFG)
    args = ["--model", str(tiny_model_dir), "--adapter", f"moe={root / 'moe'}", "--device", "cpu", "--dtype",
            "float32", "--kv-cache-memory", "4MiB", "--enable-adapter-loading", "--adapter-root", str(root),
            "--log-level", "warning"]
    st = Path(sys.executable).with_name("st")
    with serve_process(args) as url:
        proc = subprocess.run([str(st), "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
                               "--max-examples", "50", "--generation-deterministic", "--no-color"],
                              capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
