"""Tokenizer work for the API routes, off the event loop once an input is more than small.

Contract:
- `TokenizerWork(tokenizer)` wraps the engine's tokenizer; its coroutines are awaited on the event loop.
  Inputs of at most `inline_chars` characters (or `inline_ids` token ids) run inline: the hop to a thread costs
  more than they do. Larger ones run in dedicated threads, never on the loop: up to `lane_chars` characters in the
  `small` lane (2 threads), beyond that in the `large` lane (1 thread, FIFO), so one huge input at a time is
  tokenised and a queue of huge inputs never delays ordinary prompts. The threads run tokenizer and JSON work
  only, never torch (see engine.py on libgomp pools).
- `encode(text, add_special_tokens, limit=None) -> Encoded(count, ids)`: `ids` is None when `count > limit`
  (the ids of a prompt that cannot fit are never turned into Python ints). `decode(ids, skip_special_tokens)`,
  `render_chat(messages, add_generation_prompt)` and `tokenize_json(...)` (the /tokenize body, rendered in
  chunks) follow the same rule.
- Results equal the Hugging Face tokenizer's own `encode` / `decode`. Why the Rust backend is called directly
  when transformers adds nothing on top (`backend_is_exact`): `Tokenizer.encode_batch` / `decode_batch` release
  the GIL while they work, `encode` / `decode` (what transformers calls) hold it for the whole call, and a thread
  holding the GIL stalls the loop as surely as running on it. Measured for a 10 MB text on SmolLM2's tokenizer
  (docs/benchmarks.md): transformers' encode in a thread stalled the loop up to 615 ms, encode_batch 28 ms.
- What still holds the GIL, in proportion to the size: turning an encoding's ids into a Python list (~30 ns per
  token, done only for /tokenize or for prompts that fit the context) and rendering JSON (done in chunks of
  `JSON_CHUNK` items so the loop gets the GIL between them).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

INLINE_CHARS = 1024          # ~0.3-1.3 ms of BPE on the loop; a thread hop costs ~0.1 ms
INLINE_IDS = 4096
LANE_CHARS = 256 * 1024      # beyond this an input goes to the one-thread large lane
JSON_CHUNK = 16384           # items per json.dumps call (~3 ms of GIL for token ids)


@dataclass
class Encoded:
    count: int
    ids: list[int] | None      # None: count > the limit asked for, ids not materialised


def backend_is_exact(tokenizer) -> bool:
    """True when transformers' encode/decode are exactly the Rust backend's encode_batch/decode_batch for one
    text: a TokenizersBackend whose encode/decode paths are not overridden, with neither special-token splitting
    nor clean-up of tokenization spaces (both applied by transformers in Python)."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    cls = type(tokenizer)
    return (isinstance(tokenizer, TokenizersBackend)
            and all(getattr(cls, name) is getattr(TokenizersBackend, name)
                    for name in ("encode", "_encode_plus", "decode", "_decode"))
            and not getattr(tokenizer, "split_special_tokens", False)
            and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
            and not getattr(tokenizer.backend_tokenizer, "encode_special_tokens", False))


def _json_list(items: list, out: list[str]) -> None:
    """Append the JSON of `items` to `out` in chunks (each json.dumps call holds the GIL only briefly)."""
    out.append("[")
    for start in range(0, len(items), JSON_CHUNK):
        if start:
            out.append(",")
        out.append(json.dumps(items[start:start + JSON_CHUNK], ensure_ascii=False, separators=(",", ":"))[1:-1])
    out.append("]")


class TokenizerWork:
    def __init__(self, tokenizer, inline_chars: int = INLINE_CHARS, lane_chars: int = LANE_CHARS):
        self.tokenizer = tokenizer
        self.inline_chars = inline_chars
        self.lane_chars = lane_chars
        self.exact_backend = backend_is_exact(tokenizer)
        self._small = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mtlora-tokenize")
        self._large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtlora-tokenize-large")

    async def _run(self, size: int, fn: Callable, *args) -> Any:
        if size <= self.inline_chars:
            return fn(*args)
        pool = self._small if size <= self.lane_chars else self._large
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def shutdown(self) -> None:
        self._small.shutdown(wait=False, cancel_futures=True)
        self._large.shutdown(wait=False, cancel_futures=True)

    # -- encode --------------------------------------------------------------------------------------------------
    def _encoding(self, text: str, add_special_tokens: bool):
        return self.tokenizer.backend_tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def _encode(self, text: str, add_special_tokens: bool, limit: int | None) -> Encoded:
        if not self.exact_backend:
            ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
            return Encoded(len(ids), ids if limit is None or len(ids) <= limit else None)
        encoding = self._encoding(text, add_special_tokens)
        count = len(encoding)
        return Encoded(count, encoding.ids if limit is None or count <= limit else None)

    async def encode(self, text: str, add_special_tokens: bool = True, limit: int | None = None) -> Encoded:
        return await self._run(len(text), self._encode, text, add_special_tokens, limit)

    # -- decode --------------------------------------------------------------------------------------------------
    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if self.exact_backend:
            return self.tokenizer.backend_tokenizer.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    async def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        size = len(ids) * self.inline_chars // INLINE_IDS     # ids measured on the characters' scale
        return await self._run(size, self._decode, list(ids), skip_special_tokens)

    async def run_ids(self, ids: list[int], fn: Callable, *args) -> Any:
        """`fn(*args)` inline for a short id list, in a thread for a long one (e.g. a pure-Python check)."""
        return await self._run(len(ids) * self.inline_chars // INLINE_IDS, fn, *args)

    # -- chat templates ------------------------------------------------------------------------------------------
    async def render_chat(self, messages: list[dict], add_generation_prompt: bool, size: int,
                          tools: list[dict] | None = None) -> Any:
        """`apply_chat_template(..., tokenize=False)` (with `tools` when given); `size` is the messages' text
        length (jinja is pure Python, so in a thread it shares the GIL with the loop every switch interval)."""
        return await self._run(size, lambda: self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt))

    # -- /tokenize -----------------------------------------------------------------------------------------------
    def _tokenize_json(self, text: str, add_special_tokens: bool, max_model_len: int, token_strs: bool) -> bytes:
        ids = self._encode(text, add_special_tokens, None).ids
        out = [f'{{"count":{len(ids)},"max_model_len":{max_model_len},"tokens":']
        _json_list(ids, out)
        out.append(',"token_strs":')
        if token_strs:
            strs: list[str] = []
            for start in range(0, len(ids), JSON_CHUNK):
                strs.extend(str(t) for t in self.tokenizer.convert_ids_to_tokens(ids[start:start + JSON_CHUNK]))
            _json_list(strs, out)
        else:
            out.append("null")
        out.append("}")
        return "".join(out).encode("utf-8")

    async def tokenize_json(self, text: str, add_special_tokens: bool, max_model_len: int,
                            token_strs: bool) -> bytes:
        """The /tokenize response body (vLLM's shape: count, max_model_len, tokens, token_strs)."""
        return await self._run(len(text), self._tokenize_json, text, add_special_tokens, max_model_len,
                               token_strs)
