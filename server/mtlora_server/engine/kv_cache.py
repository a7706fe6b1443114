"""The KV cache as one managed pool of fixed-size blocks (paged attention layout).

Why paged blocks (block_size 16 by default): requests of very different lengths share one preallocated pool with
at most block_size - 1 wasted slots per sequence, memory is claimed a block at a time as a sequence grows (so
admission can be exact: a request that does not fit waits), freeing a finished or cancelled sequence returns its
blocks at once, and no step ever allocates per request. A contiguous per-sequence reservation would have to assume
max_model_len for every request and fragment; per-request tensors would allocate without bound.

Contract:
- `KVCachePool(num_layers, num_kv_heads, head_dim, num_blocks, block_size, dtype, device)` allocates K and V
  `[layers, kv_heads, num_blocks * block_size, head_dim]` once: slot s = block * block_size + offset. Heads come
  first so a gather yields `[kv_heads, B, Kmax, hd]`, which batched matmuls consume without another copy. `KVCachePool.from_budget(...)` sizes it from a byte
  budget (`kv_cache_memory`) or, on CUDA, a fraction of free device memory. One extra slot after the blocks,
  `scratch_slot`, belongs to no block and is never allocated: padding rows of static-shape (compiled / graphed)
  decode steps write their K/V there and read only it (decode_graphs.py).
- `allocate(n) -> list[int]` returns n block ids (reference count 1) or raises `KVCacheFullError` (nothing
  changes); `free(blocks)` drops one reference each; `share(block)` adds one (a prefix-cache hit). A block whose
  count reaches 0 goes back to the free list, or, when its content is indexed by the prefix cache
  (`mark_cached`), to an LRU of evictable blocks: it still counts as free, keeps its K/V for later hits, and is
  reused (oldest first, after the plain free list; `on_evict(block)` is called) only when a fresh block is needed.
  `num_free` (plain + evictable) / `num_total` / `num_used` (referenced) count blocks. Freeing an unreferenced
  block raises.
- `write(layer, slot_mapping [T], k [T, kv, hd], v)` stores new keys/values at flat slots;
  `gather(layer, kv_slots [B, Kmax])` returns K, V `[kv, B, Kmax, hd]` (one index_select each).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch

from mtlora.errors import ConfigError, MtloraError

log = logging.getLogger(__name__)

DEFAULT_CPU_BUDGET = 1 << 30        # 1 GiB of KV on CPU when no budget is given
DEFAULT_GPU_FRACTION = 0.85         # of the memory free after loading weights


class KVCacheFullError(MtloraError):
    """Not enough free blocks (the scheduler treats this as 'wait' or 'preempt', never as a request error)."""


class KVCachePool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        if num_blocks < 1:
            raise ConfigError(f"the KV budget holds no block (num_blocks={num_blocks}); raise kv_cache_memory",
                              field="kv_cache_memory")
        if block_size < 1:
            raise ConfigError(f"block_size must be positive, got {block_size}", field="block_size")
        self.block_size, self.num_blocks = block_size, num_blocks
        self.scratch_slot = num_blocks * block_size       # outside every block: padding rows' K/V (see above)
        shape = (num_layers, num_kv_heads, num_blocks * block_size + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # LIFO free list: recently freed (cache-warm) blocks are reused first.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._ref = [0] * num_blocks                      # references held by running sequences
        self._cached = [False] * num_blocks               # content indexed by the prefix cache
        self._evictable: OrderedDict[int, None] = OrderedDict()   # ref 0 and cached, least recently freed first
        self.on_evict: Callable[[int], None] | None = None

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    @classmethod
    def from_budget(cls, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                    device: torch.device, budget_bytes: int | None, max_blocks: int | None = None,
                    gpu_fraction: float | None = None) -> "KVCachePool":
        """Size the pool from `budget_bytes`, else (CUDA) `gpu_fraction` (default DEFAULT_GPU_FRACTION) of free
        memory, else a CPU default."""
        per_block = cls.bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype)
        if budget_bytes is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget_bytes = int(free * (gpu_fraction or DEFAULT_GPU_FRACTION))
            else:
                budget_bytes = DEFAULT_CPU_BUDGET
        num_blocks = budget_bytes // per_block
        if max_blocks is not None:
            num_blocks = min(num_blocks, max_blocks)
        log.info("KV pool: %d blocks x %d tokens (%.1f MiB)", num_blocks, block_size,
                 num_blocks * per_block / 2**20)
        return cls(num_layers, num_kv_heads, head_dim, num_blocks, block_size, dtype, device)

    # -- accounting ----------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_total(self) -> int:
        return self.num_blocks

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_evictable(self) -> int:
        """Free blocks that still hold cached prefix K/V."""
        return len(self._evictable)

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise KVCacheFullError(f"need {n} KV blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:                                         # reuse the least recently freed cached block
                b, _ = self._evictable.popitem(last=False)
                self._cached[b] = False
                if self.on_evict is not None:
                    self.on_evict(b)
            self._ref[b] = 1
            blocks.append(b)
        return blocks

    def share(self, block: int) -> None:
        """One more reference to a cached block (it leaves the evictable LRU if nobody held it)."""
        if self._ref[block] == 0:
            if block not in self._evictable:
                raise RuntimeError(f"KV block {block} is neither referenced nor cached")
            del self._evictable[block]
        self._ref[block] += 1

    def mark_cached(self, block: int) -> None:
        """The prefix cache indexes this (referenced) block's content: keep it when its last reference goes."""
        self._cached[block] = True

    def free(self, blocks: list[int]) -> None:
        # Last block first, so a sequence's tail is evicted before the prefix other requests are likelier to share.
        for b in reversed(blocks):
            if self._ref[b] == 0:
                raise RuntimeError(f"KV block {b} freed twice")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._cached[b]:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    # -- data ----------------------------------------------------------------------------------------------------
    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, kv, hd] stored at flat slots [T]."""
        self.k[layer].index_copy_(1, slot_mapping, k.transpose(0, 1).to(self.k.dtype))
        self.v[layer].index_copy_(1, slot_mapping, v.transpose(0, 1).to(self.v.dtype))

    def gather(self, layer: int, kv_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V: [kv, B, Kmax, hd] for each sequence's flat slots kv_slots [B, Kmax]."""
        B, kmax = kv_slots.shape
        flat = kv_slots.reshape(-1)
        k = self.k[layer].index_select(1, flat).view(-1, B, kmax, self.k.shape[-1])
        v = self.v[layer].index_select(1, flat).view(-1, B, kmax, self.v.shape[-1])
        return k, v
