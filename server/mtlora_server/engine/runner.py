"""Model runner: turns a scheduled step (chunks of sequences) into one flattened forward pass.

Contract:
- `ModelRunner.execute(scheduler_output, stats) -> RunnerOutput` builds the batch, runs the forward under
  `torch.inference_mode` and returns its results as a value: all wanted logits rows [L + E, V] fp32 and, per chunk
  (same order as `scheduler_output.chunks`), a `ChunkOutput` naming its rows: the logits of its prompt-logprob
  positions, the row of its sampling position, the logits of its cached tail (`Chunk.tail_hidden`), and the final
  hidden states at its `hidden_positions`. This is the one place that knows the row layout.
- `build_batch(chunks, block_size, device) -> StepBatch` flattens the chunks into T tokens and
  builds, with tensor ops, one attention layout for the step's decodes (one query per sequence) and one per class
  of prefill chunks of similar length (query scatter index [B, Qmax], causal + length mask), each with flat KV
  slots [B, Kmax] from the block tables, plus the flat indices of the rows whose logits are wanted, and (given `slot_sites`) the set of
  adapter sites some token of the step uses, so the model skips ops that would only return zeros, and (when any
  token has an adapter) the step's `SlotPlan` (token -> slot segmentation) that every adapter site reuses.
- Row layout: the logits of every chunk's `logit_positions` (absolute positions: prompt logprobs, then the last
  position when the chunk samples), chunk after chunk, then one row per chunk with a `tail_hidden`, in chunk order.
  Hidden states: every chunk's `hidden_positions` (prefix-cache block ends), chunk after chunk.
- `ModelRunner.run(chunks, logit_positions)` (tests, tools): the raw logits [L, V] at the given positions.
- Decode-only steps (no routing statistics, hidden states or tail rows wanted) go to `decode_graphs` when one is
  given and it serves the step (decode_graphs.py: static buffers, compiled / CUDA graphs); everything else,
  prefill included, runs the eager forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .lora_ops import SlotPlan
from .model import AttnGroup, ForwardOutput, Scatter, StepBatch
from .scheduler import Chunk, SchedulerOutput


@dataclass
class ChunkOutput:
    """What the step produced for one chunk; logits rows are views of / indices into `RunnerOutput.logits`."""

    prompt_logits: torch.Tensor | None    # [n, V] at chunk.logit_positions[:n] (n = chunk.num_prompt_logits > 0)
    sample_row: int | None                # row of RunnerOutput.logits at the sampling position (None: no sample)
    tail_logits: torch.Tensor | None      # [1, V] logits of chunk.tail_hidden (position start - 1)
    hidden: dict[int, torch.Tensor]       # position -> [d] final hidden state (pre-norm), chunk.hidden_positions


@dataclass
class RunnerOutput:
    """One executed step as a value."""

    logits: torch.Tensor                  # [L + E, V] fp32, every wanted row (see the module's row layout)
    chunks: list[ChunkOutput]             # one per scheduled chunk, in the same order


def build_batch(chunks: list[Chunk], block_size: int, device: torch.device,
                slot_sites: dict[int, set[str]] | None = None) -> StepBatch:
    """The step's StepBatch; logits at each chunk's `logit_positions`, then of the chunks' `tail_hidden`; hidden
    states kept at their `hidden_positions`."""
    # Lay the sequences out grouped by adapter slot (stable), so each slot's tokens are one contiguous range and
    # the adapter ops read / write plain slices instead of gathering and scattering rows. Logit rows still come
    # back in the callers' chunk order (flat_rows below follows the original order).
    chunks_in = chunks
    order = sorted(range(len(chunks)), key=lambda i: chunks[i].seq.adapter_slot)
    where = {i: k for k, i in enumerate(order)}                                              # original -> laid out
    chunks = [chunks[i] for i in order]
    B = len(chunks)
    q_len = torch.tensor([c.length for c in chunks], dtype=torch.long)                       # [B]
    start = torch.tensor([c.start for c in chunks], dtype=torch.long)                        # [B]
    q_off = torch.cumsum(q_len, 0) - q_len                                                   # [B]
    T = int(q_len.sum())
    ids: list[int] = []
    for c in chunks:
        ids.extend(c.seq.token_ids[c.start:c.start + c.length])
    seq_of_tok = torch.repeat_interleave(torch.arange(B), q_len)                             # [T]
    positions = start[seq_of_tok] + torch.arange(T) - q_off[seq_of_tok]                     # [T]
    tables = _block_tables(chunks, block_size)                                               # [B, nblk]
    slot_mapping = tables[seq_of_tok, positions // block_size] * block_size + positions % block_size
    # Decodes attend apart from prefill chunks, and prefill chunks attend in classes of similar query length
    # (1, 2, 3-4, 5-8, ...): padding every query up to the step's longest chunk would multiply the attention work
    # of the short ones (decodes; echo requests continuing a cached prefix) by that length.
    q_class = [(n - 1).bit_length() for n in q_len.tolist()]
    groups = [_attn_group(torch.tensor([b for b in range(B) if q_class[b] == k]), q_len, start, q_off, tables,
                          block_size, T, k == 0, B, device) for k in sorted(set(q_class))]
    def flat(per_chunk: list[list[int]]) -> torch.Tensor:   # absolute positions per (original) chunk -> rows
        rows = []
        for i, wanted in enumerate(per_chunk):
            b = where[i]
            rows.extend(int(q_off[b]) + p - chunks[b].start for p in wanted)
        return torch.tensor(rows, dtype=torch.long).to(device)

    hidden_positions = [c.hidden_positions for c in chunks_in]
    tails = [c.tail_hidden for c in chunks_in if c.tail_hidden is not None]
    slot_list = [c.seq.adapter_slot for c in chunks]
    slots = torch.tensor(slot_list, dtype=torch.long)
    sites = None
    if slot_sites is not None:
        sites = frozenset(site for slot in set(slot_list) if slot >= 0 for site in slot_sites.get(slot, ()))
    adapter_slots = slots[seq_of_tok].to(device)
    any_adapter = bool((slots >= 0).any())
    return StepBatch(
        input_ids=torch.tensor(ids, dtype=torch.long).to(device),
        positions=positions.to(device),
        slot_mapping=slot_mapping.to(device),
        adapter_slots=adapter_slots,
        attn=groups,
        logits_index=flat([c.logit_positions for c in chunks_in]),
        hidden_index=flat(hidden_positions) if any(hidden_positions) else None,
        extra_hidden=torch.stack(tails) if tails else None,
        any_adapter=any_adapter,
        sites=sites,
        adapter_plan=SlotPlan(adapter_slots, slot_list) if any_adapter else None,
    )


def _block_tables(chunks: list[Chunk], block_size: int) -> torch.Tensor:
    """[B, nblk] block ids of each sequence's first blocks (up to the step's longest), padded with block 0."""
    used = [-(-(c.start + c.length) // block_size) for c in chunks]
    tables = torch.zeros(len(chunks), max(used), dtype=torch.long)
    for b, (c, n) in enumerate(zip(chunks, used)):
        tables[b, :n] = torch.tensor(c.seq.blocks[:n], dtype=torch.long)
    return tables


def _attn_group(sel, q_len, start, q_off, tables, block_size: int, T: int, decode: bool, B: int,
                device) -> AttnGroup:
    """The padded attention layout of the sequences `sel` [G] (indices into the step's laid-out sequences)."""
    q_len, start, q_off = q_len[sel], start[sel], q_off[sel]                                 # [G]
    kv_len = start + q_len
    kmax = int(kv_len.max())
    kj = torch.arange(kmax)
    kv_slots = tables[sel][:, kj // block_size] * block_size + kj % block_size             # [G, Kmax]
    if decode:                                                                               # one query each
        mask = (kj[None, :] < kv_len[:, None])[:, None, None, :]                             # [G, 1, 1, Kmax]
        identity = sel.numel() == B                                                          # a decode-only step
        return AttnGroup(True, None if identity else q_off.to(device), None, kv_slots.to(device), mask.to(device))
    qmax = int(q_len.max())
    qi = torch.arange(qmax)
    valid = qi[None, :] < q_len[:, None]                                                     # [G, Qmax]
    q_gather = torch.where(valid, q_off[:, None] + qi[None, :], torch.full_like(valid, T, dtype=torch.long))
    qpos = start[:, None] + qi[None, :]                                                      # [G, Qmax]
    # Real queries see keys up to their own position; padded query rows see key 0 only (never an all-False row).
    mask = (kj[None, None, :] <= qpos[:, :, None]) & valid[:, :, None]
    mask |= (~valid[:, :, None]) & (kj[None, None, :] == 0)
    rows = q_gather[valid]                                                                   # [n] flat tokens
    padded_at = valid.reshape(-1).nonzero().squeeze(1)                                       # [n] in [G * Qmax]
    return AttnGroup(False, q_gather.to(device), Scatter(rows.to(device), padded_at.to(device)),
                     kv_slots.to(device), mask[:, None].to(device))


class ModelRunner:
    """Owns the model, the KV pool and the adapter slots; runs one step."""

    def __init__(self, model, pool, adapters, device: torch.device, slot_sites: dict[int, set[str]] | None = None,
                 decode_graphs=None):
        self.model, self.pool, self.adapters, self.device = model, pool, adapters, device
        self.slot_sites = slot_sites          # slot -> sites its adapter adapts (kept current by the core)
        self.decode_graphs = decode_graphs    # decode_graphs.DecodeGraphs, or None (enforce_eager)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput, stats=None) -> RunnerOutput:
        """Build the step's batch, run the forward, and name every chunk's rows (see the module contract).
        `stats`: RoutingStats to sample the routers into, or None."""
        chunks = scheduler_output.chunks
        out = self._decode_graphs(chunks) if stats is None else None
        if out is None:
            batch = build_batch(chunks, self.pool.block_size, self.device, self.slot_sites)
            out = self.model.forward(batch, self.pool, self.adapters, stats)
            if stats is not None:
                stats.flush()                 # the step's routing records in one batched computation
        return RunnerOutput(out.logits, _chunk_outputs(chunks, out))

    def _decode_graphs(self, chunks: list[Chunk]) -> ForwardOutput | None:
        """A decode-only step without hidden states or tail rows, run from static buffers (compiled / CUDA
        graphs) when `decode_graphs` is on and the step fits a bucket; None: run the eager forward."""
        if self.decode_graphs is None or any(c.hidden_positions or c.tail_hidden is not None for c in chunks):
            return None
        logits = self.decode_graphs.run(chunks, [c.logit_positions for c in chunks])
        return None if logits is None else ForwardOutput(logits, None)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], logit_positions: list[list[int]], stats=None) -> torch.Tensor:
        """Logits [L, V] fp32 at `logit_positions[i]` of chunk i, chunk after chunk (nothing else is kept)."""
        chunks = [dataclasses.replace(c, logit_positions=list(p), hidden_positions=[], tail_hidden=None)
                  for c, p in zip(chunks, logit_positions)]
        batch = build_batch(chunks, self.pool.block_size, self.device, self.slot_sites)
        return self.model.forward(batch, self.pool, self.adapters, stats).logits


def _chunk_outputs(chunks: list[Chunk], out: ForwardOutput) -> list[ChunkOutput]:
    """Split the forward's rows per chunk, in the layout build_batch asked for (module contract)."""
    row, hrow = 0, 0
    tail = sum(len(c.logit_positions) for c in chunks)          # tail rows follow every chunk's positions
    result = []
    for c in chunks:
        n_prompt, n_rows = c.num_prompt_logits, len(c.logit_positions)
        tail_logits = None
        if c.tail_hidden is not None:
            tail_logits, tail = out.logits[tail:tail + 1], tail + 1
        n_hidden = len(c.hidden_positions)
        hidden = dict(zip(c.hidden_positions, out.hidden[hrow:hrow + n_hidden])) if n_hidden else {}
        result.append(ChunkOutput(prompt_logits=out.logits[row:row + n_prompt] if n_prompt else None,
                                  sample_row=row + n_rows - 1 if c.samples else None,
                                  tail_logits=tail_logits, hidden=hidden))
        row, hrow = row + n_rows, hrow + n_hidden
    return result
