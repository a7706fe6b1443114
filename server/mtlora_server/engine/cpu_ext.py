"""Small C++ CPU kernels (csrc/*.cpp), each built on first use with the system compiler and cached per machine.

Contract:
- `CpuExtension(source, prefix, env, what)`: one kernel source. `load() -> module | None` builds it on first call
  with `torch.utils.cpp_extension.load` (`CFLAGS`: -O3 -march=native, OpenMP through torch's own pool) and keeps
  the result for the process (thread-safe; tried once). The build directory's name (`build_name()`) carries a hash
  of the source, the flags, torch's version and this CPU's flags, so machines or venvs sharing a home directory
  never load each other's builds. ~40 s the first time on a machine, cached after; needs a C++ compiler and ninja
  (the `ninja` wheel is a serve dependency and is found even when the venv is not activated).
- A build never waits forever on a dead builder: torch's JIT build marks a build in progress with a `lock` file
  that a killed process leaves behind, and every later load would spin on it. Builders of one name here hold an
  `fcntl` lock on `<build dir>.flock` (the kernel drops it when its holder dies), so a `lock` file found while
  holding it is stale and is removed, with a warning, before the build.
- `load()` returns None, with one warning naming the reason, when the kernel cannot be built (no compiler, a
  build error), or with an info line when the environment variable `env` is set to "torch": callers then use
  their torch path. Never raises. `require(flag, required, usable)`: the same, where a missing kernel is a
  ConfigError naming the engine flag when that flag asked for the kernel.
- `enable_kernels(args, model, slots, kv_dtype, compiled)`: the CPU engine's switch-on of every kernel its flags
  allow (`cpu_attention`, `cpu_adapters`, `cpu_fused_ops`: auto | kernel | torch; "kernel" raises a ConfigError
  naming the flag when unavailable). The caller has checked: CPU, not batch-invariant. The fused row ops need the
  eager forward (`compiled`: compiled / static decode reads the torch functions).
- `at::parallel_for` inside a kernel uses the calling thread's OpenMP pool (torch's libgomp; no extension links
  its own), so the engine's step thread keeps one pool.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from mtlora.errors import ConfigError

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _ninja_on_path() -> None:
    """torch's JIT build runs `ninja` from PATH; a venv used without activation has the `ninja` wheel's binary
    off PATH, so add its directory (only when no ninja is on PATH already)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@contextlib.contextmanager
def _build_guard(build_dir: Path):
    """Hold this build's fcntl lock (waiting for a live builder of the same name); remove the torch `lock` file a
    killed builder left behind (module doc). Where the file system refuses fcntl locks, nothing is removed."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.with_name(build_dir.name + ".flock"), "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)          # blocks only while another process builds this very name
            locked = True
        except OSError as e:
            log.info("no fcntl lock for %s (%s): a stale torch build lock cannot be told apart", build_dir, e)
            locked = False
        stale = build_dir / "lock"
        if locked and stale.exists():
            log.warning("removing %s, left by a build that was killed (no live builder holds its lock)", stale)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(fh, fcntl.LOCK_UN)


class CpuExtension:
    """One C++ kernel source built on first use (module doc)."""

    def __init__(self, source: Path, prefix: str, env: str, what: str):
        self.source, self.prefix, self.env, self.what = source, prefix, env, what
        self._lock = threading.Lock()
        self._state: dict[str, object] = {}          # "ext": the module or None once tried

    def build_name(self) -> str:
        """Extension name: a hash of the source, the headers beside it (csrc/*.h, which sources include), the
        flags, torch's version and this CPU's feature flags."""
        headers = b"".join(h.read_bytes() for h in sorted(self.source.parent.glob("*.h")))
        h = hashlib.sha256(self.source.read_bytes() + headers + " ".join(CFLAGS).encode()
                           + torch.__version__.encode() + _cpu_flags().encode())
        return f"{self.prefix}_{h.hexdigest()[:12]}"

    def build_dir(self) -> Path:
        """Where the build lives: torch's own choice for a CPU build ($TORCH_EXTENSIONS_DIR/<build_name>, else
        ~/.cache/torch_extensions/py<major><minor><abiflags>_cpu/<build_name>), so earlier builds are reused."""
        from torch.utils.cpp_extension import get_default_build_root
        root = os.environ.get("TORCH_EXTENSIONS_DIR")
        if root is None:
            v = sys.version_info
            root = str(Path(get_default_build_root()) / f"py{v.major}{v.minor}{getattr(sys, 'abiflags', '')}_cpu")
        return Path(root) / self.build_name()

    def reset(self) -> None:
        """Forget the result of an earlier `load` (tests)."""
        with self._lock:
            self._state.clear()

    def require(self, flag: str, required: bool, usable: bool = True):
        """`load()` where `usable` (the caller's dtype / device conditions), else None; with `required` (the engine
        flag set to "kernel") None becomes a ConfigError naming `flag`."""
        ext = self.load() if usable else None
        if ext is None and required:
            raise ConfigError(f"{flag}=kernel: the {self.what} kernel is unavailable here (CPU with float32 / "
                              "bfloat16 only; a build failure is logged above)", field=flag)
        return ext

    def load(self):
        """The compiled extension, or None (module doc). Built at most once per process."""
        with self._lock:
            if "ext" in self._state:
                return self._state["ext"]
            ext = None
            if os.environ.get(self.env, "").lower() == "torch":
                log.info("%s: the torch path (%s=torch)", self.what, self.env)
            else:
                try:
                    from torch.utils.cpp_extension import load
                    _ninja_on_path()
                    log.info("%s: loading the C++ kernel (compiled on first use on a machine, ~40 s)", self.what)
                    build_dir = self.build_dir()
                    with _build_guard(build_dir):
                        ext = load(build_dir.name, [str(self.source)], extra_cflags=CFLAGS,
                                   build_directory=str(build_dir), verbose=False)
                except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
                    msg = str(e).strip()
                    log.warning("%s: the C++ kernel could not be built (%s: %s); using the torch path", self.what,
                                type(e).__name__, msg.splitlines()[-1][:300] if msg else "")
            self._state["ext"] = ext
            return ext


def enable_kernels(args, model, slots, kv_dtype, compiled: bool) -> None:
    """Switch the CPU engine's model and adapter slots to the kernels its flags allow (module doc)."""
    from . import cpu_adapters
    if args.cpu_attention != "torch":
        if model.enable_paged_kernel(kv_dtype, required=args.cpu_attention == "kernel"):
            log.info("decode attention reads the paged KV pool in place (cpu_attention kernel)")
    if args.cpu_adapters != "torch":
        cpu_adapters.enable(slots, required=args.cpu_adapters == "kernel")
    if not compiled and args.cpu_fused_ops != "torch":
        if model.enable_fused_ops(required=args.cpu_fused_ops == "kernel"):
            log.info("norms, residual adds, silu * up and rope run fused (cpu_fused kernels)")
