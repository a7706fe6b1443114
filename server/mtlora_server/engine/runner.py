"""Model runner: turns a scheduled step (chunks of sequences) into one flattened forward pass.

Contract:
- `build_batch(chunks, logit_positions, block_size, device) -> StepBatch` flattens the chunks into T tokens and
  builds, with tensor ops, one attention layout for the step's decodes (one query per sequence) and one per class
  of prefill chunks of similar length (query scatter index [B, Qmax], causal + length mask), each with flat KV
  slots [B, Kmax] from the block tables, plus the flat indices of the rows whose logits are wanted, and (given `slot_sites`) the set of
  adapter sites some token of the step uses, so the model skips ops that would only return zeros, and (when any
  token has an adapter) the step's `SlotPlan` (token -> slot segmentation) that every adapter site reuses.
- `logit_positions[i]` lists the absolute positions of chunk i whose logits are wanted (prompt logprobs and/or the
  last position when the chunk samples); rows come back in that order, chunk after chunk.
- `ModelRunner.run(chunks, logit_positions, stats)` executes the forward under `torch.inference_mode` and returns
  logits [L, V] fp32 on the CPU-visible device of the model; `run_step(..., hidden_positions, extra_hidden)` also
  returns the final hidden states at `hidden_positions` and appends the logits of `extra_hidden` rows (the
  prefix cache keeps block-end hidden states so an echo request can reuse a whole block). Decode-only steps
  (no routing statistics, hidden states or extra rows wanted) go to `decode_graphs` when one is given and it
  serves the step (decode_graphs.py); everything else, prefill included, runs the eager forward.
"""

from __future__ import annotations

import torch

from .lora_ops import SlotPlan
from .model import AttnGroup, StepBatch
from .scheduler import Chunk


def build_batch(chunks: list[Chunk], logit_positions: list[list[int]], block_size: int,
                device: torch.device, slot_sites: dict[int, set[str]] | None = None,
                hidden_positions: list[list[int]] | None = None) -> StepBatch:
    # Lay the sequences out grouped by adapter slot (stable), so each slot's tokens are one contiguous range and
    # the adapter ops read / write plain slices instead of gathering and scattering rows. Logit rows still come
    # back in the callers' chunk order (flat_rows below follows the original order).
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
        logits_index=flat(logit_positions),
        hidden_index=flat(hidden_positions) if hidden_positions and any(hidden_positions) else None,
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
    return AttnGroup(False, q_gather.to(device), (rows.to(device), padded_at.to(device)), kv_slots.to(device),
                     mask[:, None].to(device))


class ModelRunner:
    """Owns the model, the KV pool and the adapter slots; runs one step."""

    def __init__(self, model, pool, adapters, device: torch.device, slot_sites: dict[int, set[str]] | None = None,
                 decode_graphs=None):
        self.model, self.pool, self.adapters, self.device = model, pool, adapters, device
        self.slot_sites = slot_sites          # slot -> sites its adapter adapts (kept current by the core)
        self.decode_graphs = decode_graphs    # decode_graphs.DecodeGraphs, or None (enforce_eager)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], logit_positions: list[list[int]], stats=None) -> torch.Tensor:
        return self.run_step(chunks, logit_positions, stats)[0]

    @torch.inference_mode()
    def run_step(self, chunks: list[Chunk], logit_positions: list[list[int]], stats=None,
                 hidden_positions: list[list[int]] | None = None, extra_hidden: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [L + E, V], final hidden states [C, d] at `hidden_positions`): logits of the wanted positions,
        then of `extra_hidden` [E, d] (final hidden states kept from earlier steps)."""
        # Decode-only steps without extras run from static buffers (compiled / CUDA graphs) when they fit a bucket.
        if self.decode_graphs is not None and stats is None and extra_hidden is None and not any(hidden_positions
                                                                                                 or ()):
            logits = self.decode_graphs.run(chunks, logit_positions)
            if logits is not None:
                return logits, logits.new_zeros(0, self.model.cfg.hidden_size)
        batch = build_batch(chunks, logit_positions, self.pool.block_size, self.device, self.slot_sites,
                            hidden_positions)
        batch.extra_hidden = extra_hidden
        logits = self.model.forward(batch, self.pool, self.adapters, stats)
        hidden = batch.hidden_out if batch.hidden_out is not None else logits.new_zeros(0, self.model.cfg.hidden_size)
        return logits, hidden
