"""The real `mtlora-serve` process on 127.0.0.1 and a free port, talked to over loopback; refusals before listening."""

from __future__ import annotations

import httpx
import pytest

from serve_helpers import MTLORA_CFG, read_log_of, serve_process, write_adapter


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    return write_adapter(tmp_path_factory.mktemp("ad") / "moe", tiny_model_dir, **MTLORA_CFG)


COMMON = ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "1MiB", "--log-level", "info"]


def test_served_process_answers_over_loopback(tiny_model_dir, adapter_dir, tmp_path):
    import openai

    (tmp_path / "root").mkdir()
    args = ["--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--served-model-name", "tiny",
            "--api-key", "k3y", "--enable-adapter-loading", "--adapter-root", str(tmp_path / "root"), *COMMON]
    with serve_process(args) as url:
        client = openai.OpenAI(api_key="k3y", base_url=url + "/v1")
        assert [m.id for m in client.models.list().data] == ["tiny", "moe"]
        out = client.completions.create(model="moe", prompt="hi", max_tokens=4, temperature=0, logprobs=1)
        assert out.usage.completion_tokens == 4 and len(out.choices[0].logprobs.tokens) == 4
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=3)
        assert chat.choices[0].finish_reason in ("length", "stop")
        assert httpx.post(url + "/v1/completions", json={"prompt": "a"}).status_code == 401
        assert httpx.post(url + "/tokenize", json={"prompt": "ab"}).status_code == 401   # it would reveal adapters
        key = {"Authorization": "Bearer k3y"}
        tok = httpx.post(url + "/tokenize", json={"prompt": "ab", "add_special_tokens": False}, headers=key).json()
        assert httpx.post(url + "/detokenize", json={"tokens": tok["tokens"]}, headers=key).json()["prompt"] == "ab"
        assert httpx.get(url + "/tokenizer_info").status_code == 200
        metrics = httpx.get(url + "/metrics").text
        assert 'mtlora:requests_total{adapter="moe",finish_reason="length"} 1.0' in metrics


def test_refuses_an_adapter_that_does_not_fit_before_listening(tmp_path, tiny_model_dir):
    from mtlora.testing import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "wider", hidden_size=96, intermediate_size=160)
    wrong = write_adapter(tmp_path / "wrong", other, **dict(MTLORA_CFG, routing_group_size=None))
    proc = read_log_of(["--model", str(tiny_model_dir), "--adapter", f"bad={wrong}", *COMMON])
    assert proc.returncode == 1, proc.stderr
    assert "refusing to start" in proc.stderr and str(wrong) in proc.stderr
    assert "serving on" not in proc.stderr


def test_refuses_a_missing_adapter_dir_with_usage_error(tmp_path):
    proc = read_log_of(["--adapter", f"x={tmp_path / 'nope'}"])
    assert proc.returncode == 2 and "not a directory" in proc.stderr
