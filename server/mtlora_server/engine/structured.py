"""Structured outputs: grammar-constrained decoding with xgrammar (the grammar engine vLLM uses).

Contract:
- `GuidedDecoding(kind, value)` is the plain-data constraint a request carries in `SamplingParams.guided`:
  kind "json" (a JSON schema as a JSON string), "json_object" (any JSON object), "regex", "choice" (a JSON list of
  strings) or "grammar" (EBNF / GBNF, as vLLM's `guided_grammar`).
- `GrammarBackend(tokenizer, vocab_size, stop_token_ids)` owns one xgrammar compiler for the engine's tokenizer
  (its cache keyed by the constraint, bounded by GRAMMAR_CACHE_BYTES). `compile(guided)` returns a compiled grammar or raises InvalidRequestError
  naming the request field (`param`), so a bad schema or regex, or one that admits no first token, is a 400 before
  the request reaches the engine; the API calls it off the event loop. (When the request's own logit processing
  -- bad_words, logit_bias, ... -- bans every token its grammar allows, the core fails that request alone with a
  400 naming the conflict; any other dead end fails it alone with a 500.) Thread-safe (xgrammar's compiler is),
  holds no torch state.
- `GrammarState(compiled)`: one matcher per sequence. `mask_rows(logits [S, V], states)` sets the logits of tokens
  a row's grammar forbids to -inf, in place, for the rows with a state (one bitmask for the whole batch, filled row
  by row by xgrammar, applied in one call); rows without a state are untouched, so constrained and free requests
  share batches; each state's `fill_s` is the CPU time its row's mask took, and `check_cost()` raises a 400 past
  FILL_LIMIT_S. `refuse_dead_rows(logits, states, positions)` raises a 400 for a constrained row left with no
  allowed token by the request's own logit processing. `GrammarState.accept(token)` advances the matcher after the draw; `done` is true once the grammar
  is complete and nothing else may follow: the sequence then finishes with finish_reason "stop", even where
  min_tokens or ignore_eos would carry on past EOS.
- Row-wise throughout: a request's constraint never changes another row's logits (seeded sampling and the
  batch-invariant mode keep their guarantees).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass

import torch

from mtlora.errors import InvalidRequestError

log = logging.getLogger(__name__)

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# xgrammar caches every compiled grammar; unbounded by default, so a stream of distinct schemas grew the server's
# memory without limit (~0.3 MiB each with SmolLM2's vocabulary). Least recently used entries go past this.
GRAMMAR_CACHE_BYTES = 256 << 20
# One row's mask for one token runs in the engine's step, before every request's next token. An ambiguous grammar
# can take ever longer per token as its output grows (hundreds of ms after ~150 tokens); past this the core fails
# that request (400), so it stalls the other requests' steps once, not for the rest of its output.
FILL_LIMIT_S = 0.05
_XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")


@dataclass(frozen=True)
class GuidedDecoding:
    """One request's output constraint (plain data; `param` is the request field it came from, for errors)."""

    kind: str
    value: str = ""
    param: str = "guided"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"unknown structured-output kind {self.kind!r}; expected one of {KINDS}",
                                      param=self.param)


class GrammarBackend:
    """xgrammar compiler for one tokenizer (created lazily: servers that never see a constraint never pay for it)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self._compiler = None
        self._lock = threading.Lock()

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=GRAMMAR_CACHE_BYTES)
            return self._compiler

    def compile(self, guided: GuidedDecoding):
        """The compiled grammar of `guided`; InvalidRequestError (400, naming `guided.param`) if it is invalid or
        allows no first token at all (e.g. `root ::= root`: the request could never produce anything)."""
        compiled = self._compile(guided)
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask, 0)
        if not bool(bitmask.any()):
            raise InvalidRequestError(f"the {guided.kind} constraint admits no output (no token can start it)",
                                      param=guided.param)
        return compiled

    def _compile(self, guided: GuidedDecoding):
        compiler = self._get_compiler()
        try:
            if guided.kind == "json":
                return compiler.compile_json_schema(guided.value, any_whitespace=False, strict_mode=True)
            if guided.kind == "json_object":
                return compiler.compile_builtin_json_grammar()
            if guided.kind == "regex":
                return compiler.compile_regex(guided.value)
            if guided.kind == "choice":
                choices = json.loads(guided.value)
                return compiler.compile_regex("|".join(_regex_literal(c) for c in choices))
            return compiler.compile_grammar(guided.value)
        except InvalidRequestError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError / ValueError subclasses with a reason
            reason = _XGRAMMAR_PREFIX.sub("", str(exc)).strip()        # "[12:00:00] /project/cpp/x.cc:94: "
            raise InvalidRequestError(f"invalid {guided.kind} constraint: {reason[:500]}",
                                      param=guided.param) from None


def _regex_literal(text: str) -> str:
    """`text` as a regex that matches exactly it."""
    specials = set("\\.^$|?*+()[]{}")
    return "".join("\\" + ch if ch in specials else ch for ch in text)


class GrammarState:
    """The matcher of one sequence."""

    def __init__(self, compiled):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.fill_s = 0.0                   # CPU seconds the last mask of this row took (mask_rows)

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the grammar rejects it (it was masked, so only after a bug)."""
        return bool(self.matcher.accept_token(token))

    def check_cost(self) -> None:
        """InvalidRequestError (400) when this row's last mask took more than FILL_LIMIT_S of CPU."""
        if self.fill_s > FILL_LIMIT_S:
            raise InvalidRequestError(f"the output constraint is too costly to evaluate: its mask took "
                                      f"{self.fill_s * 1e3:.0f} ms for one token (limit {FILL_LIMIT_S * 1e3:.0f} ms); "
                                      "simplify the grammar")

    @property
    def done(self) -> bool:
        return bool(self.matcher.is_terminated())


def mask_rows(logits: torch.Tensor, states: list[GrammarState | None]) -> None:
    """In place: each constrained row's forbidden tokens -> -inf. logits: [S, V] float on the CPU."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(states), logits.shape[-1])           # [S, ceil(V / 32)] int32
    for i in rows:                          # CPU time of this thread: a descheduled step thread does not count
        t0 = time.thread_time()
        states[i].matcher.fill_next_token_bitmask(bitmask, i)
        states[i].fill_s = time.thread_time() - t0
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)


def refuse_dead_rows(logits: torch.Tensor, states: list[GrammarState | None], positions: list[int]) -> None:
    """InvalidRequestError (400) when a constrained row of `logits` [S, V] has no finite logit left: the request's own
    logit processing (bad_words, logit_bias, ...) banned every token its grammar allows. positions: output lengths."""
    for i in torch.isneginf(logits).all(-1).nonzero().flatten().tolist():
        if states[i] is not None:
            raise InvalidRequestError("the request's logit processing (bad_words, logit_bias, allowed_token_ids or "
                                      "penalties) forbids every token its output constraint allows at output position "
                                      f"{positions[i]}")
