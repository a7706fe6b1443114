"""Importing mtlora_server asks torch for transparent huge pages on large CPU allocations (the package docstring):
the default is set before torch is imported, an explicit setting wins, and where the kernel grants THP on request
a large tensor really lands on huge pages. It also has glibc's malloc keep freed blocks under 32 MiB in its heaps
(host_memory.py): a 20 MiB block then comes from a heap, not from its own mmap, unless the process opted out."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import os, sys
import mtlora_server, torch
t = torch.ones(64 * 2 ** 20 // 4)                     # 64 MiB, touched
t += 1
huge = 0
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages:"):
        huge = int(line.split()[1])
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), huge)
"""


def _probe(env_value: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    value, huge = out.stdout.split()
    return value, int(huge)


def _thp_on_request() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and ("[madvise]" in path.read_text() or "[always]" in path.read_text())


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc/self/smaps_rollup")
def test_the_package_asks_for_huge_pages_and_an_explicit_setting_wins():
    value, huge = _probe(None)
    assert value == "1"
    if _thp_on_request():
        assert huge >= 2048, "a 64 MiB tensor should sit (at least partly) on 2 MiB pages"
    value, huge_off = _probe("0")
    assert value == "0"
    if _thp_on_request() and "[madvise]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        assert huge_off == 0, "with THP on request only, opting out must leave the tensor on 4 KiB pages"


MALLOC_PROBE = """
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                             "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
import mtlora_server
before = libc.mallinfo2().hblks
block = libc.malloc(20 * 2 ** 20)
print(libc.mallinfo2().hblks - before)              # 1: the block got its own mmap; 0: it came from a heap
"""


def _glibc_with_mallinfo2() -> bool:
    import ctypes
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


def _mmapped_blocks(extra_env: dict[str, str]) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("MTLORA_MALLOC", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE], env={**env, **extra_env}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_the_package_keeps_freed_blocks_in_mallocs_heaps_unless_told_not_to():
    assert _mmapped_blocks({}) == 0
    assert _mmapped_blocks({"MTLORA_MALLOC": "default"}) == 1
    assert _mmapped_blocks({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}) == 1   # its own tuning wins


@pytest.mark.parametrize("env", [{"MTLORA_MALLOC": "default"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
                                 {"MALLOC_TRIM_THRESHOLD_": "1"}, {"MALLOC_MMAP_THRESHOLD_": "1"},
                                 {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"},
                                 {"LD_PRELOAD": "libjemalloc.so.2"}])
def test_malloc_is_left_alone_when_the_process_tunes_it(env):
    from mtlora_server import host_memory

    assert host_memory.keep_freed_memory(env) is False
