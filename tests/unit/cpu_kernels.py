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


def three_steps(runner, pool):
    """Logits of a prefill step, a decode-only step and a mixed step (a decode group beside a prefill chunk) of
    three random prompts (12, 26, 14 tokens) through `runner` (a ModelRunner without adapters) over `pool`."""
    import torch

    from mtlora_server.engine.scheduler import Chunk, Sequence

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 259, (n,), generator=gen).tolist() for n in (12, 26, 14)]
    s = [Sequence(i, ids, len(ids), blocks=pool.allocate(3)) for i, ids in enumerate(prompts)]
    rows = [runner.run([Chunk(s[0], 0, 8), Chunk(s[1], 0, 22)], [[7], [21]])]
    rows.append(runner.run([Chunk(s[0], 8, 1), Chunk(s[1], 22, 1)], [[8], [22]]))              # decode only
    rows.append(runner.run([Chunk(s[2], 0, 14), Chunk(s[0], 9, 1), Chunk(s[1], 23, 1)],           # mixed
                           [[13], [9], [23]]))
    return torch.cat(rows)
