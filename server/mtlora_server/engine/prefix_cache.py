"""Automatic prefix caching: computed KV blocks are indexed by content, so a later sequence with the same prefix
reuses them instead of recomputing (few-shot prompts shared by every question of a benchmark task, the four
continuations of an MMLU question, n > 1, a preempted sequence coming back, a chat turn that repeats history).

Contract:
- A full block j of a sequence is named by a chained digest: d_j = blake2b(d_{j-1} || tokens of block j), with
  d_{-1} derived from the sequence's `cache_salt` (the id of the adapter's weights: K/V depend on the adapter, and a
  slot re-used by another adapter gets a new salt; an adapter re-read from disk gets a new one too, while one that
  comes back from the host cache keeps its salt and blocks, see adapter_registry). 128-bit digests make collisions a non-issue, unlike Python's
  `hash`. Only full blocks whose every token has K/V (`num_computed`) are indexed; they are immutable from then on.
- `match(seq)` returns the longest run of indexed leading blocks of `seq.token_ids[:-1]` (the last token is always
  computed, since its logits are needed). For a sequence that wants prompt logprobs, each used block must also
  carry stored prompt-logprob entries with at least the requested top-k, and the first missing entry needs the
  logits of the last cached position: the block's stored final hidden state (`Hit.tail_hidden`, [d]) gives them
  through the final norm and lm_head alone; a block without one is recomputed instead. `Hit.defer` is set when the next block is being computed right now by another
  running sequence: waiting one step then turns a miss into a hit.
- `acquire(hit)` takes a reference on every matched block (`KVCachePool.share`); `mark_pending(seq)` announces the
  full blocks a newly admitted sequence will compute; `register(seq, prompt_logprobs, k)` indexes the blocks that
  became fully computed and stores their prompt-logprob entries; `release(seq)` drops its pending announcements.
- The pool evicts unreferenced cached blocks least recently freed first, only when no plain free block is left;
  `on_evict` removes them from the index here. Counters: `queries` / `hits` (tokens looked up / found at
  admission), `evictions`.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .kv_cache import KVCachePool
from .types import TokenLogprob

if TYPE_CHECKING:
    from .scheduler import Sequence


@dataclass
class Hit:
    blocks: list[int] = field(default_factory=list)         # cached blocks to reuse, in order
    logprobs: list[TokenLogprob | None] | None = None       # prompt-logprob entries of the reused tokens
    tail_hidden: torch.Tensor | None = None                 # [d] final hidden state at the last reused position
    defer: bool = False                                     # the next block is being computed by someone else

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def _digest(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class PrefixCache:
    def __init__(self, pool: KVCachePool):
        self.pool, self.block_size = pool, pool.block_size
        self._index: dict[bytes, int] = {}                   # digest -> block holding that content
        self._digest_of: dict[int, bytes] = {}               # indexed block -> digest
        self._logprobs: dict[int, tuple[int, list]] = {}     # indexed block -> (top-k, entries of its tokens)
        self._hidden: dict[int, torch.Tensor] = {}           # indexed block -> [d] final hidden at its last token
        self._pending: dict[bytes, Sequence] = {}            # digest -> running sequence computing it
        self.queries = 0
        self.hits = 0
        self.evictions = 0
        pool.on_evict = self._evict

    # -- digests ---------------------------------------------------------------------------------------------------
    def digests(self, seq: Sequence, n_blocks: int) -> list[bytes]:
        """The digests of seq's first n_blocks full blocks (memoised on the sequence)."""
        hs, bs = seq.block_digests, self.block_size
        while len(hs) < n_blocks:
            j = len(hs)
            parent = hs[-1] if hs else seq.cache_salt.to_bytes(16, "little", signed=True)
            hs.append(_digest(parent, seq.token_ids[j * bs:(j + 1) * bs]))
        return hs[:n_blocks]

    # -- lookup ----------------------------------------------------------------------------------------------------
    def match(self, seq: Sequence) -> Hit:
        """Longest reusable cached prefix of `seq` (see the module contract)."""
        bs = self.block_size
        limit = (seq.num_tokens - 1) // bs                   # full blocks before the last token
        want_k = seq.owner.params.prompt_logprobs if seq.want_prompt_logits else None
        hit, entries = Hit(), []
        for d in self.digests(seq, limit):
            block = self._index.get(d)
            if block is None:
                hit.defer = d in self._pending
                break
            if want_k is not None:
                stored = self._logprobs.get(block)
                if stored is None or stored[0] < want_k:
                    break
                entries.extend(_truncate(stored[1], want_k))
            hit.blocks.append(block)
        if want_k is not None:
            hit.logprobs = entries
            hit.tail_hidden = self._hidden.get(hit.blocks[-1]) if hit.blocks else None
            if hit.tail_hidden is None:
                hit.blocks = hit.blocks[:-1]                 # recompute the last block's tokens (see contract)
        return hit

    def acquire(self, seq: Sequence, hit: Hit) -> None:
        """Give `seq` the hit's blocks (one reference each) and count the lookup."""
        for b in hit.blocks:
            self.pool.share(b)
        seq.blocks = list(hit.blocks)
        seq.num_computed = hit.num_blocks * self.block_size
        seq.num_registered = hit.num_blocks                  # those blocks are indexed already
        self.queries += seq.num_tokens
        self.hits += seq.num_computed

    def free_after_acquire(self, hit: Hit) -> int:
        """Free blocks left once the hit's blocks are referenced (evictable hit blocks stop counting as free)."""
        return self.pool.num_free - sum(1 for b in hit.blocks if self.pool.is_evictable(b))

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    def mark_pending(self, seq: Sequence) -> None:
        """Announce the full blocks of seq's current tokens that it will compute (lets identical prompts wait)."""
        for d in self.digests(seq, seq.num_tokens // self.block_size)[seq.num_registered:]:
            if d not in self._index and d not in self._pending:
                self._pending[d] = seq
                seq.pending_digests.append(d)

    def register(self, seq: Sequence, prompt_logprobs: list | None, k: int | None,
                 hidden: dict[int, torch.Tensor] | None = None) -> None:
        """Index seq's blocks that are now fully computed; store their prompt-logprob entries when known, and the
        final hidden states `hidden` {position: [d]} computed at block ends this step."""
        bs = self.block_size
        done = min(seq.num_computed // bs, len(seq.blocks))
        for j, d in enumerate(self.digests(seq, done)[seq.num_registered:], start=seq.num_registered):
            block = self._index.get(d)
            if block is None:
                block = self._index[d] = seq.blocks[j]
                self._digest_of[block] = d
                self.pool.mark_cached(block)
            if self._pending.get(d) is seq:
                del self._pending[d]
            end = (j + 1) * bs
            if k is not None and prompt_logprobs is not None and len(prompt_logprobs) >= end:
                stored = self._logprobs.get(block)
                if stored is None or stored[0] < k:
                    self._logprobs[block] = (k, prompt_logprobs[j * bs:end])
            if hidden and end - 1 in hidden and block not in self._hidden:
                self._hidden[block] = hidden[end - 1].clone()
        seq.num_registered = max(seq.num_registered, done)

    def release(self, seq: Sequence) -> None:
        """seq leaves the running set: forget the blocks it had announced but not computed."""
        for d in seq.pending_digests:
            if self._pending.get(d) is seq:
                del self._pending[d]
        seq.pending_digests.clear()
        seq.num_registered = 0

    def _evict(self, block: int) -> None:
        self.evictions += 1
        d = self._digest_of.pop(block, None)
        if d is not None and self._index.get(d) == block:
            del self._index[d]
        self._logprobs.pop(block, None)
        self._hidden.pop(block, None)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._index)


def _truncate(entries: list, k: int) -> list:
    """Entries stored with a larger top-k, cut to the k a request asks for."""
    return [e if e is None or len(e.top) <= k else TokenLogprob(e.token_id, e.logprob, e.top[:k]) for e in entries]
