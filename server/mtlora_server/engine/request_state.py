"""Per-request bookkeeping: the n sequences, stop conditions, incremental detokenisation, pending deltas.

Contract:
- `RequestState(request, seqs, tokenizer, eos_ids, max_model_len)` owns one request's `Sequence`s.
- `on_token(seq, token, logprob)` appends a sampled token, decides whether the sequence finished (EOS unless
  ignore_eos, stop token ids, stop strings, max_tokens, max_model_len; none of them before min_tokens except
  max_tokens/max_model_len) and detokenises incrementally: text is emitted only once it is stable (no trailing
  partial UTF-8 character) and cannot be the start of a stop string; a stop string is cut from the output unless
  include_stop_str_in_output. Stop / EOS token text is never emitted.
- `flush() -> RequestOutput | None` returns what is new since the last flush (None when nothing is, or while the
  prompt logprobs are still incomplete). The first output carries prompt_token_ids, prompt_logprobs and what
  `on_scheduled` recorded (cached prompt tokens, queue time).
- `on_scheduled(start, now, cached_prompt_logprobs)`: called by the core for each scheduled chunk; the first call
  records the queue time (arrival -> now) and `start` as the number of prompt tokens the prefix cache supplied;
  prompt-logprob entries a prefix-cache hit supplied become the request's own.
- `num_prompt_logprobs(cached)`: how many prompt-logprob entries the request has (counting those `cached` would
  add), None when it asks for none; the scheduler plans the step's prompt-logit positions from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .scheduler import Sequence
from .types import GenerationRequest, RequestOutput, SequenceDelta, TokenLogprob


@dataclass
class _SeqText:
    """Detokenisation and pending-delta state of one sequence."""

    text: str = ""                               # detokenised output committed so far (stop strings cut)
    prefix_offset: int = 0                       # output ids [prefix_offset, read_offset) give decode context
    read_offset: int = 0                         # output ids already turned into `text`
    stop_checked: int = 0                        # `text` searched for stop strings up to here
    emitted_chars: int = 0                       # characters of `text` already handed out
    pending_ids: list[int] = field(default_factory=list)
    pending_text: str = ""
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    reported_finish: bool = False
    text_ids_end: int | None = None              # output ids [0, end) make the text (excludes a stop/EOS token)


class RequestState:
    def __init__(self, request: GenerationRequest, seqs: list[Sequence], tokenizer, eos_ids: set[int],
                 max_model_len: int):
        self.request, self.params, self.seqs = request, request.sampling, seqs
        self.tokenizer, self.eos_ids, self.max_model_len = tokenizer, eos_ids, max_model_len
        self.text = {s.index: _SeqText() for s in seqs}
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] if self.params.prompt_logprobs is not None else None)
        self.sent_first = False
        self.generators: list = []                  # one torch.Generator per sequence (set by the core)
        self.grammars: list | None = None           # one structured.GrammarState per sequence, or None
        self.finished = False
        self.first_scheduled: float | None = None   # monotonic time of the first scheduling
        self.num_cached_tokens = 0                  # prompt tokens the prefix cache supplied at the first scheduling
        self._max_stop = max((len(s) for s in self.params.stop), default=0)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    def prompt_logprobs_done(self) -> bool:
        return self.prompt_logprobs is None or len(self.prompt_logprobs) >= self.prompt_len

    def all_finished(self) -> bool:
        return all(t.finish_reason is not None for t in self.text.values())

    def num_prompt_logprobs(self, cached: list | None = None) -> int | None:
        if self.prompt_logprobs is None:
            return None
        return max(len(self.prompt_logprobs), len(cached)) if cached else len(self.prompt_logprobs)

    def on_scheduled(self, start: int, now: float, cached_prompt_logprobs: list | None = None) -> None:
        if self.first_scheduled is None:
            self.first_scheduled = now
            self.num_cached_tokens = min(start, self.prompt_len)
        cached = cached_prompt_logprobs
        if cached and self.prompt_logprobs is not None and len(cached) > len(self.prompt_logprobs):
            self.prompt_logprobs = list(cached)

    # -- tokens --------------------------------------------------------------------------------------------------
    def on_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> bool:
        """Record a sampled token; returns True when the sequence has finished."""
        st, p = self.text[seq.index], self.params
        seq.token_ids.append(token)
        st.pending_ids.append(token)
        if logprob is not None:
            st.pending_logprobs.append(logprob)
        n_out = len(seq.token_ids) - seq.prompt_len
        if n_out >= p.min_tokens and token in p.stop_token_ids:
            self._finish(st, "stop", token, text_end=n_out - (0 if p.include_stop_str_in_output else 1))
        elif n_out >= p.min_tokens and not p.ignore_eos and token in self.eos_ids:
            self._finish(st, "stop", None, text_end=n_out - 1)
        elif n_out >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self._finish(st, "length", None, text_end=n_out)
        self._detokenize(seq, st)
        return st.finish_reason is not None

    def finish_seq(self, seq: Sequence, reason: str) -> None:
        """End a sequence from outside (abort, or max_tokens == 0)."""
        st = self.text[seq.index]
        if st.finish_reason is None:
            self._finish(st, reason, None, text_end=len(seq.token_ids) - seq.prompt_len)

    @staticmethod
    def _finish(st: _SeqText, reason: str, stop_reason, text_end: int) -> None:
        st.finish_reason, st.stop_reason, st.text_ids_end = reason, stop_reason, text_end

    def _detokenize(self, seq: Sequence, st: _SeqText) -> None:
        """Incremental: decode only the tokens since the last commit (plus the previous ones as context, so
        tokenizers that treat a leading space specially decode the same as a full decode)."""
        p = self.params
        out = seq.output_ids
        ids = out if st.text_ids_end is None else out[:st.text_ids_end]
        finishing = st.finish_reason is not None
        if len(ids) > st.read_offset:
            prefix = self._decode(ids[st.prefix_offset:st.read_offset])
            window = self._decode(ids[st.prefix_offset:])
            if not window.startswith(prefix):          # tokenizer without a stable prefix: decode everything
                prefix, window, st.text = "", self._decode(ids), ""
            # A trailing U+FFFD is a partial UTF-8 character: wait for its next byte unless this is the end.
            if finishing or not window.endswith("\ufffd"):
                st.text += window[len(prefix):]
                st.prefix_offset, st.read_offset = st.read_offset, len(ids)
        if p.stop and st.finish_reason in (None, "length"):
            since = max(0, st.stop_checked - (self._max_stop - 1))
            hits = [(at, s) for s in p.stop if s and (at := st.text.find(s, since)) >= 0]
            st.stop_checked = len(st.text)
            if hits:
                at, stop = min(hits)
                st.text = st.text[:at + (len(stop) if p.include_stop_str_in_output else 0)]
                self._finish(st, "stop", stop, text_end=len(out))
        limit = len(st.text)
        if st.finish_reason is None and self._max_stop:
            limit -= self._max_stop - 1                # the start of a stop string must not be emitted yet
        if limit > st.emitted_chars:
            st.pending_text += st.text[st.emitted_chars:limit]
            st.emitted_chars = limit

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    # -- outputs -------------------------------------------------------------------------------------------------
    def flush(self) -> RequestOutput | None:
        if not self.prompt_logprobs_done() and not self.all_finished():
            return None
        deltas = []
        for s in self.seqs:
            st = self.text[s.index]
            finishing = st.finish_reason is not None and not st.reported_finish
            if not (st.pending_ids or st.pending_text or finishing):
                continue
            deltas.append(SequenceDelta(
                index=s.index, token_ids=st.pending_ids, text=st.pending_text,
                logprobs=st.pending_logprobs if self.params.logprobs is not None else None,
                finish_reason=st.finish_reason if finishing else None,
                stop_reason=st.stop_reason if finishing else None))
            st.pending_ids, st.pending_text, st.pending_logprobs = [], "", []
            st.reported_finish = st.reported_finish or finishing
        done = self.all_finished()
        if not deltas and (self.sent_first or not done):
            return None
        out = RequestOutput(self.request.request_id, deltas, finished=done)
        if not self.sent_first:
            out.prompt_token_ids = list(self.request.prompt_token_ids)
            out.prompt_logprobs = self.prompt_logprobs
            out.num_cached_tokens = self.num_cached_tokens
            if self.first_scheduled is not None:
                out.queue_time = max(0.0, self.first_scheduled - self.request.arrival_time)
            self.sent_first = True
        self.finished = done
        return out
