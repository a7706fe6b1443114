"""mtlora-serve: the serving engine (scheduler, KV pool, runner, batched adapter ops) and the OpenAI-compatible API.

Importing the package (every `mtlora-serve` / `mtlora-bench` command does, before torch) asks torch to put its
large CPU allocations -- weights, the KV pool, adapter slots -- on transparent huge pages (`THP_MEM_ALLOC_ENABLE`,
read by torch once, at its first allocation; the kernel must allow THP on request: `madvise` or `always` in
/sys/kernel/mm/transparent_hugepage/enabled). Why: a decode step streams ~270 MB of weights plus the KV cache
through 4 KiB pages, and the TLB misses showed: same-sitting pairs on an avx512_bf16 CPU measured the bare engine
~13 % faster and the 200-adapter benchmark's many-adapter row ~15 % faster with it (docs/benchmarks.md). An
explicit setting wins (`THP_MEM_ALLOC_ENABLE=0` turns it off); a process that imported torch first keeps torch's
default. It also has glibc's malloc keep the memory of freed blocks under 32 MiB instead of returning it to the
kernel between engine steps (`host_memory.keep_freed_memory`: page faults of a batch-64 LoRA decode step 520 -> 2;
`MTLORA_MALLOC=default` or the process's own malloc tuning leaves malloc alone).
"""

from .host_memory import configure as _configure

_configure()
