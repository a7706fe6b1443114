"""Running a test module's checks under the Triton interpreter: TRITON_INTERPRET is read when triton is imported
and must not leak into other tests, so the module runs itself in a subprocess with it set and prints one JSON line
of results (its `if __name__ == "__main__"` block), which the calling test checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(test_file: str, timeout: int = 600):
    """The JSON that `python test_file` prints last, run with TRITON_INTERPRET=1 (skips without triton)."""
    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, test_file], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)       # what the gpu-marked kernel tests check
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is not available: the kernel test needs a GPU")


def print_results(results) -> None:
    """The interpreter subprocess's side: `results(tmp)` (tmp: a scratch directory) printed as one JSON line."""
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(results(tmp)))
