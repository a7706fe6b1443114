"""A real `mtlora-serve` process serves PEFT LoRA adapters written by the `peft` library: at startup
(`--adapter name=DIR`) and through POST /v1/load_lora_adapter, with peft's own PeftModel logprobs, next to a native
mtlora adapter; a PEFT adapter with a refused field is a 400 naming the field and the server carries on."""

from __future__ import annotations

import json
import shutil

import httpx
import torch

from peft_helpers import PEFT_CASES, peft_logits, write_peft_adapter
from serve_helpers import MTLORA_CFG, serve_process, write_adapter

COMMON = ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "1MiB", "--log-level", "info"]
IDS = torch.randint(3, 259, (21,), generator=torch.Generator().manual_seed(9)).tolist()


def _echo_logprobs(url: str, model: str) -> torch.Tensor:
    body = {"model": model, "prompt": IDS, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 0}
    res = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert res.status_code == 200, res.text
    lps = res.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert lps[0] is None and len(lps) == len(IDS) + 1
    return torch.tensor(lps[1:len(IDS)])


def _want(model_dir, adapter) -> torch.Tensor:
    logp = torch.log_softmax(peft_logits(model_dir, adapter, IDS), -1)
    return torch.stack([logp[t - 1, IDS[t]] for t in range(1, len(IDS))])


def test_serves_peft_adapters_at_startup_and_dynamically(tiny_model_dir, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    startup = write_peft_adapter(tmp_path / "peft", tiny_model_dir, seed=1, **PEFT_CASES["rank-alpha-pattern"])
    dynamic = write_peft_adapter(root / "dyn", tiny_model_dir, seed=2, **PEFT_CASES["layers-to-transform"])
    refused = root / "dora"
    shutil.copytree(dynamic, refused)
    cfg = json.loads((refused / "adapter_config.json").read_text())
    (refused / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    moe = write_adapter(tmp_path / "moe", tiny_model_dir, **MTLORA_CFG)
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--adapter", f"peft={startup}",
            "--adapter", f"moe={moe}", "--enable-adapter-loading", "--adapter-root", str(root), *COMMON]
    with serve_process(args) as url:
        torch.testing.assert_close(_echo_logprobs(url, "peft"), _want(tiny_model_dir, startup), atol=1e-4, rtol=0)
        res = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "dyn", "lora_path": "dyn"}, timeout=60)
        assert res.status_code == 200, res.text
        torch.testing.assert_close(_echo_logprobs(url, "dyn"), _want(tiny_model_dir, dynamic), atol=1e-4, rtol=0)
        res = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "dora", "lora_path": "dora"}, timeout=60)
        assert res.status_code == 400 and "use_dora" in res.json()["error"]["message"], res.text
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert models == ["tiny", "peft", "moe", "dyn"]
        _echo_logprobs(url, "moe")                      # the native adapter still serves next to them
