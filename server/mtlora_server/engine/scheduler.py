"""Continuous-batching scheduler: which tokens of which sequences run in the next step, and their KV blocks.

Contract:
- Sequences join (`add`) and leave (`finish`, `abort`) between steps; `schedule()` returns the step as plain data,
  a `SchedulerOutput`: its chunks, each naming what the step must produce for it (`Chunk.logit_positions`: prompt
  logprobs and the sampling position; `Chunk.hidden_positions`: block ends whose final hidden states the prefix
  cache keeps; `Chunk.tail_hidden`: a cached hidden state whose logits are wanted; `Chunk.cached_prompt_logprobs`:
  the prompt-logprob entries a prefix-cache hit supplied at admission). After the forward, `on_computed(chunk,
  ...)` advances the sequence and indexes its newly full blocks in the prefix cache.
- Order inside a step: running decodes first (one token each, oldest first) so a long prompt can never starve
  them; then running sequences still in a (chunked) prefill; then waiting sequences, first come first served,
  while the `max_num_batched_tokens` budget and `max_num_seqs` allow. A long prompt is split into chunks that fit
  the remaining budget.
- Admission control: a waiting sequence is admitted only when the pool has free blocks for all its current
  tokens (less the blocks a prefix-cache hit lends it); otherwise it (and everything behind it) waits.
- Prefix caching (given a `PrefixCache`): an admitted sequence starts with the cached blocks of its longest known
  prefix and computes only the rest. A waiting sequence whose next block is being computed by a running sequence
  right now is passed over for this step (the ones behind it may go first) and admitted once it is indexed. When a running sequence needs a block and none is free,
  the most recently admitted other running sequence is preempted by recompute: its blocks are freed at once and it
  goes back to the head of the waiting queue with its generated tokens kept (re-prefilled later).
- Adapter residency (given an `admissible` hook, see adapter_registry): a waiting sequence whose adapter is not
  resident (or is draining) is passed over for this step, like a deferred prefix-cache hit; the hook sets the
  sequence's slot and prefix-cache salt when it admits it. So every chunk of a step has its adapter in a slot.
- `add` raises `EngineOverloadedError` when the waiting queue would exceed `max_waiting` sequences.
- Blocks are only ever held by sequences in `running`; `finish`/`abort` return them immediately.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mtlora.errors import EngineOverloadedError

from .kv_cache import KVCachePool

if TYPE_CHECKING:
    import torch

    from .request_state import RequestState
    from .sampling import SamplerState

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Sequence:
    """One of a request's n output sequences (identity semantics: eq/hash by object).

    Who writes what (after construction by the core): `token_ids` grows in RequestState.on_token; `num_computed`,
    `blocks`, `finished` and `want_prompt_logits` (cleared on preemption) belong to this scheduler (the prefix
    cache's `acquire` sets `blocks` / `num_computed` of a hit when the scheduler admits it); `block_digests`,
    `num_registered`, `pending_digests` to prefix_cache; `adapter_slot`, `cache_salt` to adapter_registry (at
    admission); `sampler_state` to sampling.processing_inputs. The rest is fixed.
    """

    seq_id: int
    token_ids: list[int]                  # prompt + generated so far
    prompt_len: int
    adapter_slot: int = -1                # -1: bare base model
    owner: RequestState | None = None     # the request this sequence belongs to (None only in unit tests)
    index: int = 0                        # which of the request's n sequences
    num_computed: int = 0                 # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)
    want_prompt_logits: bool = False      # compute logits at prompt positions (prompt_logprobs), first pass only
    finished: bool = False
    cache_salt: int = 0                   # prefix-cache namespace: K/V depend on the adapter (0: bare base)
    block_digests: list[bytes] = field(default_factory=list)   # prefix-cache digests of full blocks (memo)
    num_registered: int = 0               # leading blocks already indexed by the prefix cache
    pending_digests: list[bytes] = field(default_factory=list)  # blocks announced as being computed by this seq
    sampler_state: SamplerState | None = None  # logit_bias / penalty counts (sampling.processing_inputs)
    adapter_name: str | None = None       # registered adapter (None: bare base); its slot is set at admission

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def in_decode(self) -> bool:
        return self.num_computed == len(self.token_ids) - 1


@dataclass
class Chunk:
    """Tokens [start, start + length) of `seq` are computed this step, and what the step must produce for them
    (filled in by `Scheduler.schedule`; a bare Chunk(seq, start, length) wants nothing)."""

    seq: Sequence
    start: int
    length: int
    logit_positions: list[int] = field(default_factory=list)   # prompt-logprob positions, then the sampling one
    hidden_positions: list[int] = field(default_factory=list)  # block ends whose final hidden states are kept
    tail_hidden: torch.Tensor | None = None   # [d] cached final hidden state of position start - 1 (its logits
    #                                           give the prompt logprob of token `start` after a cache hit)
    cached_prompt_logprobs: list | None = None  # prompt-logprob entries a prefix-cache hit supplied at admission

    @property
    def samples(self) -> bool:
        """Does this chunk reach the sequence's last token (so a new token is sampled after it)?"""
        return self.start + self.length == self.seq.num_tokens

    @property
    def num_prompt_logits(self) -> int:
        """How many of `logit_positions` are prompt-logprob positions (the rest: the sampling position)."""
        return len(self.logit_positions) - (1 if self.samples else 0)


@dataclass
class SchedulerOutput:
    """One step as plain data: the chunks to compute, in the order their outputs come back."""

    chunks: list[Chunk]


class Scheduler:
    def __init__(self, pool: KVCachePool, max_num_seqs: int, max_num_batched_tokens: int, max_waiting: int,
                 cache=None, admissible=None):
        self.pool = pool
        self.cache = cache                        # PrefixCache or None (prefix caching off)
        self.admissible = admissible              # seq -> bool: may it be admitted now (its adapter resident)?
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []        # in admission order (the last is preempted first)
        self.num_preemptions = 0

    # -- membership ----------------------------------------------------------------------------------------------
    def add(self, seqs: list[Sequence]) -> None:
        if len(self.waiting) + len(seqs) > self.max_waiting:
            raise EngineOverloadedError(f"waiting queue is full ({len(self.waiting)} of {self.max_waiting})")
        self.waiting.extend(seqs)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) and free its blocks at once. Idempotent."""
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    abort = finish

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling ----------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        chunks: list[Chunk] = []
        budget = [self.max_num_batched_tokens]
        for seq in [s for s in self.running if s.in_decode]:
            if budget[0] < 1:
                break
            if seq in self.running and self._reserve(seq, seq.num_computed + 1, chunks, budget):
                chunks.append(Chunk(seq, seq.num_computed, 1))
                budget[0] -= 1
        for seq in [s for s in self.running if not s.in_decode]:
            n = min(seq.num_tokens - seq.num_computed, budget[0])
            if n > 0 and seq in self.running and self._reserve(seq, seq.num_computed + n, chunks, budget):
                chunks.append(Chunk(seq, seq.num_computed, n))
                budget[0] -= n
        self._admit(chunks, budget)
        for c in chunks:
            self._plan(c)
        return SchedulerOutput(chunks)

    def _plan(self, c: Chunk) -> None:
        """Name the positions of `c` whose logits / final hidden states the step must produce."""
        seq = c.seq
        if seq.want_prompt_logits:
            known = seq.owner.num_prompt_logprobs(c.cached_prompt_logprobs)
            if known is not None:         # entry p + 1 comes from the logits at position p
                c.logit_positions = list(range(max(c.start, known - 1), min(c.start + c.length, seq.prompt_len - 1)))
            if self.cache is not None:    # block ends: a later echo request can reuse the whole block (prefix_cache)
                bs = self.pool.block_size
                c.hidden_positions = list(range(c.start + (-(c.start + 1)) % bs, c.start + c.length, bs))
        if c.samples:
            c.logit_positions.append(c.start + c.length - 1)

    def on_computed(self, c: Chunk, prompt_logprobs: list | None, k: int | None, hidden: dict) -> None:
        """After the forward: c's tokens have K/V; index the blocks that became full (with their prompt-logprob
        entries when `prompt_logprobs` is given, and the final hidden states `hidden` {position: [d]})."""
        c.seq.num_computed = c.start + c.length
        if self.cache is not None:
            self.cache.register(c.seq, prompt_logprobs, k, hidden)

    def _admit(self, chunks: list[Chunk], budget: list[int]) -> None:
        i = 0
        while i < len(self.waiting) and budget[0] > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            if self.admissible is not None and not self.admissible(seq):
                i += 1                                  # its adapter is not resident yet: the ones behind may go
                continue
            hit = self.cache.match(seq) if self.cache is not None else None
            if hit is not None and hit.defer:
                i += 1                                  # its prefix is being computed: next step it is a hit
                continue
            lent = hit.num_blocks if hit is not None else 0
            free = self.cache.free_after_acquire(hit) if hit is not None else self.pool.num_free
            if free < self.pool.blocks_for(seq.num_tokens) - lent:
                break                                   # head of line waits for memory (FCFS)
            del self.waiting[i]
            if hit is not None:
                self.cache.acquire(seq, hit)
            else:
                seq.blocks, seq.num_computed = [], 0
            n = min(seq.num_tokens - seq.num_computed, budget[0])
            seq.blocks.extend(self.pool.allocate(self.pool.blocks_for(seq.num_computed + n) - len(seq.blocks)))
            if self.cache is not None:
                self.cache.mark_pending(seq)
            self.running.append(seq)
            chunk = Chunk(seq, seq.num_computed, n)
            if hit is not None:           # what the hit supplies travels with this (first) chunk only
                chunk.cached_prompt_logprobs, chunk.tail_hidden = hit.logprobs, hit.tail_hidden
            chunks.append(chunk)
            budget[0] -= n

    def _reserve(self, seq: Sequence, total_tokens: int, chunks: list[Chunk], budget: list[int]) -> bool:
        """Make `seq` hold blocks for `total_tokens`, preempting newer sequences if needed."""
        need = self.pool.blocks_for(total_tokens) - len(seq.blocks)
        while need > self.pool.num_free:
            victim = self.running[-1]                   # newest first; may be `seq` itself
            self._preempt(victim, chunks, budget)
            if victim is seq:
                return False
        if need > 0:
            seq.blocks.extend(self.pool.allocate(need))
        return True

    def _preempt(self, seq: Sequence, chunks: list[Chunk], budget: list[int]) -> None:
        for c in [c for c in chunks if c.seq is seq]:
            chunks.remove(c)
            budget[0] += c.length
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        # A sequence preempted in the middle of its chunked prefill has not produced all its prompt logprobs yet:
        # it keeps asking for them (the re-prefill resumes after the entries it has, see _plan).
        seq.want_prompt_logits = seq.want_prompt_logits and not seq.owner.prompt_logprobs_done()
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        log.debug("preempted sequence %d (recompute %d tokens)", seq.seq_id, seq.num_tokens)

    def _release(self, seq: Sequence) -> None:
        if self.cache is not None:
            self.cache.release(seq)
        if seq.blocks:
            self.pool.free(seq.blocks)
            seq.blocks = []
