"""Drop-in for vLLM's OpenAI server (issue 14 items 5-7) over the REAL engine:
- in-process: usage.prompt_tokens_details.cached_tokens on a repeated prompt, the queue-time and e2e histograms,
  text_offset with a tokenizer that adds a BOS (the tiny model's tokenizer given a BOS post-processor);
- a real `mtlora-serve` process started with a vLLM launch line: TLS with a self-signed certificate over
  loopback, CORS preflight, VLLM_API_KEY, --lora-modules, --chat-template, X-Request-Id, /version."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess

import httpx
import pytest

import mtlora
from mtlora_server.api import ServerArgs, build_app
from serve_helpers import MTLORA_CFG, serve_process, write_adapter

PROMPT = "the quick brown fox jumps over the lazy dog, twice"      # 50 bytes: 51 tokens with the BOS


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model whose tokenizer prepends <s> to every text (as LLaMA's and Mistral's do)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("bos") / "tiny-bos"
    shutil.copytree(tiny_model_dir, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).encode("ab") == [1, 100, 101]
    return path


@pytest.fixture
async def client(bos_model_dir):
    from mtlora_server.engine.engine import Engine
    from mtlora_server.engine.testing import tiny_engine_args

    engine = Engine.from_args(tiny_engine_args(bos_model_dir, served_model_name="tiny"))
    await engine.start()
    app = build_app(engine, ServerArgs(served_model_name="tiny"))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)
    try:
        yield http
    finally:
        await http.aclose()
        await engine.shutdown()


async def test_cached_tokens_count_the_prefix_cache_hits_of_a_repeated_prompt(client):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    first = (await client.post("/v1/completions", json=body)).json()["usage"]
    second = (await client.post("/v1/completions", json=body)).json()["usage"]
    assert first["prompt_tokens"] == second["prompt_tokens"] == len(PROMPT) + 1
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < second["prompt_tokens"] and cached % 16 == 0         # whole KV blocks of the prompt
    r = await client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    last = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")][-1]
    assert last["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    chat = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}
    (await client.post("/v1/chat/completions", json=chat)).raise_for_status()
    again = (await client.post("/v1/chat/completions", json=chat)).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] > 0


async def test_queue_time_and_e2e_histograms_after_requests(client):
    for _ in range(2):
        (await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})).raise_for_status()
    text = (await client.get("/metrics")).text
    assert 'mtlora:request_queue_time_seconds_count{adapter="tiny"} 2.0' in text
    assert 'mtlora:e2e_request_latency_seconds_count{adapter="tiny"} 2.0' in text


@pytest.mark.parametrize("stream", [False, True])
async def test_text_offset_lines_up_with_the_echoed_prompt_when_the_tokenizer_adds_bos(client, stream):
    body = {"prompt": PROMPT, "max_tokens": 4, "echo": True, "logprobs": 0, "temperature": 0, "stream": stream}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        text = "".join(e["choices"][0]["text"] for e in events)
        tokens = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
        offsets = [o for e in events for o in e["choices"][0]["logprobs"]["text_offset"]]
    else:
        choice = r.json()["choices"][0]
        text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert text.startswith(PROMPT) and tokens[0] == "<s>" and offsets[0] == 0
    prompt_part = list(zip(tokens, offsets))[1:len(PROMPT) + 1]
    assert [text[o:o + len(t)] for t, o in prompt_part] == list(PROMPT)     # before: shifted by len("<s>") = 3
    assert offsets[len(PROMPT) + 1] == len(PROMPT)                            # the completion follows the prompt
    assert offsets == sorted(offsets) and offsets[-1] <= len(text)


# -- a real process started with a vLLM launch line ----------------------------------------------------------------
def _self_signed(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a self-signed certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def test_vllm_launch_line_serves_tls_cors_and_vllm_api_key(tmp_path, tiny_model_dir):
    key, cert = _self_signed(tmp_path)
    adapter = write_adapter(tmp_path / "moe", tiny_model_dir, seed=1, **MTLORA_CFG)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}")
    origin = "https://app.example"
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--kv-cache-memory", "1MiB",
            "--lora-modules", f"moe={adapter}", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
            "--dtype", "float", "--gpu-memory-utilization", "0.9", "--chat-template", str(template),
            "--allowed-origins", json.dumps([origin]), "--uvicorn-log-level", "warning",
            "--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--disable-log-requests"]
    env = {"MTLORA_API_KEY": "", "VLLM_API_KEY": "vllm-key"}
    auth = {"Authorization": "Bearer vllm-key"}
    with serve_process(args, env=env, tls_ca=str(cert)) as url:
        assert url.startswith("https://")
        with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=str(cert)), timeout=60) as http:
            assert http.get("/version").json() == {"version": mtlora.__version__}
            pre = http.options("/v1/chat/completions", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"})
            assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin
            chat = {"model": "moe", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            denied = http.post("/v1/chat/completions", json=chat, headers={"Origin": origin})
            assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == origin
            r = http.post("/v1/chat/completions", json=chat, headers={**auth, "X-Request-Id": "launch-1"})
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"] == "launch-1" and r.json()["id"] == "chatcmpl-launch-1"
            assert [m["id"] for m in http.get("/v1/models", headers=auth).json()["data"]][1:] == ["moe"]
            tokenized = http.post("/tokenize", headers=auth, json={
                "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False}).json()
            assert tokenized["count"] == len("[user:hi]")              # rendered with --chat-template
            assert "mtlora:request_queue_time_seconds_count" in http.get("/metrics").text
        with pytest.raises(httpx.HTTPError):                           # TLS only: plain HTTP gets no answer
            httpx.get(url.replace("https://", "http://") + "/health", timeout=5)
