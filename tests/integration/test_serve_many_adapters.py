"""A real `mtlora-serve` with more registered adapters than slots (--adapter-dir, --max-adapters 2): /v1/models
lists them all, concurrent requests over every adapter get the all-resident answers while adapters are loaded and
unloaded over HTTP, a corrupt adapter fails only its own requests (500 naming it), and /metrics counts the swaps."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from mtlora_server.engine.core import EngineCore
from mtlora_server.engine.testing import TINY_ADAPTERS, run_to_completion, tiny_engine_args
from mtlora_server.engine.types import GenerationRequest, SamplingParams
from serve_helpers import serve_process, write_adapter

KINDS = list(TINY_ADAPTERS)


def _prompt(i: int) -> list[int]:
    return torch.randint(3, 200, (6 + i % 5,), generator=torch.Generator().manual_seed(i)).tolist()


def test_many_adapters_through_two_slots(tmp_path, tiny_model_dir):
    adapter_dir, root = tmp_path / "registered", tmp_path / "root"
    paths = {f"t{i}": write_adapter(adapter_dir / f"t{i}", tiny_model_dir, seed=i, **TINY_ADAPTERS[KINDS[i % 5]])
             for i in range(5)}
    paths["late"] = write_adapter(root / "late", tiny_model_dir, seed=9, **TINY_ADAPTERS["hydra"])
    shutil.copytree(paths["t1"], adapter_dir / "zbroken")
    (adapter_dir / "zbroken" / "adapter_model.safetensors").write_bytes(b"\0" * 64)      # config fine, weights not
    jobs = [(f"r{i}", name, _prompt(i)) for i, name in enumerate(["t0", "t1", "t2", "t3", "t4", "late"] * 3)]

    reference = EngineCore(tiny_engine_args(tiny_model_dir, adapters={k: str(v) for k, v in paths.items()}))
    want = run_to_completion(reference, [
        GenerationRequest(rid, ids, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), adapter=name)
        for rid, name, ids in jobs])

    args = ["--model", str(tiny_model_dir), "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "4MiB",
            "--adapter-dir", str(adapter_dir), "--max-adapters", "2", "--adapter-cache-size", "0",
            "--enable-adapter-loading", "--adapter-root", str(root), "--max-groups", "8"]
    with serve_process(args) as url, httpx.Client(base_url=url, timeout=120) as client:
        models = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert {"t0", "t1", "t2", "t3", "t4", "zbroken"} <= models

        def complete(job):
            rid, name, ids = job
            r = client.post("/v1/completions", json={"model": name, "prompt": ids, "max_tokens": 5,
                                                     "temperature": 0, "ignore_eos": True, "logprobs": 0})
            return rid, r

        with ThreadPoolExecutor(8) as pool:
            first = list(pool.map(complete, [j for j in jobs if j[1] != "late"][:6]))
            load = client.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "late"})
            assert load.status_code == 200, load.text
            rest = list(pool.map(complete, [j for j in jobs if j[1] != "late"][6:] + [j for j in jobs
                                                                                      if j[1] == "late"]))
            broken = [pool.submit(client.post, "/v1/completions",
                                  json={"model": "zbroken", "prompt": [5, 6, 7], "max_tokens": 2})
                      for _ in range(2)]
            unload = client.post("/v1/unload_lora_adapter", json={"lora_name": "t0"})
        for rid, r in first + rest:
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["text"]
            assert text == want[rid].text[0], rid
        for fut in broken:
            r = fut.result()
            message = r.json()["error"]["message"]
            assert r.status_code == 500 and "'zbroken' could not be loaded" in message
            assert "corrupt or truncated" in message and str(tmp_path) not in message     # no server paths
        assert unload.status_code == 200, unload.text
        models = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert "t0" not in models and "late" in models
        after = client.post("/v1/completions", json={"model": "t3", "prompt": _prompt(3), "max_tokens": 5,
                                                     "temperature": 0, "ignore_eos": True})
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == want["r3"].text[0]
        metrics = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                   for line in client.get("/metrics").text.splitlines() if line and not line.startswith("#")}
    assert metrics["mtlora:adapters_registered"] == 6 and metrics["mtlora:adapters_resident"] <= 2
    assert metrics["mtlora:adapter_evictions_total"] > 0 and metrics["mtlora:adapter_load_failures_total"] == 1
    assert metrics["mtlora:adapter_wait_seconds_count"] > 0
