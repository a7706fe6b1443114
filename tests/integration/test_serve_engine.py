"""The app over the REAL engine with a tiny random model, in-process: scoring matches transformers, adapters mix
in one batch, disconnects free KV, and the official `openai` client works (completions, chat, streaming, logprobs)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from fakes import disconnect_after_first_body
from mtlora_server.api import ServerArgs, build_app
from serve_helpers import MTLORA_CFG, served_in_process, write_adapter

LORA_CFG = dict(method="lora", rank=4, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("adapters")
    return {"moe": write_adapter(root / "moe", tiny_model_dir, seed=1, **MTLORA_CFG),
            "plain": write_adapter(root / "plain", tiny_model_dir, seed=2, **LORA_CFG)}


@pytest.fixture
async def served(tiny_model_dir, adapter_dirs):
    async with served_in_process(tiny_model_dir, adapter_dirs) as served:
        yield served


async def test_echo_logprobs_match_transformers(served, tiny_model_dir):
    from transformers import LlamaForCausalLM

    _, _, client = served
    ids = [5, 70, 80, 90, 100, 110]
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 0,
                                                   "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    want = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert got[0] is None
    assert got[1:] == pytest.approx(want, abs=1e-4)


async def test_adapters_mix_in_one_batch_and_match_serial_results(served):
    _, _, client = served
    models = ["tiny", "moe", "plain", "moe", "tiny", "plain"]

    async def greedy(model):
        r = await client.post("/v1/completions", json={"model": model, "prompt": "mix", "max_tokens": 8,
                                                       "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    serial = {m: await greedy(m) for m in dict.fromkeys(models)}
    concurrent = await asyncio.gather(*(greedy(m) for m in models))
    assert concurrent == [serial[m] for m in models]
    assert len(set(serial.values())) == 3          # the adapters really change the output


async def test_models_and_metrics_over_the_real_engine(served):
    engine, _, client = served
    data = (await client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in data] == ["tiny", "moe", "plain"]
    await client.post("/v1/completions", json={"model": "moe", "prompt": "route", "max_tokens": 4})
    text = (await client.get("/metrics")).text
    assert 'mtlora:adapter_expert_routing_weight{adapter="moe",expert="2"}' in text
    assert "mtlora:kv_blocks_used 0.0" in text


async def test_shared_prompt_prefix_is_served_from_the_prefix_cache(served):
    """The same 40-token prompt twice under one adapter: both full 16-token blocks before the last token come from
    the cache (echo included: the cached final hidden state of the last one gives the first missing prompt
    logprob); the echo logprobs and greedy tokens equal the first request's."""
    _, _, client = served
    ids = list(range(20, 60))
    body = {"model": "moe", "prompt": ids, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 1}

    def hits(text):
        return float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("mtlora:prefix_cache_hits_total")))

    first = (await client.post("/v1/completions", json=body)).json()["choices"][0]
    before = hits((await client.get("/metrics")).text)
    second = (await client.post("/v1/completions", json=body)).json()["choices"][0]
    assert hits((await client.get("/metrics")).text) - before == 32
    assert second["text"] == first["text"]
    assert second["logprobs"]["token_logprobs"] == pytest.approx(first["logprobs"]["token_logprobs"], abs=1e-5)


async def test_context_overflow_and_bad_token_are_400(served):
    _, _, client = served
    r = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 10_000})
    bad = await client.post("/v1/completions", json={"prompt": [1, 10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


async def test_disconnect_mid_stream_frees_kv(served):
    engine, app, _ = served
    await disconnect_after_first_body(app, "/v1/chat/completions", {
        "model": "moe", "messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "stream": True,
        "stop": [], "temperature": 1.0})
    for _ in range(100):               # the abort is applied by the step thread after its current step
        if engine.stats().kv_blocks_used == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.stats().kv_blocks_used == 0
    assert engine.stats().num_running == 0


async def test_openai_client(served):
    import openai

    _, app, _ = served
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test/v1")
    client = openai.AsyncOpenAI(api_key="unused", base_url="http://test/v1", http_client=http)
    cmpl = await client.completions.create(model="moe", prompt="hello", max_tokens=5, logprobs=2, echo=True,
                                           temperature=0)
    assert cmpl.choices[0].text.startswith("hello") and cmpl.usage.completion_tokens == 5
    assert cmpl.choices[0].logprobs.token_logprobs[0] is None
    assert len(cmpl.choices[0].logprobs.top_logprobs[-1]) >= 1

    chat = await client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}],
                                                max_completion_tokens=6, logprobs=True, top_logprobs=3,
                                                temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 6
    assert all(len(c.top_logprobs) == 3 for c in content)

    pieces = []
    stream = await client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=6, temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    usage = None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == chat.choices[0].message.content
    assert usage.completion_tokens == 6

    text = ""
    async for chunk in await client.completions.create(model="moe", prompt="hello", max_tokens=5, temperature=0,
                                                       stream=True):
        text += chunk.choices[0].text
    assert "hello" + text == cmpl.choices[0].text

    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="missing", prompt="x")
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="moe", prompt="x", max_tokens=100_000)
    await http.aclose()


async def test_full_queue_is_429_with_retry_after(tiny_model_dir):
    from mtlora_server.engine.args import EngineArgs
    from mtlora_server.engine.engine import Engine

    engine = Engine.from_args(EngineArgs(model=str(tiny_model_dir), dtype="float32", device="cpu",
                                         kv_cache_memory=1 << 20, max_num_seqs=1, max_waiting=1))
    await engine.start()
    app = build_app(engine, ServerArgs())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json={"prompt": "q", "max_tokens": 40})
                                        for _ in range(6)))
            after = await c.post("/v1/completions", json={"prompt": "q", "max_tokens": 2})
    finally:
        await engine.shutdown()
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
    rejected = next(r for r in rs if r.status_code == 429)
    assert int(rejected.headers["retry-after"]) >= 1 and rejected.json()["error"]["type"] == "RateLimitError"
    assert after.status_code == 200                     # the server recovers once the queue drains


async def test_every_embedding_row_is_a_valid_prompt_token(served, tiny_model_dir):
    """Token ids are bounded by the model's vocabulary (260 rows), not the tokenizer's length (259 ids)."""
    from transformers import LlamaConfig

    _, _, client = served
    vocab = LlamaConfig.from_pretrained(tiny_model_dir).vocab_size
    ok = await client.post("/v1/completions", json={"prompt": [1, vocab - 1], "max_tokens": 1})
    bad = await client.post("/v1/completions", json={"prompt": [1, vocab], "max_tokens": 1})
    assert ok.status_code == 200, ok.text
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
