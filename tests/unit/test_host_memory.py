"""Importing mtlora_server asks torch for transparent huge pages on large CPU allocations (the package docstring):
the default is set before torch is imported, an explicit setting wins, and where the kernel grants THP on request
a large tensor really lands on huge pages."""

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
