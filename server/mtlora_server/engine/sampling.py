"""Sampling and logprobs: pure functions on fp32 logits, vectorised over the batch.

Contract:
- Order (vLLM's v1 sampler): the model's logits -> bad words and min_tokens bans (-inf) -> logit_bias ->
  repetition, frequency and presence penalties (`process_logits`) -> greedy argmax, or temperature -> min_p ->
  top_k -> top_p -> one draw (`sample`). Penalties and bias therefore change greedy output too; min_p, top_k and
  top_p never do.
- Definitions (vLLM's and OpenAI's, exactly):
  * presence / frequency penalty in [-2, 2], on the tokens of the OUTPUT so far (OpenAI's formula):
    logits[t] -= frequency * count[t] + presence * (count[t] > 0).
  * repetition penalty in [1e-6, 1e6] (1 = off; vLLM asks only > 0, fp32 needs the bounds), as in vLLM and
    Hugging Face, on every token seen in the prompt OR the output: a logit > 0 is divided by it, any other logit
    multiplied by it. Applied before frequency / presence.
  * logit_bias: token id -> bias in [-100, 100], added to the logit.
  * bad words (token sequences, tokenised at the API edge): a word's last token is banned (-inf) when the word's
    other tokens equal the end of the output so far; a one-token word is always banned (vLLM's rule).
  * min_p in [0, 1]: after temperature, tokens whose probability is below min_p * (the row's best probability)
    are removed (the best token always stays).
- `sample(logits [B, V], params, generators) -> LongTensor [B]` (on logits' device). A temperature below
  `MIN_TEMPERATURE` (1e-5 as in vLLM, 0 included: `SamplingParams.greedy`) takes the argmax: logits / 1e-40
  overflow to inf and the softmax to NaN. Otherwise logits / temperature, then min_p, then top_k (0 or -1: off;
  ties with the k-th value are kept), then top_p (the smallest prefix of the sorted distribution whose mass
  reaches top_p; the best token always survives), then one categorical draw. A row with its own
  `torch.Generator` draws only from it, and everything before the draw is row-wise, so a seeded request gets the
  same tokens whatever else is in the batch. Rows without a generator share one draw from torch's default
  generator. `filter_logits(logits, params)` is that chain up to the draw (temperature, min_p, top_k, top_p;
  removed tokens -inf), for the rows given.
- `process_logits(logits, params, output_ids, states)` returns a copy with bad words, logit_bias and penalties
  applied to the rows that ask for them; `output_ids[i]` is row i's output so far (read for bad words) and
  `states[i]` its up-to-date `SamplerState` (rows with logit_bias or penalties, else None); `processing_inputs`
  builds both from the engine's sequences. Every step is a fixed number of tensor ops for the whole batch (Python
  loops run over rows, bias entries and bad words, never over the vocabulary); all of it is row-wise, so
  batch-invariant mode and the seeded contract hold.
- `SamplerState` is the only state, one per sequence that has logit_bias or penalties (`processing_inputs`
  builds it when the sequence first samples): its bias as (ids, values) tensors and, with penalties, the distinct
  tokens seen in its prompt or output with their output counts, on the logits' device. It is sparse (O(distinct
  tokens), never O(vocabulary)) and brought up to date incrementally (`update`: O(new tokens), idempotent, so the
  core's row-by-row sampling retry counts nothing twice). Penalties touch only those seen tokens (every other
  token is left as it is by all three penalties), gathered for the whole batch into one flat tensor.
- `apply_min_tokens(logits, banned_ids_per_row)` returns a copy with the banned ids (EOS / stop tokens of requests
  still below min_tokens) set to -inf; rows with None or [] are untouched.
- `logprobs_of(logits, chosen, k)`: log_softmax in fp32; per row the chosen token's logprob plus the top-k
  alternatives, best first (k = 0 or None: no alternatives). These are the model's logprobs (the logits given),
  not the processed or temperature-scaled ones (vLLM's default `raw_logprobs`).
- `prompt_logprobs(logits [T, V], prompt_ids [T], k)`: logits[i] is the model output at prompt position i (it
  predicts token i + 1); entry 0 is None, entry i is the logprob of prompt_ids[i] under logits[i - 1].
"""

from __future__ import annotations

from typing import Sequence

import torch

from .types import SamplingParams, TokenLogprob


def filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, min_p, top-k and top-p applied row-wise; removed tokens are -inf. logits: [B, V] fp32."""
    B, V = logits.shape
    dev = logits.device
    temp = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev)             # [B]
    top_k = torch.tensor([p.top_k if p.top_k and p.top_k > 0 else V for p in params], device=dev)    # [B]
    top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32)                  # [B]
    scaled = _min_p(logits / temp[:, None], params)                                 # [B, V]
    if bool((top_k >= V).all()) and bool((top_p >= 1.0).all()):
        return scaled
    sorted_vals, order = torch.sort(scaled, dim=-1, descending=True)                # [B, V]
    kth = sorted_vals.gather(1, (top_k.clamp(1, V) - 1)[:, None])                   # [B, 1] k-th best value
    keep_sorted = sorted_vals >= kth                                                 # top-k (ties kept)
    probs = torch.softmax(sorted_vals.masked_fill(~keep_sorted, float("-inf")), dim=-1)
    mass_before = probs.cumsum(-1) - probs                                           # [B, V] mass of better tokens
    keep_sorted &= mass_before < top_p[:, None]                                      # smallest prefix reaching top_p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)            # back to vocabulary order
    return scaled.masked_fill(~keep, float("-inf"))


def _min_p(scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Tokens with probability < min_p * max probability set to -inf (vLLM's MinPLogitsProcessor). [B, V]"""
    if not any(p.min_p > 0.0 for p in params):
        return scaled
    min_p = torch.tensor([p.min_p for p in params], device=scaled.device, dtype=torch.float32)      # [B]
    probs = torch.softmax(scaled, dim=-1)                                            # [B, V]
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]                   # [B, 1]
    return scaled.masked_fill(probs < threshold, float("-inf"))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Choose one token per row. logits: [B, V] -> token ids [B] (long, on logits' device)."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(f"sample: logits {tuple(logits.shape)} needs one params and one generator per row, got "
                         f"{len(params)} params and {len(generators)} generators")
    logits = logits.float()
    out = torch.argmax(logits, dim=-1)                                               # [B] greedy by default
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not random_rows:
        return out
    rows = torch.tensor(random_rows, device=logits.device)
    probs = torch.softmax(filter_logits(logits[rows], [params[i] for i in random_rows]), dim=-1)   # [b, V]
    shared = [j for j, i in enumerate(random_rows) if generators[i] is None]
    if shared:   # unseeded rows: one vectorised draw from the default generator
        idx = torch.tensor(shared, device=logits.device)
        out[rows[idx]] = torch.multinomial(probs[idx], 1).squeeze(1)
    for j, i in enumerate(random_rows):   # seeded rows: each draws from its own generator only
        gen = generators[i]
        if gen is not None:
            row = probs[j].to(gen.device)
            out[i] = torch.multinomial(row, 1, generator=gen).to(out.device)[0]
    return out


def apply_min_tokens(logits: torch.Tensor, banned_ids_per_row: Sequence[Sequence[int] | None]) -> torch.Tensor:
    """Copy of logits [B, V] with each row's banned token ids set to -inf."""
    if len(banned_ids_per_row) != logits.shape[0]:
        raise ValueError(f"apply_min_tokens: {len(banned_ids_per_row)} rows of banned ids for "
                         f"{logits.shape[0]} logits rows")
    out = logits.clone(memory_format=torch.contiguous_format)
    _set_banned(out, banned_ids_per_row)
    return out


class SamplerState:
    """One sequence's logits-processing state on the logits' device, built once when it first samples: its
    logit_bias as (ids, values) tensors and, when it has penalties, the distinct tokens it has seen (prompt or
    output) with their output counts: `seen_ids[:size]` / `seen_counts[:size]` (fp32, exact up to 2**24), slot
    of each token in `slot_of`. Sparse: O(distinct tokens) memory and work, never O(vocabulary)."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], device):
        self.bias_ids = self.bias_values = None
        if params.logit_bias:
            self.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=device)           # [n]
            self.bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=device)
        self.num_counted = 0
        self.size = 0
        self.slot_of: dict[int, int] = {}
        self.seen_ids = self.seen_counts = None
        if params.has_penalties:
            distinct = list(dict.fromkeys(int(t) for t in prompt_ids))
            self.seen_ids = torch.zeros(max(16, 2 * len(distinct)), dtype=torch.long, device=device)        # [cap]
            self.seen_counts = torch.zeros(self.seen_ids.numel(), dtype=torch.float32, device=device)       # [cap]
            self._append(distinct)

    def _append(self, tokens: list[int]) -> None:
        """New distinct tokens (count 0) at the end, growing the buffers by doubling."""
        need = self.size + len(tokens)
        if need > self.seen_ids.numel():
            cap = max(need, 2 * self.seen_ids.numel())
            self.seen_ids = torch.cat([self.seen_ids, self.seen_ids.new_zeros(cap - self.seen_ids.numel())])
            self.seen_counts = torch.cat([self.seen_counts,
                                          self.seen_counts.new_zeros(cap - self.seen_counts.numel())])
        if tokens:
            self.seen_ids[self.size:need] = torch.tensor(tokens, dtype=torch.long, device=self.seen_ids.device)
            self.slot_of.update((t, self.size + i) for i, t in enumerate(tokens))
            self.size = need

    def update(self, token_ids: Sequence[int], prompt_len: int) -> None:
        """Count the output tokens (token_ids[prompt_len:], which only ever grows) appended since the last call:
        O(new tokens). Idempotent, so a sampling retry counts nothing twice."""
        new = [int(t) for t in token_ids[prompt_len + self.num_counted:]]
        if self.seen_ids is None or not new:
            return
        self._append(list(dict.fromkeys(t for t in new if t not in self.slot_of)))
        slots = torch.tensor([self.slot_of[t] for t in new], dtype=torch.long, device=self.seen_ids.device)
        self.seen_counts.index_add_(0, slots, torch.ones(len(new), dtype=torch.float32, device=slots.device))
        self.num_counted += len(new)


def apply_penalties(logits: torch.Tensor, flat_idx: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, repetition: torch.Tensor) -> None:
    """In place, on the seen tokens only. logits: [B, V] contiguous; flat_idx: [n] distinct positions
    row * V + token of the seen (row, token) pairs, whose output counts are counts [n] (0: seen in the prompt
    only) and whose rows' penalties are presence, frequency, repetition [n]. Repetition first (> 0: divide, else
    multiply), then frequency and presence. Tokens never seen are untouched, as every penalty leaves them."""
    flat = logits.view(-1)
    vals = flat.index_select(0, flat_idx)                                            # [n]
    vals = torch.where(vals > 0, vals / repetition, vals * repetition)
    flat.index_copy_(0, flat_idx, vals - frequency * counts - presence * (counts > 0))


def bad_word_bans(bad_words_ids: Sequence[Sequence[int]], output_ids: Sequence[int]) -> list[int]:
    """Token ids banned next (vLLM's rule): each word's last token, when its other tokens end the output."""
    banned = []
    for word in bad_words_ids:
        prefix = len(word) - 1
        if prefix > len(output_ids):
            continue
        if prefix == 0 or list(output_ids[len(output_ids) - prefix:]) == list(word[:prefix]):
            banned.append(word[-1])
    return banned


def _set_banned(logits: torch.Tensor, banned_ids_per_row: Sequence[Sequence[int] | None]) -> None:
    """In place: each row's banned ids -> -inf (one indexing op for the batch). logits: [B, V] contiguous."""
    V = logits.shape[1]
    flat_idx = [i * V + t for i, ids in enumerate(banned_ids_per_row) if ids for t in ids]
    if flat_idx:
        logits.view(-1).index_fill_(0, torch.tensor(flat_idx, device=logits.device), float("-inf"))


def _row_offsets(rows: list[int], sizes: list[int], V: int, device) -> torch.Tensor:
    """[sum(sizes)]: row * V repeated sizes[j] times for rows[j] (no device sync: the output size is given)."""
    return torch.repeat_interleave(torch.tensor(rows, device=device) * V, torch.tensor(sizes, device=device),
                                   output_size=sum(sizes))


def _add_bias(logits: torch.Tensor, states: Sequence[SamplerState | None]) -> None:
    """In place: each row's logit_bias added (one index_add_ for the batch). logits: [B, V] contiguous."""
    biased = [(i, st) for i, st in enumerate(states) if st is not None and st.bias_ids is not None]
    if not biased:
        return
    offsets = _row_offsets([i for i, _ in biased], [st.bias_ids.numel() for _, st in biased], logits.shape[1],
                           logits.device)
    flat_idx = torch.cat([st.bias_ids for _, st in biased]) + offsets                 # [n]
    logits.view(-1).index_add_(0, flat_idx, torch.cat([st.bias_values for _, st in biased]))


def _penalise(logits: torch.Tensor, params: Sequence[SamplingParams], states: Sequence[SamplerState | None]) -> None:
    """In place: every penalised row's seen tokens, gathered into one flat batch (a fixed number of ops)."""
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return
    dev = logits.device
    sel = [states[i] for i in rows]
    sizes = [st.size for st in sel]
    per_row = torch.tensor([[params[i].presence_penalty, params[i].frequency_penalty, params[i].repetition_penalty]
                            for i in rows], dtype=torch.float32, device=dev)         # [b, 3]
    presence, frequency, repetition = torch.repeat_interleave(
        per_row, torch.tensor(sizes, device=dev), dim=0, output_size=sum(sizes)).unbind(1)          # [n] x 3
    flat_idx = torch.cat([st.seen_ids[:st.size] for st in sel]) + _row_offsets(rows, sizes, logits.shape[1], dev)
    counts = torch.cat([st.seen_counts[:st.size] for st in sel])                    # [n]
    apply_penalties(logits, flat_idx, counts, presence, frequency, repetition)


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams], output_ids: Sequence[Sequence[int]],
                   states: Sequence[SamplerState | None]) -> torch.Tensor:
    """Copy of logits [B, V] (fp32) with bad words, logit_bias and penalties applied, in that order (vLLM's).
    output_ids[i]: row i's output so far (read for bad words only); states[i]: row i's SamplerState, up to date
    (`update`), for rows with logit_bias or penalties (else None)."""
    if not logits.shape[0] == len(params) == len(output_ids) == len(states):
        raise ValueError(f"process_logits: logits {tuple(logits.shape)} need one params, output and state per "
                         f"row, got {len(params)}, {len(output_ids)} and {len(states)}")
    out = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)      # [B, V]
    _set_banned(out, [bad_word_bans(p.bad_words_ids, ids) if p.bad_words_ids else None
                      for p, ids in zip(params, output_ids)])
    _add_bias(out, states)
    _penalise(out, params, states)
    return out


def processing_inputs(seqs: Sequence, device: torch.device) -> tuple[list, list]:
    """(output ids, SamplerState or None) per engine sequence (scheduler.Sequence) for `process_logits`. A
    sequence's state is built when it first samples and brought up to date here (only new tokens are counted)."""
    outputs, states = [], []
    for seq in seqs:
        p = seq.owner.params
        outputs.append(seq.output_ids if p.bad_words_ids else ())
        if not (p.has_penalties or p.logit_bias):
            states.append(None)
            continue
        if seq.sampler_state is None:
            seq.sampler_state = SamplerState(p, seq.token_ids[:seq.prompt_len], device)
        seq.sampler_state.update(seq.token_ids, seq.prompt_len)
        states.append(seq.sampler_state)
    return outputs, states


def _token_logprobs(lp: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """lp: [B, V] log-probabilities; one TokenLogprob per row (top-k alternatives best first)."""
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None]).squeeze(1).tolist()   # [B]
    kmax = max(ks, default=0)
    top_vals, top_ids = (torch.topk(lp, kmax, dim=-1) if kmax > 0 else (None, None))  # [B, kmax]
    top_vals = top_vals.tolist() if kmax > 0 else None
    top_ids = top_ids.tolist() if kmax > 0 else None
    result = []
    for b, (tok, k) in enumerate(zip(tokens, ks)):
        top = list(zip(top_ids[b][:k], top_vals[b][:k])) if k > 0 else []
        result.append(TokenLogprob(token_id=tok, logprob=chosen[b], top=top))
    return result


def logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, k: Sequence[int | None]) -> list[TokenLogprob]:
    """logits: [B, V], chosen: [B] -> per row the chosen token's logprob and top-k[row] alternatives."""
    if len(k) != logits.shape[0] or chosen.numel() != logits.shape[0]:
        raise ValueError(f"logprobs_of: logits {tuple(logits.shape)}, chosen {tuple(chosen.shape)} and "
                         f"{len(k)} k values must agree on the batch size")
    lp = torch.log_softmax(logits.float(), dim=-1)                                   # [B, V]
    return _token_logprobs(lp, [int(t) for t in chosen.tolist()], [int(x or 0) for x in k])


def prompt_logprobs(logits: torch.Tensor, prompt_ids: torch.Tensor | Sequence[int],
                    k: int | None) -> list[TokenLogprob | None]:
    """logits: [T, V] outputs at prompt positions, prompt_ids: [T] -> [None, TokenLogprob x (T - 1)]."""
    ids = [int(t) for t in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    if logits.shape[0] != len(ids):
        raise ValueError(f"prompt_logprobs: {logits.shape[0]} logits rows for {len(ids)} prompt tokens")
    if len(ids) <= 1:
        return [None] * len(ids)
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)                              # [T-1, V] predicts ids[1:]
    return [None] + _token_logprobs(lp, ids[1:], [int(k or 0)] * (len(ids) - 1))
