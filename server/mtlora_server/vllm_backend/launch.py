"""`mtlora-serve --engine vllm`: serve ONE mtlora adapter with vLLM's OpenAI server (the adapter is part of the model).

Contract:
- `add_arguments(parser)` adds the vLLM-only flags (`--vllm-python`, `--tensor-parallel-size`, `--vllm-arg`) to
  mtlora-serve's parser; it is idempotent.
- `serve(args) -> int` takes mtlora-serve's parsed namespace. Before anything starts it checks, in this process:
  exactly one `--adapter`; the base model resolves (`mtlora.base.resolve_model`); the adapter loads and fits the
  base (`load_adapter` with the base config: shapes, values, fingerprint) and is block level (`method: mtlora`);
  the tensor-parallel size divides the attention heads; the vLLM interpreter exists, has vLLM and has this
  package's `vllm.general_plugins` entry point. Any failure: an error naming the flag / file / field and exit
  status 1, nothing launched. Native-only flags that cannot be honoured (`--enable-adapter-loading`) are refused.
- Then it runs `VLLM_PYTHON -m vllm.entrypoints.openai.api_server` with `--hf-overrides` selecting
  `MtloraLlamaForCausalLM` and the adapter path, forwards SIGINT/SIGTERM to it, waits, and returns its status.
  The served model name is `--served-model-name` or the adapter's name. The API key goes through the environment
  (`VLLM_API_KEY`), never the command line, so it does not show in `ps`.
- `build_command(args, model_dir, adapter_path, served_name)` is the pure part (tested without vLLM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from mtlora.errors import ConfigError, MtloraError

from .plugin import ARCHITECTURE

logger = logging.getLogger("mtlora_server.vllm_backend")

ENTRY_POINT_GROUP = "vllm.general_plugins"
# Run inside the vLLM interpreter: is vLLM importable (without importing it: that takes seconds), and is our plugin
# declared there? Prints one JSON line.
_PROBE = (
    "import importlib.metadata as m, importlib.util as u, json; "
    "eps = [e.value for e in m.entry_points(group=%r)]; "
    "print(json.dumps({'vllm': u.find_spec('vllm') is not None, 'plugins': eps}))" % ENTRY_POINT_GROUP
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `--engine vllm` flags to mtlora-serve's parser (no-op when already there)."""
    if "--vllm-python" in parser._option_string_actions:   # argparse offers no public "has option" query
        return parser
    group = parser.add_argument_group("vLLM engine (--engine vllm)")
    group.add_argument("--vllm-python", default=None, metavar="PATH",
                       help="Python interpreter of the environment where vLLM and mtlora (pip install --no-deps -e "
                            "<mtlora checkout>) are installed. Default: $MTLORA_VLLM_PYTHON, else this interpreter.")
    group.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                       help="vLLM tensor parallelism: shard the base model over N devices (the adapter is "
                            "replicated on each).")
    group.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                       help="Extra argument passed verbatim to vLLM's OpenAI server, e.g. "
                            "--vllm-arg=--gpu-memory-utilization=0.8; repeatable.")
    return parser


def vllm_python(args: argparse.Namespace) -> str:
    return getattr(args, "vllm_python", None) or os.environ.get("MTLORA_VLLM_PYTHON") or sys.executable


def build_command(args: argparse.Namespace, model_dir: str, adapter_path: str, served_name: str) -> list[str]:
    """The vLLM OpenAI-server command line for these mtlora-serve arguments."""
    overrides = {"architectures": [ARCHITECTURE], "mtlora_adapter": str(Path(adapter_path).resolve())}
    cmd = [vllm_python(args), "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(model_dir), "--served-model-name", served_name,
           "--hf-overrides", json.dumps(overrides),
           "--host", str(getattr(args, "host", "127.0.0.1")), "--port", str(getattr(args, "port", 8000)),
           "--dtype", getattr(args, "dtype", "auto"),
           "--tensor-parallel-size", str(getattr(args, "tensor_parallel_size", 1)),
           "--seed", str(getattr(args, "seed", 0)),
           "--max-num-seqs", str(getattr(args, "max_num_seqs", 64)),
           "--uvicorn-log-level", getattr(args, "uvicorn_log_level", None) or getattr(args, "log_level", "info")]
    # --block-size is not forwarded: mtlora-serve always sets it (default 16) and vLLM's attention backends need
    # their own (the CPU one a multiple of 32); pass --vllm-arg=--block-size=N to choose it.
    optional = [("--max-model-len", "max_model_len"), ("--max-num-batched-tokens", "max_num_batched_tokens"),
                ("--kv-cache-memory-bytes", "kv_cache_memory"),
                # vLLM's own flags, given to mtlora-serve (mtlora_server.vllm_flags): passed on as they came
                ("--gpu-memory-utilization", "gpu_memory_utilization"), ("--chat-template", "chat_template"),
                ("--ssl-keyfile", "ssl_keyfile"), ("--ssl-certfile", "ssl_certfile"),
                ("--ssl-ca-certs", "ssl_ca_certs")]
    for flag, attr in optional:
        if getattr(args, attr, None) is not None:
            cmd += [flag, str(getattr(args, attr))]
    if getattr(args, "ssl_cert_reqs", 0):
        cmd += ["--ssl-cert-reqs", str(args.ssl_cert_reqs)]
    if getattr(args, "allowed_origins", None) is not None:       # also [], or vLLM would allow every origin
        cmd += ["--allowed-origins", json.dumps(args.allowed_origins),
                "--allowed-methods", json.dumps(args.allowed_methods),
                "--allowed-headers", json.dumps(args.allowed_headers)]
        if args.allow_credentials:
            cmd.append("--allow-credentials")
    if getattr(args, "enforce_eager", False):
        cmd.append("--enforce-eager")
    return cmd + list(getattr(args, "vllm_arg", None) or [])


def _single_adapter(args: argparse.Namespace) -> tuple[str, str]:
    from mtlora_server.cli import parse_adapters

    try:
        adapters = parse_adapters(list(getattr(args, "adapter", None) or []))
    except ValueError as exc:
        raise ConfigError(str(exc), field="--adapter") from None
    if len(adapters) != 1:
        raise ConfigError(f"--engine vllm serves exactly one adapter (it becomes part of the model); got "
                          f"{len(adapters)}: use the native engine to mix adapters", field="--adapter")
    return next(iter(adapters.items()))


def check_inputs(args: argparse.Namespace) -> tuple[Path, str, str]:
    """Validate everything in this process; returns (model_dir, adapter_name, adapter_path)."""
    from mtlora.base import load_config, resolve_model
    from mtlora.checkpoint import load_adapter

    if getattr(args, "enable_adapter_loading", False):
        raise ConfigError("--enable-adapter-loading is not available with --engine vllm (one adapter, built "
                          "into the model)", field="--enable-adapter-loading")
    name, path = _single_adapter(args)
    model_dir = resolve_model(getattr(args, "model", None))
    model_config = load_config(model_dir)
    config, _ = load_adapter(path, model_config=model_config)
    if config.method != "mtlora":
        raise ConfigError(f"{path}: --engine vllm serves block-level adapters (method 'mtlora') only, got "
                          f"{config.method!r}; serve it with the native engine", field="method")
    tp = getattr(args, "tensor_parallel_size", 1)
    heads = model_config.num_attention_heads
    if tp < 1 or heads % tp:
        raise ConfigError(f"--tensor-parallel-size {tp} must be a positive divisor of the model's "
                          f"{heads} attention heads", field="--tensor-parallel-size")
    logger.info("vLLM backend: base %s, adapter %s (%s, %d experts, rank %d, placement %s)", model_dir, path,
                config.method, config.num_experts, config.rank, config.placement)
    return Path(model_dir), name, path


def check_vllm_python(python: str) -> None:
    """The interpreter exists, imports vLLM, and declares our plugin; errors name --vllm-python."""
    if not (Path(python).is_file() and os.access(python, os.X_OK)):
        raise ConfigError(f"--vllm-python {python}: no such executable (set --vllm-python or MTLORA_VLLM_PYTHON "
                          "to the python of a vLLM environment)", field="--vllm-python")
    try:
        # cwd "/": from a checkout, the source tree's mtlora.egg-info would otherwise answer for the venv.
        res = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=60, cwd="/")
        info = json.loads(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        raise ConfigError(f"--vllm-python {python}: could not be probed", field="--vllm-python") from None
    if not info["vllm"]:
        raise ConfigError(f"--vllm-python {python}: vLLM is not installed there", field="--vllm-python")
    if not any(v.startswith("mtlora_server.vllm_backend") for v in info["plugins"]):
        checkout = Path(__file__).resolve().parents[3]
        raise ConfigError(f"--vllm-python {python}: mtlora's vLLM plugin is not installed there; run "
                          f"`{python} -m pip install --no-deps -e {checkout}`", field="--vllm-python")


def serve(args: argparse.Namespace) -> int:
    """Validate, then run vLLM's OpenAI server as a child process until it exits; returns its exit status."""
    try:
        model_dir, name, adapter_path = check_inputs(args)
        python = vllm_python(args)
        check_vllm_python(python)
    except MtloraError as exc:
        logger.error("refusing to start: %s", exc)
        return 1
    cmd = build_command(args, str(model_dir), adapter_path, getattr(args, "served_model_name", None) or name)
    env = dict(os.environ)
    if getattr(args, "api_key", None):
        env["VLLM_API_KEY"] = args.api_key
    logger.info("starting vLLM: %s", shlex.join(cmd))
    child = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
