"""A fake engine implementing `mtlora_server.engine.types.EngineClient`, for API tests (no torch, no model).

Behaviour (deterministic, so tests can assert exact outputs):
- Tokenizer: byte level like `mtlora.testing` (0 <unk>, 1 <s>, 2 </s>, ids 3..258 = bytes 0..255) with the same
  chat template. `encode` prepends <s> when add_special_tokens.
- Generation: sequence j of a request emits lowercase letters; the letter at step t is a function of the adapter,
  the prompt, j, t and (when sampling with temperature > 0) the seed, so different adapters give different text.
  Stop strings, max_tokens ("length"), logprobs (chosen token first, alternatives after) and prompt logprobs
  (position 0 is None) follow the engine contract; the first output reports the queue_delay as queue_time and no
  cached prompt tokens. `token_delay` seconds pass between steps.
- Admission: raises AdapterNotFoundError / InvalidRequestError / ContextLengthError / EngineOverloadedError before
  the first output like the real engine; `fail_after` makes the engine die (EngineDeadError) mid-stream.
- KV accounting: a request holds ceil((prompt + max_tokens) / block_size) * n blocks from admission until it
  finishes or its iterator is closed; `stats()` reports them, so tests can check that disconnects free memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from pathlib import Path

from mtlora.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    ContextLengthError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
)
from mtlora_server.engine.types import (
    AdapterInfo,
    EngineStats,
    GenerationRequest,
    RequestOutput,
    SequenceDelta,
    TokenLogprob,
)

SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


class FakeTokenizer:
    bos_token, eos_token, pad_token, unk_token = "<s>", "</s>", "<unk>", "<unk>"
    bos_token_id, eos_token_id = 1, 2
    chat_template = CHAT_TEMPLATE

    def __len__(self) -> int:
        return 259

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids, i = [], 0
        while i < len(text):                     # specials written out in text become their ids (like HF)
            for sid, special in enumerate(SPECIALS):
                if text.startswith(special, i):
                    ids.append(sid)
                    i += len(special)
                    break
            else:
                ids.extend(b + 3 for b in text[i].encode("utf-8"))
                i += 1
        return ([1] if add_special_tokens else []) + ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for t in ids:
            if t >= 3:
                buf.append(t - 3)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(SPECIALS[t])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def convert_ids_to_tokens(self, ids):
        return [SPECIALS[t] if t < 3 else f"<0x{t - 3:02X}>" for t in ids]

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True, **kw):
        import jinja2

        text = jinja2.Environment().from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _letter(*parts) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return 3 + ord("a") + digest[0] % 26


class FakeGrammar:
    """Stands in for structured.GrammarBackend: every constraint compiles (the fake engine ignores grammars)."""

    def compile(self, guided):
        return guided


class FakeEngine:
    def __init__(self, base_model_name: str = "tiny-base", max_model_len: int = 128,
                 adapters: dict[str, str] | None = None, token_delay: float = 0.0, max_running: int = 64,
                 max_waiting: int = 64, kv_blocks_total: int = 512, block_size: int = 16,
                 queue_delay: float = 0.0):
        self.base_model_name = base_model_name
        self.max_model_len = max_model_len
        self.tokenizer = FakeTokenizer()
        self.grammar = FakeGrammar()
        self.token_delay = token_delay
        self.queue_delay = queue_delay            # seconds before the first output (queued behind a full batch)
        self.max_running, self.max_waiting = max_running, max_waiting
        self.kv_blocks_total, self.block_size = kv_blocks_total, block_size
        self.adapters: dict[str, AdapterInfo] = {}
        for name, path in (adapters or {}).items():
            self.adapters[name] = AdapterInfo(name, "mtlora", path, 1000, 4, 8)
        self.active: dict[str, int] = {}          # request id -> KV blocks held
        self.seen: list[GenerationRequest] = []   # every admitted request, for assertions
        self.aborted: list[str] = []
        self.fail_after: int | None = None        # die after this many steps of any request
        self.healthy = True
        self.started = False
        self.prompt_tokens = 0
        self.generation_tokens = 0

    # -- admission ---------------------------------------------------------------------------------------------
    def _admit(self, req: GenerationRequest) -> int:
        if not self.healthy:
            raise EngineDeadError("engine is dead")
        if req.adapter is not None and req.adapter not in self.adapters:
            raise AdapterNotFoundError(req.adapter)
        if not req.prompt_token_ids:
            raise InvalidRequestError("empty prompt", param="prompt")
        if any(not 0 <= t < len(self.tokenizer) for t in req.prompt_token_ids):
            raise InvalidRequestError("token id out of range", param="prompt")
        total = len(req.prompt_token_ids) + req.sampling.max_tokens
        if total > self.max_model_len:
            raise ContextLengthError(f"{total} tokens > {self.max_model_len}", param="max_tokens")
        if len(self.active) >= self.max_running + self.max_waiting:
            raise EngineOverloadedError(retry_after=2.0)
        blocks = math.ceil(total / self.block_size) * req.sampling.n
        self.active[req.request_id] = blocks
        self.seen.append(req)
        self.prompt_tokens += len(req.prompt_token_ids)
        return blocks

    def _logprob(self, token_id: int, k: int) -> TokenLogprob:
        alternatives = [(token_id, math.log(0.5))] + [
            (3 + ord("A") + i, math.log(0.5 / 2 ** (i + 1))) for i in range(max(0, k - 1))]
        return TokenLogprob(token_id, math.log(0.5), alternatives[:k])

    def _prompt_logprobs(self, req: GenerationRequest):
        k = req.sampling.prompt_logprobs
        if k is None:
            return None
        return [None] + [TokenLogprob(t, -1.0, [(t, -1.0)][:k]) for t in req.prompt_token_ids[1:]]

    # -- generation --------------------------------------------------------------------------------------------
    async def generate(self, req: GenerationRequest):
        self._admit(req)
        sp = req.sampling
        try:
            await asyncio.sleep(self.queue_delay)
            texts = [""] * sp.n
            done = [sp.max_tokens == 0] * sp.n
            first = RequestOutput(req.request_id, [], prompt_token_ids=list(req.prompt_token_ids),
                                  prompt_logprobs=self._prompt_logprobs(req),
                                  queue_time=max(0.0, time.monotonic() - req.arrival_time))
            if all(done):
                first.deltas = [SequenceDelta(j, [], "", [] if sp.logprobs is not None else None, "length")
                                for j in range(sp.n)]
                first.finished = True
                yield first
                return
            rngs = [random.Random(f"{sp.seed}-{j}") if sp.seed is not None else random.Random() for j in range(sp.n)]
            for step in range(sp.max_tokens):
                await asyncio.sleep(self.token_delay)
                if self.fail_after is not None and step >= self.fail_after:
                    self.healthy = False
                    raise EngineDeadError("engine died mid-request")
                out = first if step == 0 else RequestOutput(req.request_id, [])
                for j in range(sp.n):
                    if not done[j]:
                        out.deltas.append(self._step(req, j, step, texts, done, rngs[j]))
                out.finished = all(done)
                yield out
                if out.finished:
                    return
        finally:
            self.active.pop(req.request_id, None)

    def _step(self, req, j, step, texts, done, rng) -> SequenceDelta:
        sp = req.sampling
        salt = rng.random() if sp.temperature > 0 else 0
        token = _letter(req.adapter, req.prompt_token_ids, j, step, salt)
        self.generation_tokens += 1
        piece = chr(token - 3)
        texts[j] += piece
        delta = SequenceDelta(j, [token], piece, [self._logprob(token, sp.logprobs)] if sp.logprobs is not None
                              else None)
        for stop in sp.stop:
            cut = texts[j].find(stop)
            if cut >= 0:
                keep = cut + (len(stop) if sp.include_stop_str_in_output else 0)
                delta.text = piece[: max(0, len(piece) - (len(texts[j]) - keep))]
                delta.finish_reason, delta.stop_reason = "stop", stop
                done[j] = True
                return delta
        if step + 1 >= sp.max_tokens:
            delta.finish_reason = "length"
            done[j] = True
        return delta

    async def abort(self, request_id: str) -> None:
        if self.active.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    # -- adapters ----------------------------------------------------------------------------------------------
    def list_adapters(self) -> list[AdapterInfo]:
        return list(self.adapters.values())

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        cfg = Path(path) / "adapter_config.json"
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError) as exc:
            raise AdapterLoadError(f"{cfg}: {exc}") from None
        info = AdapterInfo(name, data.get("method", "?"), path, 1000, int(data.get("num_experts", 1)),
                           int(data.get("rank", 8)))
        self.adapters[name] = info
        return info

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterNotFoundError(name)
        del self.adapters[name]

    # -- status ------------------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        usage = {name: [1.0 / a.num_experts] * a.num_experts for name, a in self.adapters.items()}
        return EngineStats(num_running=len(self.active), num_waiting=0, kv_blocks_total=self.kv_blocks_total,
                           kv_blocks_used=sum(self.active.values()), prompt_tokens_total=self.prompt_tokens,
                           generation_tokens_total=self.generation_tokens, expert_usage=usage,
                           routing_entropy={name: math.log(a.num_experts) for name, a in self.adapters.items()})

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.started = False

    def is_healthy(self) -> bool:
        return self.healthy


def api_client(engine, **server_args):
    """An httpx.AsyncClient that drives `build_app(engine, ServerArgs(**server_args))` in-process."""
    import httpx

    from mtlora_server.api import ServerArgs, build_app

    app = build_app(engine, ServerArgs(**server_args))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def disconnect_after_first_body(app, path: str, body: dict, timeout: float = 30.0,
                                      after_s: float | None = None) -> None:
    """Drive the ASGI app directly: send the request, disconnect once the first body chunk arrives (or `after_s`
    seconds after the request, whichever is first)."""
    got_body = asyncio.Event()
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        try:
            await asyncio.wait_for(got_body.wait(), after_s)
        except asyncio.TimeoutError:
            pass
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            got_body.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=timeout)
