"""The slow, obviously-correct oracle: transformers' own LLaMA + `inject.attach` + `load_adapter`, one sequence.

Contract (`ReferenceModel(model_dir_or_model, adapter=None, dtype=torch.float32)`):
- builds `LlamaForCausalLM` from a local directory (never downloads) or deep-copies a given model (the caller's
  model is left untouched), in `dtype` (a torch dtype or a name, "auto" included: `mtlora.base.parse_dtype`),
  eager attention, eval mode;
- `adapter` is a checkpoint directory (native, PEFT LoRA or official; loaded and validated against the base by
  `load_adapter`) or None for the bare base model;
- `logits(ids) -> [T, V]` float32; `prompt_logprobs(ids) -> [None, lp_1, ...]` (logprob of token t given < t);
- `greedy(ids, n, eos)` recomputes the whole sequence for every new token (no cache, the definition);
  `greedy_cached(...)` uses transformers' KV cache; both return only the new tokens, eos included when hit;
- `routing(ids) -> {native site prefix: w [T, g, N] float32}`, the router's softmax weights per token.
Every engine path (batched ops, kernels, KV pool) is tested against this class.
`random_adapter_tensors(...)` makes a random, non-trivial adapter (B != 0) for tests and examples.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Sequence

import torch

from mtlora import inject
from mtlora.base import parse_dtype
from mtlora.checkpoint import load_adapter
from mtlora.config import AdapterConfig
from mtlora.errors import InvalidRequestError

logger = logging.getLogger(__name__)


class ReferenceModel:
    """One-sequence, no-batching forward passes of a base model with at most one adapter."""

    def __init__(self, model_dir_or_model, adapter: str | Path | None = None,
                 dtype: torch.dtype | str = torch.float32):
        dtype = parse_dtype(dtype)   # names and "auto" as everywhere else (mtlora.base's one dtype policy)
        self.model = _build_model(model_dir_or_model, dtype)
        self.adapter_config: AdapterConfig | None = None
        self.adapters: dict = {}
        if adapter is not None:
            config, tensors = load_adapter(adapter, model_config=self.model.config, dtype=dtype)
            self.adapters = inject.attach(self.model, config)
            inject.load_adapter_state(self.model, tensors, source=str(adapter))
            self.adapter_config = config
            self.model.eval()   # the freshly attached adapters start in training mode (dropout on)
        self.vocab_size = self.model.config.vocab_size

    # -- forward -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Next-token logits at every position: [T, V] float32."""
        ids = self._ids(token_ids)                                                   # [1, T]
        return self.model(input_ids=ids, use_cache=False).logits[0].float()

    def prompt_logprobs(self, token_ids: Sequence[int]) -> list[float | None]:
        """log p(token_t | tokens_<t) for every position; the first token has no context, hence None."""
        logp = torch.log_softmax(self.logits(token_ids), dim=-1)                    # [T, V]
        return [None] + [logp[t - 1, token_ids[t]].item() for t in range(1, len(token_ids))]

    def greedy(self, token_ids: Sequence[int], max_new_tokens: int,
               eos_token_id: int | Sequence[int] | None = None) -> list[int]:
        """Argmax decoding, recomputing the full sequence at every step (no KV cache)."""
        seq, out, stop = list(token_ids), [], _stop_set(eos_token_id)
        for _ in range(max_new_tokens):
            nxt = int(self.logits(seq)[-1].argmax())
            out.append(nxt)
            seq.append(nxt)
            if nxt in stop:
                break
        return out

    @torch.no_grad()
    def greedy_cached(self, token_ids: Sequence[int], max_new_tokens: int,
                      eos_token_id: int | Sequence[int] | None = None) -> list[int]:
        """Argmax decoding with transformers' KV cache: prefill once, then one token per step."""
        from transformers import DynamicCache

        out, stop = [], _stop_set(eos_token_id)
        if max_new_tokens <= 0:
            self._ids(token_ids)
            return out
        cache = DynamicCache(config=self.model.config)
        step_ids = self._ids(token_ids)                                              # [1, T] then [1, 1]
        for _ in range(max_new_tokens):
            res = self.model(input_ids=step_ids, past_key_values=cache, use_cache=True)
            cache = res.past_key_values
            nxt = int(res.logits[0, -1].float().argmax())
            out.append(nxt)
            if nxt in stop:
                break
            step_ids = torch.tensor([[nxt]], device=step_ids.device)
        return out

    @torch.no_grad()
    def routing(self, token_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """Routing weights of every adapter site for this sequence: {prefix: [T, g, N]} (N == 1: all ones)."""
        ids = self._ids(token_ids)
        for a in self.adapters.values():
            a.record_routing = True
        try:
            self.model(input_ids=ids, use_cache=False)
            return {p: a.last_routing[0].float().clone() for p, a in self.adapters.items()}
        finally:
            for a in self.adapters.values():
                a.record_routing = False
                a.last_routing = None

    def _ids(self, token_ids: Sequence[int]) -> torch.Tensor:
        ids = list(token_ids)
        if not ids:
            raise InvalidRequestError("token_ids must not be empty", param="token_ids")
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                                      param="token_ids")
        device = next(self.model.parameters()).device
        return torch.tensor([ids], dtype=torch.long, device=device)


def _build_model(model_dir_or_model, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    if isinstance(model_dir_or_model, (str, Path)):
        model = LlamaForCausalLM.from_pretrained(str(model_dir_or_model), dtype=dtype, local_files_only=True,
                                                 attn_implementation="eager")
    else:
        # Deep copy: attaching an adapter wraps modules in place and must not touch the caller's model.
        model = copy.deepcopy(model_dir_or_model).to(dtype)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
    return model.eval()


def _stop_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}


def random_adapter_tensors(config: AdapterConfig, model_config, seed: int = 0, scale: float = 0.2,
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random native tensors for `config` on this base: every tensor non-zero, so the adapter changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=gen) * scale).to(dtype)
            for name, shape in sorted(inject.expected_shapes(model_config, config).items())}
