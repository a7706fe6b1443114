"""api.tokenization: same results as the Hugging Face tokenizer, big inputs off the event loop, bounded lanes."""

from __future__ import annotations

import asyncio
import json
import random
import threading

import pytest
from fakes import FakeTokenizer

from mtlora.base import load_tokenizer
from mtlora_server.api.tokenization import JSON_CHUNK, TokenizerWork, backend_is_exact

TEXTS = ["", "hello world", "  leading and  double  spaces\n\n\ttabs", "digits 1234567 and 3.14159",
         "unicode: é, 日本語, emoji 🙂, combining é", "<s>written-out specials</s> <unk>",
         "Question: 2+2?\nAnswer:", "x" * 5000]


def _random_text(rng: random.Random, n: int) -> str:
    words = ["the", "Fox", " ", "\n", "42", "é", "日本", "<s>", "don't", "...", "🙂", "\t"]
    return "".join(rng.choice(words) for _ in range(n))


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def _check_same_as_transformers(tok) -> None:
    work = TokenizerWork(tok, inline_chars=0)          # everything through the threads
    assert work.exact_backend
    rng = random.Random(0)
    texts = TEXTS + [_random_text(rng, 300) for _ in range(20)]
    async def run():
        for text in texts:
            for special in (True, False):
                got = await work.encode(text, special)
                want = tok.encode(text, add_special_tokens=special)
                assert got.ids == want and got.count == len(want), (text, special)
        vocab = len(tok)
        for _ in range(30):
            ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 200))]
            for skip in (True, False):
                assert await work.decode(ids, skip) == tok.decode(ids, skip_special_tokens=skip), ids
    asyncio.run(run())
    work.shutdown()


def test_the_backend_path_gives_what_transformers_gives_on_the_tiny_tokenizer(tiny_tokenizer):
    _check_same_as_transformers(tiny_tokenizer)


def test_the_backend_path_gives_what_transformers_gives_on_the_default_model(default_model_dir):
    _check_same_as_transformers(load_tokenizer(default_model_dir))


def test_transformers_runs_itself_when_it_adds_to_the_backend(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    tok.clean_up_tokenization_spaces = True            # applied by transformers in Python, not by the backend
    assert not backend_is_exact(tok)
    assert not backend_is_exact(FakeTokenizer())


class _ThreadRecorder(FakeTokenizer):
    def __init__(self):
        self.threads: list[str] = []

    def encode(self, text, add_special_tokens=True):
        self.threads.append(threading.current_thread().name)
        return super().encode(text, add_special_tokens)


async def test_small_inputs_stay_inline_big_ones_go_to_their_lane():
    tok = _ThreadRecorder()
    work = TokenizerWork(tok, inline_chars=10, lane_chars=100)
    for text in ("tiny", "m" * 50, "L" * 500):
        assert (await work.encode(text, False)).ids == FakeTokenizer().encode(text, False)
    assert tok.threads[0] == threading.current_thread().name
    assert tok.threads[1].startswith("mtlora-tokenize_")
    assert tok.threads[2].startswith("mtlora-tokenize-large_")
    work.shutdown()


async def test_a_limit_keeps_the_count_and_drops_the_ids():
    work = TokenizerWork(FakeTokenizer(), inline_chars=0)
    over = await work.encode("abcdef", True, limit=5)
    assert over.count == 7 and over.ids is None
    fits = await work.encode("abcdef", True, limit=7)
    assert fits.count == 7 and fits.ids == FakeTokenizer().encode("abcdef")
    work.shutdown()


async def test_errors_of_the_tokenizer_reach_the_caller():
    work = TokenizerWork(FakeTokenizer(), inline_chars=0)
    with pytest.raises(UnicodeEncodeError):
        await work.encode("lone surrogate \ud800" * 10, True)
    work.shutdown()


@pytest.mark.parametrize("strs", [False, True])
async def test_the_tokenize_body_renders_in_chunks_as_plain_json(tiny_tokenizer, strs):
    work = TokenizerWork(tiny_tokenizer)
    text = _random_text(random.Random(1), 2 * JSON_CHUNK)       # byte tokens: several JSON chunks
    body = json.loads(await work.tokenize_json(text, True, 4096, strs))
    ids = tiny_tokenizer.encode(text)
    assert len(ids) > 2 * JSON_CHUNK
    assert body == {"count": len(ids), "max_model_len": 4096, "tokens": ids,
                    "token_strs": tiny_tokenizer.convert_ids_to_tokens(ids) if strs else None}
    work.shutdown()
