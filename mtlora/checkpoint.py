"""Native (PEFT-style) adapter checkpoints: one directory with `adapter_config.json` + `adapter_model.safetensors`.

Contract:
- `save_adapter(path, config, tensors)` writes both files into a temporary directory next to `path`, fsyncs them,
  then renames it into place; an existing directory at `path` is swapped out atomically (Linux `renameat2`
  RENAME_EXCHANGE; elsewhere rename-aside-then-rename), so a reader sees the old adapter or the new one, never a mix.
- `load_adapter(path, model_config=None, dtype=None, device="cpu") -> (AdapterConfig, {native name: tensor})`
  detects standard PEFT LoRA adapters (see `mtlora.peft_format`) and checkpoints written by the official mtLoRA
  code (see `mtlora.official`) and converts them into the native layout, then validates
  everything before returning anything: the files exist and parse, the config is valid, every tensor is finite,
  the tensor set and shapes agree with the config (and with `inject.expected_shapes(model_config, config)` when a
  base model config is given), and `base_fingerprint` matches `mtlora.base.config_fingerprint(model_config)` when
  both are known. Every failure is a `CheckpointError`, `IncompatibleAdapterError` or `ConfigError` whose message
  starts with the offending file and names the field or tensor. Nothing is half-loaded: the caller gets a complete,
  validated result or an exception.
- `count_parameters(config, model_config)` is the adapter's parameter count, computed from shapes alone.
Tensor names and shapes are documented in docs/checkpoint-format.md.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from mtlora import inject
from mtlora.config import AdapterConfig
from mtlora.errors import CheckpointError, ConfigError, IncompatibleAdapterError

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Native tensor name: layers.{L}.{site}.{lora_A|lora_B|router}, site e.g. "mlp" or "self_attn.q_proj".
_NATIVE_NAME = re.compile(r"^layers\.(\d+)\.(.+)\.(lora_A|lora_B|router)$")


# -- saving --------------------------------------------------------------------------------------------------------
def save_adapter(path: str | Path, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Atomically write `config` and `tensors` (native names) as an adapter directory at `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError("exists and is not a directory; refusing to replace a file", path=str(path))
    _check_tensors(config, tensors, f"<tensors for {path}>")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        cfg_file = tmp / CONFIG_NAME
        cfg_file.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        # safetensors wants contiguous CPU tensors that do not share storage.
        plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(plain, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "mtlora_format_version":
                                                             str(config.format_version)})
        for f in (cfg_file, tmp / WEIGHTS_NAME):
            _fsync(f)
        _fsync(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(path.parent)
    logger.info("saved %s adapter (%d tensors) to %s", config.method, len(tensors), path)
    return path


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data files were synced already
        pass
    finally:
        os.close(fd)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the complete directory `src` to `dst`, swapping out an existing `dst` atomically where possible."""
    if not dst.exists():
        os.rename(src, dst)
        return
    if _rename_exchange(src, dst):
        shutil.rmtree(src)          # `src` now holds the old adapter
        return
    # Fallback (non-Linux or a filesystem without RENAME_EXCHANGE): a short window where `dst` is absent,
    # but never a directory with mixed old/new files.
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old / dst.name)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _rename_exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


# -- loading -------------------------------------------------------------------------------------------------------
def load_adapter(path: str | Path, model_config=None, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Load and fully validate an adapter directory (native, PEFT LoRA or official format); see the module docstring."""
    path = Path(path)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "adapter directory not found"
        raise CheckpointError(what, path=str(path))
    cfg_file = path / CONFIG_NAME
    data = read_json(cfg_file)
    from mtlora import official, peft_format  # local import: both import this module

    if peft_format.is_peft_config(data):
        logger.info("%s is a PEFT LoRA adapter; converting", path)
        weights_file = official.weights_file(path)
        config, tensors = peft_format.convert_peft(path, data, model_config=model_config, file=weights_file)
    elif official.is_official_config(data):
        logger.info("%s is an official mtLoRA checkpoint; converting", path)
        weights_file = official.weights_file(path)
        config, tensors = official.convert_official(path, data, model_config=model_config, file=weights_file)
    else:
        config = AdapterConfig.from_dict(data, path=str(cfg_file))
        weights_file = path / WEIGHTS_NAME
        tensors = read_safetensors(weights_file)
    validate_adapter(config, tensors, model_config, source=str(weights_file), config_source=str(cfg_file))
    out = {name: t.to(device=device, dtype=dtype or t.dtype) for name, t in tensors.items()}
    narrowed = {name: out[name] for name, t in tensors.items() if can_overflow(t.dtype, out[name].dtype)}
    bad = first_non_finite(narrowed)
    if bad is not None:
        raise CheckpointError(f"tensor {bad} overflows {dtype} (values beyond its range)",
                              path=str(weights_file), field=bad)
    logger.info("loaded %s adapter from %s (%d tensors)", config.method, path, len(out))
    return config, out


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first (in order) tensor holding a NaN or an Inf, or None. One sum per tensor: under IEEE rules a NaN or
    Inf element makes the sum NaN or Inf, so a finite sum clears the tensor; a sum that is not finite (also what a
    finite overflow gives) gets the exact elementwise check. Sums stay in the tensor's own type (float16 in
    float32): a float64 sum of float32 copies the tensor first. ~10x cheaper than `isfinite(t).all()` per tensor,
    which allocates a bool tensor the size of t: an adapter load on the serving path spent most of its time there."""
    if not tensors:
        return None
    names = list(tensors)
    # sums: [n] float32 (each tensor summed in its own type, float16 in float32)
    sums = torch.stack([tensors[n].sum(dtype=torch.float32 if tensors[n].dtype == torch.float16 else None).float()
                        for n in names])
    finite = torch.isfinite(sums)
    if bool(finite.all()):
        return None
    for name, ok in zip(names, finite.tolist()):
        if not ok and not bool(torch.isfinite(tensors[name]).all()):
            return name
    return None


def can_overflow(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether converting finite `source` values to `target` can give Inf: only to a type with a smaller maximum
    (float32 -> bfloat16 / float16, bfloat16 -> float16). validate_adapter has already checked the source values,
    so a same-type or widening load needs no second pass over the tensors."""
    return torch.finfo(target).max < torch.finfo(source).max


def read_json(file: Path) -> dict:
    """Parse a JSON object file; errors name the file and the line/column."""
    if not file.is_file():
        raise CheckpointError("file not found", path=str(file))
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                              path=str(file)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read: {exc}", path=str(file)) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"expected a JSON object, got {type(data).__name__}", path=str(file))
    return data


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file into memory; corrupt or truncated files raise CheckpointError."""
    from safetensors.torch import load

    if not file.is_file():
        raise CheckpointError("file not found", path=str(file))
    try:
        # Read the bytes instead of mmap-ing, so the result does not depend on the file staying in place.
        return dict(load(file.read_bytes()))
    except Exception as exc:  # safetensors raises its own SafetensorError (not exported as a stable type)
        raise CheckpointError(f"corrupt or truncated safetensors file: {exc}", path=str(file)) from None


# -- validation ----------------------------------------------------------------------------------------------------
def validate_adapter(config: AdapterConfig, tensors: dict[str, torch.Tensor], model_config=None,
                     source: str = "<tensors>", config_source: str | None = None) -> None:
    """Every check of `load_adapter` that needs no file: values, self-consistency, base shapes, fingerprint."""
    _check_tensors(config, tensors, source)
    if model_config is None:
        return
    _check_fingerprint(config, model_config, config_source or source)
    try:
        expected = inject.expected_shapes(model_config, config)
    except ConfigError as exc:  # e.g. a routing group size that does not divide this base's dimension
        raise IncompatibleAdapterError(f"adapter does not fit this base model: {exc}", path=config_source or source,
                                       field=exc.field) from None
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise IncompatibleAdapterError(
            f"tensor set does not match the base model ({model_config.num_hidden_layers} layers): "
            f"missing {_few(missing)}, unexpected {_few(extra)}", path=source, field=(missing or extra)[0])
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise IncompatibleAdapterError(
                f"tensor {name} has shape {tuple(tensors[name].shape)}, the base model needs {shape} "
                "(adapter trained for another base?)", path=source, field=name)


def _check_tensors(config: AdapterConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Names well formed, float and finite, and shapes consistent with the config (no base model needed)."""
    if not tensors:
        raise CheckpointError("contains no tensors", path=source)
    layers: dict[int, set[str]] = {}
    for name, t in tensors.items():
        m = _NATIVE_NAME.match(name) if isinstance(name, str) else None
        if m is None or not isinstance(t, torch.Tensor):
            raise CheckpointError(f"unexpected entry {name!r}; expected tensors named layers.<L>.<site>."
                                  "lora_A|lora_B|router", path=source, field=str(name))
        if t.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}; expected a float type", path=source,
                                  field=name)
        layers.setdefault(int(m.group(1)), set()).add(m.group(2))
    bad = first_non_finite(tensors)
    if bad is not None:
        what = "NaN" if torch.isnan(tensors[bad]).any() else "Inf"
        raise CheckpointError(f"tensor {bad} contains {what} values", path=source, field=bad)
    sites = set(config.sites())
    for layer, found in sorted(layers.items()):
        if found != sites:
            extra = [f"layers.{layer}.{s}" for s in sorted(found - sites)]
            missing = [f"layers.{layer}.{s}" for s in sorted(sites - found)]
            raise CheckpointError(f"adapter sites do not match the config ({config.method}, sites "
                                  f"{sorted(sites)}): unexpected {extra}, missing {missing}", path=source,
                                  field=(extra or missing)[0])
    n_layers = max(layers) + 1
    if len(layers) != n_layers:
        gaps = sorted(set(range(n_layers)) - set(layers))
        raise CheckpointError(f"no tensors for layer(s) {gaps[:5]}", path=source, field=f"layers.{gaps[0]}")
    for layer in range(n_layers):
        for site in config.sites():
            _check_site(config, tensors, f"layers.{layer}.{site}", source)


def _check_site(config: AdapterConfig, tensors: dict[str, torch.Tensor], prefix: str, source: str) -> None:
    names = {k: f"{prefix}.{k}" for k in ("lora_A", "lora_B", "router")}
    for key in ("lora_A", "lora_B"):
        if names[key] not in tensors:
            raise CheckpointError(f"missing tensor {names[key]}", path=source, field=names[key])
    a, b = tensors[names["lora_A"]], tensors[names["lora_B"]]
    r, n = config.rank, config.num_experts
    if a.dim() != 2 or a.shape[0] != r:
        raise CheckpointError(f"tensor {names['lora_A']} has shape {tuple(a.shape)}; expected [rank={r}, d_in]",
                              path=source, field=names["lora_A"])
    if b.dim() != 3 or b.shape[0] != n or b.shape[2] != r:
        raise CheckpointError(f"tensor {names['lora_B']} has shape {tuple(b.shape)}; expected "
                              f"[num_experts={n}, d_out, rank={r}]", path=source, field=names["lora_B"])
    router = tensors.get(names["router"])
    if not config.has_router:
        if router is not None:
            raise CheckpointError(f"unexpected tensor {names['router']}: num_experts is 1, there is no router",
                                  path=source, field=names["router"])
        return
    if router is None:
        raise CheckpointError(f"missing tensor {names['router']}", path=source, field=names["router"])
    try:
        groups = config.groups_for(b.shape[1])
    except ConfigError as exc:
        raise CheckpointError(f"{names['lora_B']}: {exc}", path=source, field="routing_group_size") from None
    want = (groups * n, a.shape[1])
    if tuple(router.shape) != want:
        raise CheckpointError(f"tensor {names['router']} has shape {tuple(router.shape)}; expected "
                              f"[groups*num_experts={want[0]}, d_in={want[1]}]", path=source,
                              field=names["router"])


def _check_fingerprint(config: AdapterConfig, model_config, source: str) -> None:
    if not config.base_fingerprint:
        return
    try:
        from mtlora.base import config_fingerprint
    except ModuleNotFoundError as exc:
        if exc.name != "mtlora.base":
            raise
        logger.warning("mtlora.base is unavailable; not checking base_fingerprint of %s", source)
        return
    actual = config_fingerprint(model_config)
    if actual != config.base_fingerprint:
        raise IncompatibleAdapterError(
            f"base_fingerprint {config.base_fingerprint[:12]}... does not match the base model's "
            f"{actual[:12]}... (adapter trained for another base model)", path=source, field="base_fingerprint")


def _few(names: list[str], k: int = 5) -> str:
    return f"{names[:k]}{f' (+{len(names) - k} more)' if len(names) > k else ''}"


def count_parameters(config: AdapterConfig, model_config) -> int:
    """Number of adapter parameters for this base model, from shapes alone."""
    return sum(math.prod(shape) for shape in inject.expected_shapes(model_config, config).values())
