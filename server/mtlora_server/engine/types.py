"""The engine's public interface: internal request/response dataclasses and the `EngineClient` protocol.

The API layer converts pydantic request models into these dataclasses (`to_sampling_params()`) and talks to the
engine only through `EngineClient`, so API tests can run against a fake engine. Nothing here imports torch.

Contract of `EngineClient.generate(request)`:
- returns an async iterator of `RequestOutput`; the first item carries `prompt_token_ids` (and `prompt_logprobs`
  when asked), `num_cached_tokens` (prompt tokens whose K/V came from the prefix cache) and `queue_time` (seconds
  from `arrival_time` to the request's first scheduling; None if it was never scheduled); each item carries only what is new since the previous one (`deltas`, one per sequence that advanced);
- the last item has `finished=True`; every sequence has exactly one delta with a `finish_reason`
  ("stop", "length" or "abort");
- raises `AdapterNotFoundError`, `InvalidRequestError`/`ContextLengthError` before the first item for bad input,
  and `EngineOverloadedError` when the waiting queue is full;
- if the consumer stops iterating (client disconnect -> task cancelled / `aclose()`), the request is aborted and
  its KV memory freed at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, Sequence

from mtlora.errors import InvalidRequestError

FINISH_REASONS = ("stop", "length", "abort")
# Temperatures below this sample greedily (as vLLM's _SAMPLING_EPS): dividing logits by 1e-40 overflows to inf and
# the softmax to NaN, which would kill the batch.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_PENALTY = 2.0                 # presence / frequency penalty bounds (OpenAI's and vLLM's)
MAX_LOGIT_BIAS = 100.0            # |bias| bound (OpenAI's)
# repetition_penalty bounds: vLLM asks only > 0, but in fp32 a value near 0 or huge turns logits into inf / NaN
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-6, 1e6


@dataclass
class SamplingParams:
    """How to sample one request. Validated in __post_init__; errors name the OpenAI parameter."""

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                    # 0 or -1: disabled
    seed: int | None = None           # per-request generator: same seed -> same tokens, whatever the batch
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None       # None: no logprobs; k >= 0: sampled token's logprob + top-k alternatives
    prompt_logprobs: int | None = None  # None: none; k >= 0: per prompt position (first is None) + top-k
    skip_special_tokens: bool = True
    # Logits processing, with vLLM's (and OpenAI's) definitions; see engine.sampling for the order and formulas.
    presence_penalty: float = 0.0     # [-2, 2]: subtracted once from each token already in the OUTPUT
    frequency_penalty: float = 0.0    # [-2, 2]: subtracted per occurrence of the token in the OUTPUT
    repetition_penalty: float = 1.0   # [1e-6, 1e6], 1 = off: on prompt + output tokens, logit > 0 divided, else times
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> bias in [-100, 100], added
    min_p: float = 0.0                # [0, 1]: drop tokens with prob < min_p * max prob (after temperature)
    bad_words_ids: list[list[int]] = field(default_factory=list)  # token sequences never generated (`bad_words`)

    def __post_init__(self) -> None:
        checks = [
            (self.n >= 1, "n", "n must be at least 1"),
            (self.max_tokens >= 0, "max_tokens", "max_tokens must be >= 0"),
            (self.min_tokens >= 0, "min_tokens", "min_tokens must be >= 0"),
            (self.min_tokens <= self.max_tokens, "min_tokens", "min_tokens must be <= max_tokens"),
            (0.0 <= self.temperature <= MAX_TEMPERATURE, "temperature",   # False for NaN too
             f"temperature must be in [0, {MAX_TEMPERATURE:g}]"),
            (0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k", "top_k must be -1, 0 (disabled) or positive"),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX, "seed", "seed must be a 64-bit integer"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "stop_token_ids must be non-negative integers"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "logprobs must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs",
             "prompt_logprobs must be in [0, 20]"),
        ] + self._processing_checks()
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param=param)

    def _processing_checks(self) -> list[tuple[bool, str, str]]:
        """Range checks of the logits-processing fields (False for NaN too); token ids are checked against the
        vocabulary by the engine (and at the API edge)."""
        return [
            (-MAX_PENALTY <= self.presence_penalty <= MAX_PENALTY, "presence_penalty",
             f"presence_penalty must be in [{-MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
            (-MAX_PENALTY <= self.frequency_penalty <= MAX_PENALTY, "frequency_penalty",
             f"frequency_penalty must be in [{-MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
            (MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY, "repetition_penalty",
             f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1 = off)"),
            (all(isinstance(t, int) and t >= 0 and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS
                 for t, b in self.logit_bias.items()), "logit_bias",
             f"logit_bias maps token ids (>= 0) to biases in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"),
            (0.0 <= self.min_p <= 1.0, "min_p", "min_p must be in [0, 1]"),
            (all(w and all(isinstance(t, int) and t >= 0 for t in w) for w in self.bad_words_ids), "bad_words",
             "bad_words must tokenise to non-empty sequences of token ids"),
        ]

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """Presence, frequency or repetition penalty set: the sampler needs this sequence's token counts."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def processes_logits(self) -> bool:
        """Anything between the model's logits and temperature (penalties, logit_bias, bad words). False for the
        default request, whose logits reach the sampler untouched."""
        return self.has_penalties or bool(self.logit_bias) or bool(self.bad_words_ids)


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter: str | None = None        # None: the bare base model
    arrival_time: float = field(default_factory=time.monotonic)
    grammar: object | None = None     # a compiled output constraint (structured.GrammarBackend.compile), or None


@dataclass
class TokenLogprob:
    """Logprob of one chosen token plus the top alternatives (token id -> logprob, best first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SequenceDelta:
    """What one of the request's n sequences produced since the last RequestOutput."""

    index: int
    token_ids: list[int]
    text: str                                     # new detokenised text (stop strings already cut)
    logprobs: list[TokenLogprob] | None = None    # one per new token when SamplingParams.logprobs is set
    finish_reason: str | None = None              # None while running; then one of FINISH_REASONS
    stop_reason: int | str | None = None          # the stop string / token id that ended it, if any


@dataclass
class RequestOutput:
    request_id: str
    deltas: list[SequenceDelta]
    finished: bool = False
    prompt_token_ids: list[int] | None = None                  # first output only
    prompt_logprobs: list[TokenLogprob | None] | None = None   # first output only; position 0 is None
    num_cached_tokens: int = 0                                 # first output only: prompt tokens from the cache
    queue_time: float | None = None                            # first output only: arrival -> first scheduled (s)


@dataclass
class AdapterInfo:
    name: str
    method: str
    path: str
    num_parameters: int
    num_experts: int
    rank: int


WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)   # adapter waits (s)


@dataclass
class AdapterCounters:
    """Adapter residency counters (engine/adapter_registry.py); cumulative fields only ever grow."""

    loads_total: int = 0                                  # slot installs of a non-resident adapter
    disk_loads_total: int = 0                             # reads from disk (file read + validation)
    load_failures_total: int = 0
    evictions_total: int = 0
    cache_hits_total: int = 0                             # slot installs served from the host cache
    wait_bounds: tuple[float, ...] = WAIT_BUCKETS           # histogram bucket upper bounds (seconds)
    wait_buckets: list[int] = field(default_factory=lambda: [0] * len(WAIT_BUCKETS))   # cumulative counts
    wait_count: int = 0
    wait_sum: float = 0.0

    def observe_wait(self, seconds: float) -> None:
        self.wait_count += 1
        self.wait_sum += seconds
        for i, bound in enumerate(WAIT_BUCKETS):
            if seconds <= bound:
                self.wait_buckets[i] += 1


@dataclass
class EngineStats:
    """Point-in-time counters for /metrics. Cumulative fields only ever grow."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries_total: int = 0          # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0             # of those, tokens whose K/V came from the cache
    # adapter name -> per-expert mean routing weight (averaged over sites and sampled tokens)
    expert_usage: dict[str, list[float]] = field(default_factory=dict)
    # adapter name -> mean routing entropy (nats) over sampled tokens
    routing_entropy: dict[str, float] = field(default_factory=dict)
    adapters_registered: int = 0                 # servable adapters (resident or not)
    adapters_resident: int = 0                   # adapters in device slots
    adapter_host_cache_bytes: int = 0            # validated adapter tensors held in host memory
    adapter_counters: AdapterCounters = field(default_factory=AdapterCounters)   # loads, evictions, waits

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class Tokenizer(Protocol):
    """The subset of a Hugging Face tokenizer the API layer uses."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...
    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True,
                            **kw): ...
    def convert_ids_to_tokens(self, ids): ...


class EngineClient(Protocol):
    """What the API layer needs from an engine (the real one or a fake in tests)."""

    base_model_name: str
    max_model_len: int
    tokenizer: Tokenizer

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]: ...
    async def abort(self, request_id: str) -> None: ...
    def list_adapters(self) -> list[AdapterInfo]: ...
    async def load_adapter(self, name: str, path: str) -> AdapterInfo: ...
    async def unload_adapter(self, name: str) -> None: ...
    def stats(self) -> EngineStats: ...
    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...
    def is_healthy(self) -> bool: ...
