"""The C++ kernels' first-use build (engine/cpu_ext.py) never waits forever on a builder that was killed.

torch's JIT build marks a build in progress with a `lock` file in the build directory; a process killed mid-build
(a pod restarted during its first start, a test that stops a starting server) leaves it behind and every later
load would spin on it. These tests build a tiny real extension in a private TORCH_EXTENSIONS_DIR.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading

import pytest

from mtlora_server.engine import cpu_ext

TINY = "#include <torch/extension.h>\nint answer() { return 42; }\n" \
       "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def(\"answer\", &answer); }\n"


@pytest.fixture
def tiny_ext(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY)
    return cpu_ext.CpuExtension(source, "mtlora_test_tiny", "MTLORA_TEST_TINY_KERNEL", "test kernel")


def test_build_dir_is_torchs_own_layout(tiny_ext, tmp_path):
    from torch.utils import cpp_extension
    assert tiny_ext.build_dir().is_relative_to(tmp_path.resolve() / "ext")
    # the same directory torch picks by itself, so builds cached before the guard existed are reused
    assert str(tiny_ext.build_dir()) == cpp_extension._get_build_directory(tiny_ext.build_name(), False)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler here")
def test_a_lock_left_by_a_killed_build_is_removed_and_the_build_runs(tiny_ext, caplog):
    build_dir = tiny_ext.build_dir()
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()                    # what a builder killed mid-build leaves behind
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(ext=tiny_ext.load()), daemon=True)
    worker.start()
    worker.join(timeout=300)                        # without the guard this waits forever on the stale lock
    assert not worker.is_alive(), "load() is still waiting on the stale lock file"
    assert result["ext"] is not None and result["ext"].answer() == 42
    assert not (build_dir / "lock").exists()
    assert "left by a build that was killed" in caplog.text


HOLDER = textwrap.dedent("""
    import fcntl, sys
    from pathlib import Path
    build_dir = Path(sys.argv[1])
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.with_name(build_dir.name + ".flock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        (build_dir / "lock").touch()                # a live builder's torch lock
        print("held", flush=True)
        sys.stdin.readline()
        (build_dir / "lock").unlink()               # the build finished: torch removes its lock
""")


def test_a_live_builders_lock_is_waited_for_not_removed(tmp_path):
    build_dir = tmp_path / "ext" / "py_cpu" / "mtlora_test_live"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(build_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        entered = threading.Event()

        def guarded():
            with cpu_ext._build_guard(build_dir):
                entered.set()

        worker = threading.Thread(target=guarded, daemon=True)
        worker.start()
        assert not entered.wait(1.0), "entered while another live process holds the build lock"
        assert (build_dir / "lock").exists()        # a live builder's lock is left alone
        holder.stdin.write("done\n")
        holder.stdin.flush()
        assert entered.wait(30), "never entered after the other builder finished"
        worker.join(timeout=30)
    finally:
        holder.kill()
        holder.wait()
