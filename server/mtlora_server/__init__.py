"""mtlora-serve: the serving engine (scheduler, KV pool, runner, batched adapter ops) and the OpenAI-compatible API.

Importing the package (every `mtlora-serve` / `mtlora-bench` command does, before torch) asks torch to put its
large CPU allocations -- weights, the KV pool, adapter slots -- on transparent huge pages (`THP_MEM_ALLOC_ENABLE`,
read by torch once, at its first allocation; the kernel must allow THP on request: `madvise` or `always` in
/sys/kernel/mm/transparent_hugepage/enabled). Why: a decode step streams ~270 MB of weights plus the KV cache
through 4 KiB pages, and the TLB misses showed: same-sitting pairs on an avx512_bf16 CPU measured the bare engine
~13 % faster and the 200-adapter benchmark's many-adapter row ~15 % faster with it (docs/benchmarks.md). An
explicit setting wins (`THP_MEM_ALLOC_ENABLE=0` turns it off); a process that imported torch first keeps torch's
default.
"""

import os as _os

_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
