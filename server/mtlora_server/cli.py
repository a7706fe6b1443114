"""`mtlora-serve`: load a base model and adapters once, then serve the OpenAI-compatible API with uvicorn.

Contract:
- Every flag is explained by `--help`. `--adapter NAME=PATH` or `--adapter PATH` (named after its folder), repeatable,
  and `--adapter-dir DIR` (every subfolder with an adapter_config.json, named after it) register adapters: any
  number; the first `--max-adapters` are loaded into device slots at start, the others when a request needs them.
- vLLM's flags for the same settings are accepted too (`vllm_flags`: --lora-modules, --max-loras, --dtype half,
  --chat-template, CORS, TLS, ...); the API key is --api-key, else $MTLORA_API_KEY, else $VLLM_API_KEY.
- Everything is loaded and checked *before* the port is opened (for registered adapters beyond --max-adapters: their
  adapter_config.json; their tensors on first use): a missing adapter directory, an invalid value or an
  adapter that does not fit the base model ends the process with exit status 2 (usage) or 1 (load failure) and
  a message naming the flag, file or field at fault.
- Startup logs the base model, each adapter (method, experts, rank, parameter count) and the memory in use.
- SIGTERM / SIGINT shut down gracefully (`server.EngineServer`): new requests get 503, running ones may finish for
  up to `--shutdown-timeout` seconds, the rest are aborted (streams still end with a finish_reason and
  `data: [DONE]`); the exit status is then 0. When the engine dies (repeated step failures) the process exits with
  status 3 (`EXIT_ENGINE_DIED`) so that its supervisor restarts it.
- Testing hook: `MTLORA_TEST_FAULTS=forward` (or sample, detokenize; comma-separated) makes every such engine step
  raise (engine/faults.py); never set it in production.
"""

from __future__ import annotations

import argparse
import logging
import re
import resource
import sys
from pathlib import Path

from mtlora.errors import MtloraError
from mtlora_server import vllm_flags
from mtlora_server.api.limits import DEFAULT_MAX_REQUEST_BODY_SIZE

logger = logging.getLogger("mtlora_server.cli")

DEFAULT_MAX_ADAPTERS = 8
SHUTDOWN_FLUSH_S = 5          # after the drain: how long uvicorn waits for the last responses to be written

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:[eE]\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648, '512MB' -> 512000000, '1e9' -> 10**9 (KB/MB/GB decimal; K/KiB, M/MiB, G/GiB binary)."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").upper() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 2GiB, 512MB or a number of bytes")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be at least 1 byte")
    return value


def _size_or_zero(text: str) -> int:
    """parse_size, and 0 (e.g. --adapter-cache-size 0: off)."""
    return 0 if text.strip() == "0" else parse_size(text)


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """['math=/a/b', '/c/code'] -> {'math': '/a/b', 'code': '/c/code'}; errors name the --adapter value."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or not name:      # a bare path (which may itself contain '=')
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=PATH or PATH")
        vllm_flags.add_adapter(adapters, "--adapter", spec, name, path)
    return adapters


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtlora-serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="OpenAI-compatible server for mtLoRA / HydraLoRA / LoRA adapters over one base model. Each "
                    "request's `model` picks an adapter (or the base); one batch mixes them.")
    p.add_argument("--model", default=None, help="Base model: a local Hugging Face directory or a hub id. "
                   "Default: the embedded default base model.")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH|PATH",
                   help="Adapter directory to serve under NAME (or under its folder name); repeatable. Native "
                        "mtlora adapters, Hugging Face PEFT LoRA adapters and official mtLoRA checkpoints are "
                        "detected and accepted (docs/checkpoint-format.md).")
    p.add_argument("--engine", choices=["native", "vllm"], default="native",
                   help="native: mtlora's engine (many adapters of any method in one batch); vllm: vLLM's OpenAI "
                        "server for ONE mtlora adapter, with --tensor-parallel-size (docs/vllm-backend.md).")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on.")
    p.add_argument("--dtype", default="auto", choices=vllm_flags.DTYPE_CHOICES,
                   help="Weight/activation dtype; auto: bfloat16 where the hardware has fast bf16, else float32 "
                        "(half = float16, float = float32, as vLLM spells them).")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N.")
    p.add_argument("--api-key", default=None,
                   help="Require 'Authorization: Bearer KEY' on /v1/* routes (default: $MTLORA_API_KEY, else "
                        "$VLLM_API_KEY; neither set: open).")
    p.add_argument("--served-model-name", default=None,
                   help="Name of the bare base model in the API (default: the model folder's name).")
    p.add_argument("--max-num-seqs", type=positive_int, default=64, help="Sequences decoded at once.")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="Context length (prompt + completion); default: the model's max_position_embeddings.")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=2048,
                   help="Tokens per engine step (prefill chunks + decodes).")
    p.add_argument("--kv-cache-memory", type=parse_size, default=None,
                   help="Memory for the KV cache, e.g. 2GiB or 512MB (default: 1 GiB on CPU, most free GPU memory).")
    p.add_argument("--block-size", type=positive_int, default=16, help="Tokens per KV cache block.")
    p.add_argument("--max-adapters", type=positive_int, default=DEFAULT_MAX_ADAPTERS,
                   help="Adapter slots: adapters resident on the device at once. Any number can be registered; a "
                        "request for one that is not resident waits while it is brought in (least recently used "
                        "idle adapter evicted).")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="Register every subfolder of DIR that holds an adapter_config.json, named after the "
                        "subfolder; repeatable.")
    p.add_argument("--adapter-cache-size", type=_size_or_zero, default=2 << 30, metavar="SIZE",
                   help="Host memory for validated adapter tensors (LRU, pinned on CUDA) so an evicted adapter "
                        "comes back with a copy instead of a disk read, e.g. 4GiB; 0 turns the cache off. On CPU "
                        "with the adapter kernel an entry also holds the kernel's layout (twice the file size).")
    p.add_argument("--preload-adapters", action="store_true",
                   help="At start-up, read every registered adapter that gets no slot into the host cache (in "
                        "registration order, while it fits in --adapter-cache-size), so no request waits on a disk "
                        "read and no load competes with the steps. Start-up takes ~10-40 ms per adapter longer.")
    p.add_argument("--max-lora-rank", type=positive_int, default=16, help="Largest adapter rank a slot holds.")
    p.add_argument("--max-experts", type=positive_int, default=16, help="Largest number of experts a slot holds.")
    p.add_argument("--max-groups", type=positive_int, default=4, help="Largest number of routing groups a slot holds.")
    p.add_argument("--max-waiting", type=positive_int, default=1024,
                   help="Queued sequences before new requests get 429 + Retry-After.")
    p.add_argument("--seed", type=int, default=0, help="Seed for requests that bring no seed of their own.")
    p.add_argument("--enforce-eager", action="store_true",
                   help="Run every step eagerly: no CUDA graphs, no torch.compile (overrides --decode-graphs).")
    p.add_argument("--decode-graphs", default="auto", choices=["auto", "cudagraph", "compile", "static"],
                   help="Native engine: how decode-only steps run (prefill is always eager): from static buffers at bucketed "
                        "batch sizes (1, 2, 4, ..., --max-num-seqs), replayed as CUDA graphs (cudagraph), "
                        "compiled per layer with torch.compile (compile, CPU; seconds of compile per batch size "
                        "on first use) or run eagerly from the static buffers (static). auto: cudagraph on CUDA, "
                        "plain eager on CPU, where compile measured slower (docs/serving.md).")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="Reuse the KV blocks of prompt prefixes computed before (few-shot prompts, shared system "
                        "prompts, n > 1); --no-enable-prefix-caching recomputes every prompt.")
    p.add_argument("--batch-invariant", action="store_true",
                   help="Batch-invariant numerics: a greedy or seeded request gets bit-identical tokens and "
                        "logprobs whatever else is in its batch, however its prompt is chunked and whether its "
                        "prefix came from the cache (docs/serving.md). Costs some speed; recommended for "
                        "reproducible evaluation scores.")
    p.add_argument("--cpu-attention", default="auto", choices=["auto", "kernel", "torch"],
                   help="Native engine on CPU: how decode attention reads the paged KV cache. kernel: a small C++ "
                        "kernel reads keys and values in place (built with the system C++ compiler on first use, "
                        "~40 s once per machine, cached; fails at start-up if it cannot be built); torch: gathers "
                        "them into a dense copy per layer and uses torch ops; auto: the kernel when it builds, "
                        "else torch (logged). Batch-invariant mode always uses its own attention.")
    p.add_argument("--cpu-adapters", default="auto", choices=["auto", "kernel", "torch"],
                   help="Native engine on CPU: how the adapter work of decode-sized slots (a few rows each) runs. "
                        "kernel: one C++ call per layer and site group for all of them (built on first use like "
                        "--cpu-attention's kernel; fails at start-up if it cannot be built); torch: torch ops per "
                        "slot (same-shape slots stacked); auto: the kernel when it builds, else torch (logged). "
                        "Batch-invariant mode uses the torch ops.")
    p.add_argument("--cpu-fused-ops", default="auto", choices=["auto", "kernel", "torch"],
                   help="Native engine on CPU: RMSNorm after the residual add, silu(gate) * up and rotary embedding. "
                        "kernel: one C++ pass over each row per function (built on first use like --cpu-attention's "
                        "kernel; fails at start-up if it cannot be built); torch: several torch ops each; auto: the "
                        "kernel when it builds, else torch (logged). Same numbers, rounding included. "
                        "Batch-invariant mode and compiled / static decode keep the torch ops.")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="Let chat requests with tools use tool_choice 'auto' (the default with tools): the model's "
                        "free output is read with --tool-call-parser and calls found become tool_calls. Named and "
                        "'required' tool choices need neither flag (they are grammar-constrained).")
    p.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                   help="How tool calls are read from the output for tool_choice 'auto': hermes "
                        "(<tool_call>{...}</tool_call> blocks: Qwen, Hermes, SmolLM3, ...) or llama3_json "
                        "({\"name\": ..., \"parameters\": ...}). Needed by --enable-auto-tool-choice.")
    p.add_argument("--enable-adapter-loading", action="store_true",
                   help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --adapter-root).")
    p.add_argument("--adapter-root", default=None,
                   help="Only adapter directories inside this folder (symlinks resolved) may be loaded at runtime.")
    p.add_argument("--max-request-body-size", type=parse_size, default=DEFAULT_MAX_REQUEST_BODY_SIZE,
                   metavar="SIZE",
                   help="Largest HTTP request body accepted, e.g. 8MiB or 20MB; bigger ones get 413 before they are "
                        "read or parsed. The default holds e.g. 64 prompts of 8192 token ids; JSON parsing "
                        "of a body runs on the event loop (~5 ms per MB of text), so raise it with care. Native engine "
                        "only (--engine vllm has no such limit).")
    p.add_argument("--shutdown-timeout", type=_seconds, default=20.0, metavar="SECONDS",
                   help="Graceful shutdown on SIGTERM/SIGINT: new requests get 503 at once, running requests may "
                        "finish for up to SECONDS, then the rest are aborted (streams end with finish_reason "
                        "'abort' and [DONE]; non-streaming requests get their JSON). Exit status 0. Keep it a few "
                        "seconds below the supervisor's grace period (Kubernetes terminationGracePeriodSeconds, "
                        "compose stop_grace_period). If the engine dies instead, the exit status is 3. Native engine only.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="Logging verbosity.")
    vllm_flags.add_arguments(p)
    from mtlora_server.vllm_backend import add_arguments as add_vllm_arguments

    add_vllm_arguments(p)
    return p


def _check_args(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> dict[str, str]:
    if ns.enable_adapter_loading and not ns.adapter_root:
        parser.error("--enable-adapter-loading needs --adapter-root DIR")
    if ns.enable_auto_tool_choice and not ns.tool_call_parser:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser NAME")
    if ns.adapter_root and not Path(ns.adapter_root).is_dir():
        parser.error(f"--adapter-root {ns.adapter_root}: not a directory")
    if not 0 <= ns.port <= 65535:
        parser.error(f"--port {ns.port}: must be in [0, 65535]")
    lora_modules = vllm_flags.apply(parser, ns, DEFAULT_MAX_ADAPTERS)
    try:
        adapters = parse_adapters(ns.adapter)
        for folder in ns.adapter_dir:
            from mtlora_server.engine.adapter_registry import scan_adapter_dir

            for name, path in scan_adapter_dir(folder).items():
                if name in adapters:
                    raise ValueError(f"--adapter-dir {folder}: the name {name!r} is used twice")
                adapters[name] = path
    except ValueError as exc:
        parser.error(str(exc))
    for name, path in lora_modules.items():
        if name in adapters:
            parser.error(f"--lora-modules {name}={path}: the name {name!r} is also given by --adapter")
        adapters[name] = path
    return adapters


def engine_args_from(ns: argparse.Namespace, adapters: dict[str, str]):
    from mtlora_server.engine.args import EngineArgs

    return EngineArgs(model=ns.model, dtype=ns.dtype, device=ns.device, max_num_seqs=ns.max_num_seqs,
                      max_model_len=ns.max_model_len, max_num_batched_tokens=ns.max_num_batched_tokens,
                      kv_cache_memory=ns.kv_cache_memory, block_size=ns.block_size, max_adapters=ns.max_adapters,
                      max_lora_rank=ns.max_lora_rank, max_experts=ns.max_experts, max_groups=ns.max_groups,
                      adapters=adapters, served_model_name=ns.served_model_name, max_waiting=ns.max_waiting,
                      adapter_cache_size=ns.adapter_cache_size, preload_adapters=ns.preload_adapters,
                      seed=ns.seed, enforce_eager=ns.enforce_eager, decode_graphs=ns.decode_graphs,
                      enable_prefix_caching=ns.enable_prefix_caching, batch_invariant=ns.batch_invariant,
                      gpu_memory_utilization=ns.gpu_memory_utilization, cpu_attention=ns.cpu_attention,
                      cpu_adapters=ns.cpu_adapters, cpu_fused_ops=ns.cpu_fused_ops)


def _memory_summary() -> str:
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB
    parts = [f"peak process RSS {rss_mib:.0f} MiB"]
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            parts.append(f"CUDA allocated {torch.cuda.memory_allocated() / 2**20:.0f} MiB")
    except ImportError:
        pass
    return ", ".join(parts)


def log_startup(engine) -> None:
    stats = engine.stats()
    logger.info("base model %s: context %d tokens, KV pool %d blocks", engine.base_model_name,
                engine.max_model_len, stats.kv_blocks_total)
    for info in engine.list_adapters():
        logger.info("adapter %s: %s, %d experts, rank %d, %s parameters (%s)", info.name, info.method,
                    info.num_experts, info.rank, f"{info.num_parameters:,}", info.path)
    logger.info("memory: %s", _memory_summary())


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, str]]:
    """Parsed and checked flags (vLLM's folded in, the API key resolved) and the adapters to load; exits with
    status 2 on a bad flag."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    adapters = _check_args(parser, ns)
    ns.api_key = ns.api_key or vllm_flags.api_key_from_env()   # not a parser default: --help would show it
    return ns, adapters


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(request_tag)s%(message)s")
    from mtlora_server.api.app import RequestIdLogFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdLogFilter())       # "[<X-Request-Id>] " on lines logged while serving one


def main(argv: list[str] | None = None) -> int:
    ns, adapters = parse_args(argv)
    _setup_logging(ns.log_level)
    if ns.engine == "vllm":
        from mtlora_server.vllm_backend import serve

        return serve(ns)
    try:
        from mtlora_server.engine import faults
        from mtlora_server.engine.engine import Engine

        faults.arm_from_env()

        engine_args = engine_args_from(ns, adapters)
        engine = Engine.from_args(engine_args)
    except MtloraError as exc:
        logger.error("refusing to start: %s", exc)
        return 1
    if ns.chat_template_text is not None:
        engine.tokenizer.chat_template = ns.chat_template_text     # every route renders with the tokenizer's
        logger.info("chat template from --chat-template (%d characters)", len(ns.chat_template_text))
    vllm_flags.log_notes(ns, engine.core.device.type)
    log_startup(engine)

    import uvicorn

    from mtlora_server.api import ServerArgs, build_app
    from mtlora_server.server import EXIT_ENGINE_DIED, EngineServer

    server_args = ServerArgs(served_model_name=ns.served_model_name, api_key=ns.api_key,
                             enable_adapter_loading=ns.enable_adapter_loading, adapter_root=ns.adapter_root,
                             max_request_body_size=ns.max_request_body_size, allowed_origins=ns.allowed_origins,
                             allow_credentials=ns.allow_credentials, allowed_methods=ns.allowed_methods,
                             allowed_headers=ns.allowed_headers,
                             enable_auto_tool_choice=ns.enable_auto_tool_choice, tool_call_parser=ns.tool_call_parser)
    app = build_app(engine, server_args, manage_engine=True)
    logger.info("serving on %s://%s:%d (API key %s, CORS origins %s)", "https" if ns.ssl_certfile else "http",
                ns.host, ns.port, "required" if ns.api_key else "off", ns.allowed_origins or "none")
    # uvicorn's graceful timeout starts after the engine's drain (EngineServer.shutdown): it only bounds the writing
    # of the last chunks, so the whole shutdown takes at most --shutdown-timeout + ABORT_GRACE_S + this.
    config = uvicorn.Config(app, host=ns.host, port=ns.port, log_level=ns.uvicorn_log_level or ns.log_level,
                            timeout_graceful_shutdown=SHUTDOWN_FLUSH_S, ssl_keyfile=ns.ssl_keyfile,
                            ssl_certfile=ns.ssl_certfile, ssl_ca_certs=ns.ssl_ca_certs,
                            ssl_cert_reqs=ns.ssl_cert_reqs)
    server = EngineServer(config, engine, ns.shutdown_timeout)
    server.run()
    if server.engine_died or engine.dead:             # engine.dead: it died during the drain
        return EXIT_ENGINE_DIED
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
