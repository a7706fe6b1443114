"""Shared by the tests of the engine's C++ CPU kernels (test_cpu_attention / _adapters / _fused): the built
extension or a visible skip / failure, and a build that fails as a missing compiler does."""

from __future__ import annotations

import shutil

import pytest


def built(module, what: str):
    """module.kernel(), skipping where no C++ compiler exists and failing where one does but the build failed."""
    ext = module.kernel()
    if ext is None:
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip(f"no C++ compiler on this machine: the {what} cannot be built")
        pytest.fail(f"a C++ compiler is present but the {what} did not build (see the log)")
    return ext


def break_the_build(monkeypatch, module) -> None:
    """Forget module's loaded extension and make the next build fail like a machine without a compiler."""
    import torch.utils.cpp_extension as cpp

    def broken(*a, **k):
        raise RuntimeError("Error building extension\nc++: not found")

    monkeypatch.setattr(module.EXTENSION, "_state", {})
    monkeypatch.setattr(cpp, "load", broken)
