"""Sampling and logprobs: pure functions on fp32 logits, vectorised over the batch.

Contract:
- `sample(logits [B, V], params, generators) -> LongTensor [B]` (on logits' device). A temperature below
  `MIN_TEMPERATURE` (1e-5 as in vLLM, 0 included: `SamplingParams.greedy`) takes the argmax: logits / 1e-40
  overflow to inf and the softmax to NaN. Otherwise logits / temperature, then top_k (0 or -1: off; ties with the
  k-th value are kept), then top_p (the smallest prefix of the sorted distribution whose mass reaches top_p; the
  best token always survives), then one categorical draw. A row with its own `torch.Generator` draws only from it,
  and everything before the draw is row-wise, so a seeded request gets the same tokens whatever else is in the
  batch. Rows without a generator share one draw from torch's default generator.
- `apply_min_tokens(logits, banned_ids_per_row)` returns a copy with the banned ids (EOS / stop tokens of requests
  still below min_tokens) set to -inf; rows with None or [] are untouched.
- `logprobs_of(logits, chosen, k)`: log_softmax in fp32; per row the chosen token's logprob plus the top-k
  alternatives, best first (k = 0 or None: no alternatives). These are the model's logprobs (the logits given),
  not the temperature-scaled ones.
- `prompt_logprobs(logits [T, V], prompt_ids [T], k)`: logits[i] is the model output at prompt position i (it
  predicts token i + 1); entry 0 is None, entry i is the logprob of prompt_ids[i] under logits[i - 1].
"""

from __future__ import annotations

from typing import Sequence

import torch

from .types import SamplingParams, TokenLogprob


def _filtered_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k and top-p applied row-wise; removed tokens are -inf. logits: [B, V] fp32."""
    B, V = logits.shape
    dev = logits.device
    temp = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev)             # [B]
    top_k = torch.tensor([p.top_k if p.top_k and p.top_k > 0 else V for p in params], device=dev)    # [B]
    top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32)                  # [B]
    scaled = logits / temp[:, None]                                                  # [B, V]
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
    probs = torch.softmax(_filtered_logits(logits[rows], [params[i] for i in random_rows]), dim=-1)   # [b, V]
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
    rows = [i for i, ids in enumerate(banned_ids_per_row) if ids for _ in ids]
    cols = [t for ids in banned_ids_per_row if ids for t in ids]
    out = logits.clone()
    if rows:
        out[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")
    return out


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
