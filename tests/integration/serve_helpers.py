"""Helpers for the serving integration tests: random adapters for a model dir, free ports, a served subprocess.

Contract: `write_adapter(dir, model_dir, **config)` writes a valid, non-trivial (all B non-zero) adapter for the
model in `model_dir`; `serve_process(args)` starts `mtlora-serve` on 127.0.0.1 and a free port (HTTPS with
`tls_ca`), waits for /health and yields the base URL, and always stops the process (and reports its log on failure).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from mtlora import inject
from mtlora.checkpoint import save_adapter
from mtlora.config import AdapterConfig

MTLORA_CFG = dict(method="mtlora", rank=4, num_experts=3, placement="both", routing_group_size=32)


def write_adapter(path: Path, model_dir: Path, seed: int = 0, **config) -> Path:
    from transformers import LlamaConfig

    model_config = LlamaConfig.from_pretrained(model_dir)
    cfg = AdapterConfig(**(config or MTLORA_CFG))
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: 0.2 * torch.randn(shape, generator=gen)
               for name, shape in inject.expected_shapes(model_config, cfg).items()}
    return save_adapter(path, cfg, tensors)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    script = Path(sys.executable).with_name("mtlora-serve")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "mtlora_server.cli"]


@contextlib.contextmanager
def serve_process(args: list[str], startup_timeout: float = 120.0, env: dict | None = None,
                  tls_ca: str | None = None):
    """Run mtlora-serve with `args` (plus --host/--port); yield the base URL once /health answers. `tls_ca`: the
    server speaks HTTPS (--ssl-* in `args`); its certificate is verified against this file."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    cmd = serve_command() + args + ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"{'https' if tls_ca else 'http'}://127.0.0.1:{port}"
    verify = ssl.create_default_context(cafile=tls_ca) if tls_ca else True
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mtlora-serve exited with {proc.returncode}:\n{Path(log.name).read_text()}")
            try:
                if httpx.get(url + "/health", timeout=1.0, verify=verify).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mtlora-serve did not come up:\n{Path(log.name).read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.unlink(log.name)


def read_log_of(cmd_args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run mtlora-serve expecting it to exit (e.g. refusing bad input); returns the completed process."""
    return subprocess.run(serve_command() + cmd_args + ["--port", str(free_port())], capture_output=True,
                          text=True, timeout=timeout)


@contextlib.asynccontextmanager
async def served_in_process(model_dir: Path, adapters: dict[str, Path] | None = None):
    """(engine, app, client): the REAL engine on `model_dir` (fp32, CPU, served as "tiny") behind the app, driven
    in-process through httpx's ASGI transport; everything is closed afterwards."""
    from mtlora_server.api import ServerArgs, build_app
    from mtlora_server.engine.args import EngineArgs
    from mtlora_server.engine.engine import Engine

    engine = Engine.from_args(EngineArgs(model=str(model_dir), dtype="float32", device="cpu",
                                         kv_cache_memory=1 << 20, max_num_seqs=16, served_model_name="tiny",
                                         adapters={k: str(v) for k, v in (adapters or {}).items()}))
    await engine.start()
    app = build_app(engine, ServerArgs(served_model_name="tiny"))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)
    try:
        yield engine, app, client
    finally:
        await client.aclose()
        await engine.shutdown()
