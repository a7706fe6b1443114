"""The synchronous engine core: one `step()` = schedule, run the model once, sample, detokenise, emit outputs.

Contract:
- `EngineCore(args)` loads the base model ONCE (our `LlamaDecoder`), sizes the KV pool, builds the adapter slots,
  and loads `args.adapters`. It is single-threaded: the async `Engine` calls it from its step thread only.
- `add_request(GenerationRequest) -> RequestState` validates (unknown adapter -> AdapterNotFoundError; empty or
  out-of-vocabulary prompt or stop_token_ids -> InvalidRequestError; prompt + max_tokens beyond max_model_len or
  the KV pool -> ContextLengthError; full queue -> EngineOverloadedError) and expands n into n sequences.
- `step() -> list[RequestOutput]` is schedule -> execute -> update, handing plain data along: the scheduler's
  `SchedulerOutput` names, per chunk, the positions whose logits / hidden states / cached tails the step needs;
  `ModelRunner.execute` returns a `RunnerOutput` naming each chunk's rows; `_update` reads those rows (it computes
  no offsets), records prompt logprobs, lets the scheduler index the new blocks, samples and flushes.
- `abort(request_id) -> RequestOutput | None` frees the KV blocks at once;
  `abort_all()` aborts every request (their final outputs carry finish_reason "abort").
- Fault isolation: an exception in one request's own work during a step (prompt logprobs, prefix-cache
  registration, sampling, detokenising, flushing) fails that request alone: its KV blocks are freed, it is
  forgotten, and `take_failures()` hands its `RequestFailedError` (HTTP 500, message naming the failed stage and
  the exception) to the caller. Batched sampling that raises is retried row by row from the generator states it
  started with, so only rows that raise on their own fail. When the batched forward raises, each request's chunks
  are re-run alone and only the requests that fail alone fail; when none runs alone, a one-token probe forward
  tells a broken engine (re-raised: the caller counts failed steps) from requests that break their own forward
  (they fail, the step returns normally), so such requests cannot kill the engine however often they are sent.
  `faults.check` marks the fault-injection sites (forward, sample, detokenize) the tests use.
- Sampling: min_tokens bans, then `sampling.process_logits` (bad words, logit_bias, penalties) for the rows that
  ask for them, then `sampling.sample`; logprobs are the model's (raw logits). Penalised / biased sequences keep a
  `SamplerState` (sparse token counts on the device) updated incrementally; the default request touches none of it.
- Adapters (adapter_registry.py): any number are registered, `max_adapters` are resident in slots (`adapters`:
  the resident ones). At start the first `max_adapters` of `args.adapters` are read, validated and installed; the
  rest are registered from their adapter_config.json (checked against the slot limits) and read on first use.
  `install_adapter(name, config, tensors, path)` registers a validated adapter and puts it into a free slot, or
  into the host cache when every slot is taken (nothing else is reallocated or recompiled);
  `remove_adapter(name)` unregisters it (AdapterBusyError while requests use it); failures raise AdapterLoadError
  and leave the engine serving what it had. `read_adapter(path)` does the file work (safe in another thread).
  A request for a registered adapter that is not resident waits in the queue: `step()` first lets the registry
  bring adapters in (loads run in worker threads, slot copies happen here between steps) and evict idle ones.
  If an adapter's files cannot be loaded, the requests waiting for it fail with RequestFailedError naming the
  adapter and the cause, and later requests for it get the same error at once (no retry loop) until the adapter
  is unregistered and registered again.
  `last_step_idle` is True when the last step ran nothing (everything waits for an adapter load).
- Routing statistics are sampled every `ROUTING_STATS_EVERY` steps; `stats()` returns an EngineStats snapshot.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time

import torch

from mtlora.base import load_config, load_tokenizer, parse_dtype, resolve_model
from mtlora.errors import (AdapterNotFoundError, ContextLengthError, InvalidRequestError, MtloraError,
                           RequestFailedError)

from . import cpu_ext, cuda_kernels, faults
from .adapter_registry import AdapterRegistry
from .args import EngineArgs
from .core_adapters import AdapterMethods, _Adapter
from .kv_cache import KVCachePool
from .model import LlamaDecoder, ModelConfig
from .prefix_cache import PrefixCache
from .ops import AdapterSlots, RoutingStats, apply_min_tokens, logprobs_of, sample
from .sampling import process_logits, processing_inputs
from .request_state import RequestState
from .decode_graphs import DecodeGraphs, resolve_mode
from .runner import ChunkOutput, ModelRunner, RunnerOutput
from .scheduler import Chunk, Scheduler, SchedulerOutput, Sequence
from .structured import GrammarBackend, GrammarState, mask_rows, refuse_dead_rows
from .types import EngineStats, GenerationRequest, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

ROUTING_STATS_EVERY = 8


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    return parse_dtype(name, device)   # the one dtype policy ("auto" included): mtlora.base.parse_dtype


class EngineCore(AdapterMethods):
    def __init__(self, args: EngineArgs):
        self.args = args
        model_dir = resolve_model(args.model)
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.model_config = ModelConfig.from_dir(model_dir)
        self.hf_config = load_config(model_dir)           # what checkpoint validation and the ops expect
        self.max_model_len = args.max_model_len or self.model_config.max_position_embeddings
        self.base_model_name = args.served_model_name or model_dir.name
        self.tokenizer = load_tokenizer(model_dir)
        log.info("loading %s (%s on %s)", model_dir, self.dtype, self.device)
        self.model = LlamaDecoder.from_dir(model_dir, self.dtype, self.device, max_len=self.max_model_len)
        c = self.model_config
        self.pool = KVCachePool.from_budget(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                                            args.block_size, self.dtype, self.device, args.kv_cache_memory,
                                            gpu_fraction=args.gpu_memory_utilization)
        self.slots = AdapterSlots(self.hf_config, args.max_adapters, args.max_lora_rank, args.max_experts,
                                  args.max_groups, self.dtype, self.device)
        if args.batch_invariant:
            self.slots.row_tile = self.model.enable_batch_invariance(args.max_num_batched_tokens)
        self.routing_stats = RoutingStats()
        self.prefix_cache = PrefixCache(self.pool) if args.enable_prefix_caching else None
        self.registry = AdapterRegistry(args.max_adapters, self.read_adapter, self._slot_install, self._slot_evict,
                                        args.adapter_cache_size, pin=self.device.type == "cuda",
                                        prepare=self.slots.prepare)
        self.scheduler = Scheduler(self.pool, args.max_num_seqs, args.max_num_batched_tokens, args.max_waiting,
                                   cache=self.prefix_cache, admissible=self.registry.admissible)
        self.slot_sites: dict[int, set[str]] = {}
        mode = resolve_mode(args.decode_graphs, self.device, args.enforce_eager, args.batch_invariant)
        if (not mode and self.device.type == "cpu" and self.dtype == torch.bfloat16 and not args.batch_invariant
                and self.model.prepack_weights()):
            log.info("projection and lm_head weights prepacked for oneDNN (bf16 on CPU)")
        if self.device.type == "cpu" and not args.batch_invariant:
            cpu_ext.enable_kernels(args, self.model, self.slots, self.pool.k.dtype, compiled=bool(mode))
        elif self.device.type == "cuda" and not args.batch_invariant:
            cuda_kernels.enable(self.model, self.pool.k.dtype)
        graphs = mode and DecodeGraphs(self.model, self.pool, self.slots, args.max_num_seqs, self.max_model_len, mode)
        self.runner = ModelRunner(self.model, self.pool, self.slots, self.device, self.slot_sites, graphs)
        self.eos_ids = set(c.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.grammar = GrammarBackend(self.tokenizer, c.vocab_size, sorted(self.eos_ids))   # structured outputs
        self.requests: dict[str, RequestState] = {}
        self._failures: dict[str, RequestFailedError] = {}   # failed since the last take_failures()
        self.adapters: dict[str, _Adapter] = {}              # the resident adapters (core_adapters)
        self._rng = random.Random(args.seed)
        self._next_seq_id = 0
        self.step_count = 0
        self.last_step_idle = False
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        for i, (name, path) in enumerate(args.adapters.items()):
            if i < args.max_adapters:
                config, tensors = self.read_adapter(path)
                self.install_adapter(name, config, tensors, path, self.slots.prepare(config, tensors))
            else:
                self.register_adapter(name, path)
        if args.preload_adapters:
            self.registry.preload()                       # host cache filled before any request

    # -- requests ------------------------------------------------------------------------------------------------
    def add_request(self, req: GenerationRequest) -> RequestState:
        adapter = self._validate(req)
        p = req.sampling
        seqs = []
        for i in range(p.n):                          # slot and prefix-cache salt: set at admission (registry)
            seqs.append(Sequence(self._next_seq_id, list(req.prompt_token_ids), len(req.prompt_token_ids),
                                 adapter_name=adapter, index=i,
                                 want_prompt_logits=(i == 0 and p.prompt_logprobs is not None)))
            self._next_seq_id += 1
        state = RequestState(req, seqs, self.tokenizer, self.eos_ids, self.max_model_len)
        seed_base = p.seed if p.seed is not None else self._rng.randrange(2**62)
        state.generators = [torch.Generator(self.device).manual_seed(seed_base + i) for i in range(p.n)]
        if req.grammar is not None:                       # one matcher per sequence (structured outputs)
            state.grammars = [GrammarState(req.grammar) for _ in range(p.n)]
        for s in seqs:
            s.owner = state
        self.scheduler.add(seqs)                     # may raise EngineOverloadedError: nothing registered yet
        self.requests[req.request_id] = state
        self.prompt_tokens_total += len(req.prompt_token_ids)
        return state

    def _validate(self, req: GenerationRequest) -> str | None:
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already running", param="request_id")
        adapter = None
        if req.adapter is not None and req.adapter != self.base_model_name:
            rec = self.registry.records.get(req.adapter)
            if rec is None:
                raise AdapterNotFoundError(req.adapter)
            if rec.error is not None:                     # the server's fault, not the request's: 500
                raise self.registry.load_error(req.adapter)
            adapter = req.adapter
        ids = req.prompt_token_ids
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if any(not 0 <= t < vocab for t in req.sampling.stop_token_ids):    # they index the logits rows
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        if any(not 0 <= t < vocab for t in req.sampling.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        if any(not 0 <= t < vocab for word in req.sampling.bad_words_ids for t in word):
            raise InvalidRequestError(f"bad_words token ids must be in [0, {vocab})", param="bad_words")
        total = len(ids) + req.sampling.max_tokens
        if total > self.max_model_len:
            raise ContextLengthError(f"This model's maximum context length is {self.max_model_len} tokens; the "
                                     f"request asks for {total} ({len(ids)} prompt + {req.sampling.max_tokens} "
                                     "max_tokens)", param="max_tokens")
        capacity = self.pool.num_total * self.pool.block_size
        if total > capacity:
            raise ContextLengthError(f"prompt + max_tokens ({total}) exceeds the KV cache capacity ({capacity} "
                                     "tokens); raise kv_cache_memory", param="max_tokens")
        return adapter

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if not seq.finished:
                self.scheduler.abort(seq)
                state.finish_seq(seq, "abort")
        return state.flush()

    def abort_all(self) -> list[RequestOutput]:
        """Abort every request (shutdown deadline): their final outputs, finish_reason "abort"."""
        outputs = [self.abort(rid) for rid in list(self.requests)]
        return [out for out in outputs if out is not None]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- one step ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step: schedule -> execute -> update. A failure in one request's own work (prompt logprobs,
        prefix-cache registration, sampling, detokenising) fails that request alone (`take_failures`). A failure
        while preparing or running the batched forward fails every request with a chunk in the step and is
        re-raised, so the caller can count consecutive failed steps. Either way the failed requests' KV blocks are
        freed."""
        self._advance_adapters()
        scheduled = self.scheduler.schedule()
        self.last_step_idle = not scheduled.chunks
        if not scheduled.chunks:
            return []
        try:
            result = self._execute(scheduled)
        except Exception as exc:
            return self._isolate_failed_forward(scheduled, exc)
        self.step_count += 1
        return self._update(scheduled, result)

    def _isolate_failed_forward(self, scheduled: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        """The batched forward raised. Each request's chunks are re-run alone (its K/V slots are rewritten with
        the same values): only the requests that fail alone fail. If none of them runs alone, a probe forward of
        one token on the bare base model decides: it runs -> the requests were at fault (they fail, the engine is
        healthy, nothing is raised); it raises too -> the engine is broken: `exc` is re-raised for the caller to
        count. So no request, however often sent, can kill the engine by breaking its own forward."""
        owners: dict[int, list[Chunk]] = {}
        for c in scheduled.chunks:
            owners.setdefault(id(c.seq.owner), []).append(c)
        outputs, served = [], False
        if len(owners) > 1:
            log.warning("the batched forward failed (%s: %s); re-running its %d requests one by one",
                        type(exc).__name__, exc, len(owners))
        for chunks in owners.values():
            state, sub = chunks[0].seq.owner, SchedulerOutput(chunks)
            try:
                if len(owners) == 1:                      # it just failed alone
                    raise exc
                result = self._execute(sub)
            except Exception as own:
                self._fail(state, own, "running the batched model forward")
                continue
            outputs.extend(self._update(sub, result))
            served = True
        if served or self._probe_forward():
            self.step_count += 1
            return outputs
        raise exc

    def _probe_forward(self) -> bool:
        """True when a one-token forward of a scratch sequence (one block, bare base model) runs."""
        probe = GenerationRequest("engine-probe", [0], SamplingParams(max_tokens=1))
        try:
            blocks = self.pool.allocate(1)
        except Exception:                                 # no free block: cannot tell, count the failure
            return False
        try:
            faults.check("forward", [probe])
            seq = Sequence(seq_id=-1, token_ids=[0], prompt_len=1, blocks=blocks)
            self.runner.run([Chunk(seq, 0, 1)], [[0]])
            return True
        except Exception as exc:
            log.error("the probe forward failed too: the engine itself is broken (%s: %s)", type(exc).__name__, exc)
            return False
        finally:
            self.pool.free(blocks)

    def _execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        """Tell the request states they are scheduled (queue time; prompt logprobs a prefix-cache hit supplied
        become theirs), then run the batched forward."""
        now = time.monotonic()
        for c in scheduled.chunks:
            c.seq.owner.on_scheduled(c.start, now, c.cached_prompt_logprobs)
        faults.check("forward", [c.seq.owner.request for c in scheduled.chunks])
        sample_stats = self.adapters and self.step_count % ROUTING_STATS_EVERY == 0
        return self.runner.execute(scheduled, self.routing_stats if sample_stats else None)

    def _update(self, scheduled: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        """Record every chunk's results (prompt logprobs, prefix-cache blocks), sample, and flush the outputs."""
        to_sample, touched = [], {}
        for c, out in zip(scheduled.chunks, result.chunks):
            state = c.seq.owner
            touched[id(state)] = state
            if self._failed(state):
                continue
            try:
                self._record(c, out)
            except Exception as exc:
                self._fail(state, exc, "recording prompt logprobs / prefix-cache blocks")
                continue
            if out.sample_row is not None:
                to_sample.append((c.seq, out.sample_row))
        self._sample(to_sample, result.logits)
        return self._flush(touched.values())

    def _record(self, c: Chunk, out: ChunkOutput) -> None:
        """One chunk's bookkeeping after the forward: its prompt logprobs, then its blocks (scheduler)."""
        seq, state = c.seq, c.seq.owner
        # the logprob of the first token after the cached prefix, unless the request has it already (a sequence
        # preempted mid-prefill comes back with more entries than its cached blocks hold)
        if out.tail_logits is not None and len(state.prompt_logprobs) == c.start:
            state.prompt_logprobs.extend(self._prompt_entries(out.tail_logits, seq, [c.start - 1]))
        if out.prompt_logits is not None:
            state.prompt_logprobs.extend(self._prompt_entries(out.prompt_logits, seq,
                                                              c.logit_positions[:c.num_prompt_logits]))
        # before sampling, which may free finished sequences
        self.scheduler.on_computed(c, state.prompt_logprobs if seq.want_prompt_logits else None,
                                   state.params.prompt_logprobs, out.hidden)

    def _flush(self, states) -> list[RequestOutput]:
        outputs = []
        for state in states:
            if self._failed(state):
                continue
            try:
                out = state.flush()
            except Exception as exc:
                self._fail(state, exc, "flushing its output")
                continue
            if out is not None:
                outputs.append(out)
            if state.finished:
                self.requests.pop(state.request.request_id, None)
        return outputs

    # -- per-request failures --------------------------------------------------------------------------------------
    def _fail(self, state: RequestState, exc: BaseException, doing: str,
              error: MtloraError | None = None) -> None:
        """Fail one request: free its sequences' KV blocks, forget it, queue its error (default: one naming
        `doing` and `exc`) for `take_failures`."""
        rid = state.request.request_id
        if rid in self._failures:
            return
        log.error("request %s failed while %s; the engine carries on", rid, doing,
                  exc_info=exc if error is None else None)
        for seq in state.seqs:
            if not seq.finished:
                self.scheduler.abort(seq)
        self.requests.pop(rid, None)
        state.finished = True
        self._failures[rid] = error or RequestFailedError(f"the engine failed while {doing} for this request: "
                                                          f"{type(exc).__name__}: {exc}")

    def _failed(self, state: RequestState) -> bool:
        return state.request.request_id in self._failures

    def take_failures(self) -> dict[str, RequestFailedError]:
        """request id -> error of the requests failed since the last call (their consumers get the error)."""
        failures, self._failures = self._failures, {}
        return failures

    @staticmethod
    def _prompt_entries(logits: torch.Tensor, seq: Sequence, positions: list[int]) -> list:
        """Prompt-logprob entries of the tokens after `positions`, from their logits rows [n, V]."""
        targets = torch.tensor([seq.token_ids[p + 1] for p in positions])
        k = seq.owner.params.prompt_logprobs
        return logprobs_of(logits, targets, [k] * len(positions))

    def _sample(self, to_sample: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
        live = []
        for seq, row in to_sample:
            if self._failed(seq.owner):                   # a sibling sequence (n > 1) failed its bookkeeping
                continue
            if seq.owner.params.max_tokens == 0:          # prompt-only request (e.g. prompt logprobs / echo)
                seq.owner.finish_seq(seq, "length")
                self.scheduler.finish(seq)
            else:
                live.append((seq, row))
        if not live:
            return
        for seq, token, lp in self._choose_isolated(live, logits):
            if self._failed(seq.owner):                   # a sibling sequence (n > 1) failed
                continue
            self.generation_tokens_total += 1
            try:
                faults.check("detokenize", [seq.owner.request])
                grammar = _grammar_of(seq)
                if grammar is not None:
                    grammar.check_cost()
                if grammar is not None and not grammar.accept(token):
                    raise RuntimeError(f"the output grammar rejected token {token}")
                if seq.owner.on_token(seq, token, lp):
                    self.scheduler.finish(seq)
                elif grammar is not None and grammar.done:
                    # The grammar ended (on EOS) but min_tokens / ignore_eos kept the sequence going: nothing more
                    # can follow a finished grammar, so it stops here (the matcher would refuse the next mask).
                    seq.owner.finish_seq(seq, "stop")
                    self.scheduler.finish(seq)
            except Exception as exc:
                self._fail(seq.owner, exc, "recording / detokenising a sampled token", _request_error(exc))

    def _choose_isolated(self, live: list[tuple[Sequence, int]], logits: torch.Tensor):
        """[(seq, token, logprob)] for the rows `live`, sampled in one batch. If the batch raises, the rows are
        sampled one by one from the generator states they had before it, and only the rows that raise again fail
        their requests (so one request's bad row never costs the others a token or a reproducible draw)."""
        drawn = [(g, g.get_state()) for seq, _ in live if seq.owner.params.temperature > 0
                 for g in (seq.owner.generators[seq.index],)]
        try:
            return self._choose(live, logits)
        except Exception as exc:
            if len(live) == 1:
                self._fail(live[0][0].owner, exc, "sampling", _request_error(exc))
                return []
            log.warning("batched sampling of %d rows failed (%s: %s); sampling them one by one", len(live),
                        type(exc).__name__, exc)
        for gen, state in drawn:
            gen.set_state(state)
        chosen = []
        for one in live:
            if self._failed(one[0].owner):
                continue
            try:
                chosen.extend(self._choose([one], logits))
            except Exception as exc:
                self._fail(one[0].owner, exc, "sampling", _request_error(exc))
        return chosen

    def _choose(self, live: list[tuple[Sequence, int]], logits: torch.Tensor):
        """[(seq, token, logprob or None)]: one sampled token per row of `live` (seq, logits row)."""
        idx = [r for _, r in live]
        if idx == list(range(idx[0], idx[0] + len(idx))):  # the decode case: a view, not a copy of [S, V] fp32
            raw = logits[idx[0]:idx[0] + len(idx)]      # (~12 MB at 64 rows; nothing below writes into raw)
        else:
            raw = logits[torch.tensor(idx, device=logits.device)]                        # [S, V]
        banned = []                                           # forbid ending before min_tokens
        for seq, _ in live:
            p = seq.owner.params
            below = len(seq.output_ids) < p.min_tokens
            banned.append(list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(self.eos_ids)) if below else None)
        rows = apply_min_tokens(raw, banned) if any(banned) else raw
        grammars = [_grammar_of(seq) for seq, _ in live]
        if any(g is not None for g in grammars):          # structured outputs: the grammar's mask on its rows
            rows = rows.clone() if rows is raw else rows
            mask_rows(rows, grammars)
            for i in torch.isneginf(rows).all(-1).nonzero().flatten().tolist():
                rows[i] = raw[i]                          # min_tokens forbade the only token the grammar allows
                mask_rows(rows[i:i + 1], [grammars[i]])
        params = [seq.owner.params for seq, _ in live]
        if any(p.processes_logits for p in params):       # the default request skips this entirely
            rows = process_logits(rows, params, *processing_inputs([s for s, _ in live], raw.device))
            refuse_dead_rows(rows, grammars, [len(seq.output_ids) for seq, _ in live])
        gens = [seq.owner.generators[seq.index] for seq, _ in live]
        chosen = sample(rows, params, gens).cpu()
        faults.check("sample", [seq.owner.request for seq, _ in live])   # after the draws: the worst case
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        lps = dict(zip(want, logprobs_of(raw[want], chosen[want], [params[i].logprobs for i in want]))) \
            if want else {}
        return [(seq, int(chosen[i]), lps.get(i)) for i, (seq, _) in enumerate(live)]

    # -- stats ---------------------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        st = EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                         kv_blocks_total=self.pool.num_total, kv_blocks_used=self.pool.num_used,
                         prompt_tokens_total=self.prompt_tokens_total,
                         generation_tokens_total=self.generation_tokens_total)
        reg = self.registry
        st.adapters_registered, st.adapters_resident = len(reg.records), len(self.adapters)
        st.adapter_counters = dataclasses.replace(reg.counters, wait_buckets=list(reg.counters.wait_buckets))
        st.adapter_host_cache_bytes = reg.cache.bytes
        if self.prefix_cache is not None:
            st.prefix_cache_queries_total = self.prefix_cache.queries
            st.prefix_cache_hits_total = self.prefix_cache.hits
        for name, a in self.adapters.items():
            usage, entropy = _routing_summary(self.routing_stats, a.slot)
            if usage:
                st.expert_usage[name] = usage
                st.routing_entropy[name] = entropy
        return st


def _request_error(exc: BaseException) -> MtloraError | None:
    """The error a request failed by `exc` gets: the request's own contradiction stays a 400 (InvalidRequestError),
    anything else becomes _fail's RequestFailedError (500)."""
    return exc if isinstance(exc, InvalidRequestError) else None


def _grammar_of(seq: Sequence) -> GrammarState | None:
    grammars = seq.owner.grammars
    return grammars[seq.index] if grammars else None


def _routing_summary(stats, slot: int) -> tuple[list[float], float]:
    """(per-expert mean weight, mean entropy) from RoutingStats.summary, whichever shape it returns."""
    s = stats.summary(slot)
    if s is None:
        return [], 0.0
    if isinstance(s, dict):
        usage = s.get("expert_usage", s.get("usage", []))
        entropy = s.get("entropy", s.get("routing_entropy", 0.0))
    else:
        usage, entropy = s[0], s[1]
    usage = usage.tolist() if hasattr(usage, "tolist") else list(usage or [])
    return [float(u) for u in usage], float(entropy or 0.0)
