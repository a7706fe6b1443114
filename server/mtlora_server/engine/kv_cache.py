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
  budget (`kv_cache_memory`) or, on CUDA, a fraction of free device memory.
- `allocate(n) -> list[int]` returns n block ids or raises `KVCacheFullError` (nothing changes);
  `free(blocks)` gives them back; `num_free` / `num_total` / `num_used` count them. Double free raises.
- `write(layer, slot_mapping [T], k [T, kv, hd], v)` stores new keys/values at flat slots;
  `gather(layer, kv_slots [B, Kmax])` returns K, V `[kv, B, Kmax, hd]` (one index_select each).
"""

from __future__ import annotations

import logging

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
        shape = (num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # LIFO free list: recently freed (cache-warm) blocks are reused first.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._is_free = [True] * num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    @classmethod
    def from_budget(cls, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                    device: torch.device, budget_bytes: int | None, max_blocks: int | None = None) -> "KVCachePool":
        """Size the pool from `budget_bytes`, else (CUDA) a fraction of free memory, else a CPU default."""
        per_block = cls.bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype)
        if budget_bytes is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget_bytes = int(free * DEFAULT_GPU_FRACTION)
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
        return len(self._free)

    @property
    def num_total(self) -> int:
        return self.num_blocks

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KVCacheFullError(f"need {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._is_free[b] = False
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._is_free[b]:
                raise RuntimeError(f"KV block {b} freed twice")
            self._is_free[b] = True
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
