"""Import checkpoints written by the official mtLoRA code (github.com/doem97/ICLR26_mtLoRA, a PEFT fork).

An official checkpoint directory holds `adapter_config.json` (a LoraConfig dump with `peft_type` "HYDRALORA" or
"LORA") and `adapter_model.bin` (a pickled state dict; loaded with `torch.load(weights_only=True)` only, so no
code in it can run) or `adapter_model.safetensors`. Keys carry no adapter-name infix:

    block mode (enable_block_adapter, style "lowrank"), site = mlp | self_attn:
        base_model.model.model.layers.{L}.{site}.block_adapter.lora_A.weight      [r, d]
        base_model.model.model.layers.{L}.{site}.block_adapter.lora_B.{i}.weight  [d, r]      i < lora_nums
        base_model.model.model.layers.{L}.{site}.block_adapter.lora_route.weight  [g*N, d]    only if N > 1
    component mode, site = self_attn.q_proj, mlp.down_proj, ...:
        base_model.model.model.layers.{L}.{site}.lora_A.weight                    [r, d_in]
        base_model.model.model.layers.{L}.{site}.lora_B{i}.weight                 [d_out, r]  (no dot before i)
        base_model.model.model.layers.{L}.{site}.lora_route.weight                [g*N, d_in] always, even N == 1

Both modes compute delta = (alpha/r) * sum_i softmax_fp32(route(x).view(..., g, N))[..., group(k), i] * B_i A x,
with g = d_out / routing_group_size under `enable_fine_grained_routing` (else 1), i.e. exactly `MoLoRA` with the
router rows already group-major. Conversion: lora_A -> lora_A, stack(lora_B_i) -> lora_B [N, d_out, r],
lora_route -> router; a component-mode router with N == 1 is checked and dropped (softmax over one expert is 1).
Method: block adapter -> mtlora; component with lora_nums > 1 -> hydralora; else lora.

Unlike the official loader (`load_state_dict(strict=False)`), every key must be consumed and every expected tensor
present; errors name the missing/unexpected keys and the file. Config fields are either used, checked, or in
`IGNORED_FIELDS` with the reason they do not affect inference; any other field is an error.
CLI: `mtlora-convert-official SRC DST` (or `python -m mtlora.official`) converts to a native checkpoint directory.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import torch

from mtlora.config import LINEAR_MODULES, AdapterConfig
from mtlora.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

PREFIX = "base_model.model.model.layers."
OFFICIAL_PEFT_TYPES = ("HYDRALORA", "LORA")
PLACEMENT_OF_BLOCK_TYPE = {"ffn": "ffn", "attention": "attention", "both": "both"}
# Fields read to build the AdapterConfig, with the official defaults where the official code has one.
USED_FIELDS = {
    "peft_type": None, "r": None, "lora_alpha": None, "lora_nums": None, "lora_dropout": 0.0,
    "target_modules": None, "base_model_name_or_path": None, "enable_block_adapter": False,
    "block_adapter_type": "attention", "block_adapter_style": "lowrank", "block_adapter_rank": None,
    "enable_fine_grained_routing": False, "routing_group_size": 1,
    "fan_in_fan_out": False, "enable_lora": None, "bias": "none", "modules_to_save": None,
}
# Fields that do not change the adapter's forward pass at inference, and why.
IGNORED_FIELDS = {
    "task_type": "model head type; we serve causal LMs only",
    "inference_mode": "training flag",
    "enable_blc": "balance loss, training only",
    "init_lora_weights": "initialisation, overwritten by the saved weights",
    "merge_weights": "the official LoraLinear never merges into saved adapter weights",
    "enable_spectral_reg": "training regulariser", "spectral_reg_lambda": "training regulariser",
    "spectral_reg_frequency": "training regulariser", "spectral_reg_steps": "training regulariser",
    "adaptformer_init_scale": "only used by the 'adaptformer' block style, which is rejected",
}


def is_official_config(data: dict) -> bool:
    """Official configs are PEFT dumps (they carry `peft_type`); native ones never do."""
    return "peft_type" in data


def weights_file(path: Path) -> Path:
    """The official weights file in `path`: safetensors if present, else adapter_model.bin."""
    st, pt = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        if pt.is_file():
            logger.warning("%s has both adapter_model.safetensors and adapter_model.bin; using safetensors", path)
        return st
    if pt.is_file():
        return pt
    raise CheckpointError("file not found (nor adapter_model.safetensors)", path=str(pt))


# -- config --------------------------------------------------------------------------------------------------------
def config_from_official(data: dict, source: str) -> tuple[AdapterConfig, bool]:
    """(AdapterConfig, block_mode) from an official adapter_config.json dict; errors name the field."""
    unknown = sorted(set(data) - set(USED_FIELDS) - set(IGNORED_FIELDS))
    if unknown:
        raise ConfigError(f"unknown official config field(s) {unknown}; refusing to guess their effect",
                          field=unknown[0], path=source)
    f = {k: data.get(k, default) for k, default in USED_FIELDS.items()}
    for name in ("r", "lora_alpha", "lora_nums"):
        if f[name] is None:
            raise ConfigError(f"official config needs {name}", field=name, path=source)
    for name in ("r", "lora_nums", "block_adapter_rank", "routing_group_size"):  # official names in the message
        value = f[name]
        if name == "block_adapter_rank" and value == 0:
            continue                                 # falsy: the block adapter uses r, as in the official code
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}", field=name, path=source)
    checks = [
        (str(f["peft_type"]) in OFFICIAL_PEFT_TYPES, "peft_type", f"must be one of {OFFICIAL_PEFT_TYPES}"),
        (not f["fan_in_fan_out"], "fan_in_fan_out", "must be false for LLaMA linear layers"),
        (f["enable_lora"] is None, "enable_lora", "MergedLinear adapters are not supported"),
        (not f["modules_to_save"], "modules_to_save", "full-module copies are not supported"),
    ]
    for ok, name, why in checks:
        if not ok:
            raise ConfigError(f"{name}={f[name]!r}: {why}", field=name, path=source)
    n = f["lora_nums"]
    fgr = bool(f["enable_fine_grained_routing"]) and isinstance(n, int) and n > 1
    common = dict(alpha=f["lora_alpha"], num_experts=n, dropout=f["lora_dropout"] or 0.0,
                  routing_group_size=f["routing_group_size"] if fgr else None,
                  base_model=f["base_model_name_or_path"])
    try:
        if f["enable_block_adapter"]:
            return _block_config(f, common, source), True
        return _component_config(f, common, source), False
    except ConfigError as exc:
        if exc.path:
            raise
        # Our field names differ from the official ones; say both.
        raise ConfigError(f"{exc} (converted from the official config)", field=exc.field, path=source) from None


def _block_config(f: dict, common: dict, source: str) -> AdapterConfig:
    if f["block_adapter_style"] != "lowrank":
        raise ConfigError(f"block_adapter_style={f['block_adapter_style']!r}: only 'lowrank' is supported "
                          "(other styles add a ReLU or learnable expert scales)", field="block_adapter_style",
                          path=source)
    if f["block_adapter_type"] not in PLACEMENT_OF_BLOCK_TYPE:
        raise ConfigError(f"block_adapter_type={f['block_adapter_type']!r}: expected one of "
                          f"{sorted(PLACEMENT_OF_BLOCK_TYPE)}", field="block_adapter_type", path=source)
    if f["target_modules"]:
        logger.info("%s: block adapter; target_modules %s are ignored (as in the official code)", source,
                    f["target_modules"])
    return AdapterConfig(method="mtlora", rank=f["block_adapter_rank"] or f["r"],
                         placement=PLACEMENT_OF_BLOCK_TYPE[f["block_adapter_type"]], **common)


def _component_config(f: dict, common: dict, source: str) -> AdapterConfig:
    targets = f["target_modules"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"target_modules={targets!r}: expected a non-empty list of projection names "
                          f"(regex strings are not supported)", field="target_modules", path=source)
    bad = [t for t in targets if t not in LINEAR_MODULES]
    if bad:
        raise ConfigError(f"target_modules {bad} are not LLaMA projections {LINEAR_MODULES}",
                          field="target_modules", path=source)
    method = "hydralora" if common["num_experts"] > 1 else "lora"
    return AdapterConfig(method=method, rank=f["r"], target_modules=list(targets), **common)


# -- weights -------------------------------------------------------------------------------------------------------
def read_official_weights(file: Path) -> dict[str, torch.Tensor]:
    """A flat {key: tensor} dict from adapter_model.bin (weights_only) or adapter_model.safetensors."""
    if file.suffix == ".safetensors":
        from mtlora.checkpoint import read_safetensors

        return read_safetensors(file)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle rejected by weights_only, ...
        raise CheckpointError(f"cannot load with torch.load(weights_only=True): {exc}", path=str(file)) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a state dict, got {type(obj).__name__}", path=str(file))
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"entry {key!r} is not a named tensor", path=str(file), field=str(key))
    return obj


def official_keys(config: AdapterConfig, block_mode: bool, layer: int, site: str) -> dict[str, str]:
    """Official keys of one adapter site: role ('A', 'B0', ..., 'route') -> key."""
    base = f"{PREFIX}{layer}.{site}.block_adapter." if block_mode else f"{PREFIX}{layer}.{site}."
    keys = {"A": base + "lora_A.weight"}
    for i in range(config.num_experts):
        keys[f"B{i}"] = base + (f"lora_B.{i}.weight" if block_mode else f"lora_B{i}.weight")
    if config.num_experts > 1 or not block_mode:   # component mode always has a router
        keys["route"] = base + "lora_route.weight"
    return keys


def _num_layers(state: dict[str, torch.Tensor], model_config, source: str) -> int:
    if model_config is not None:
        return model_config.num_hidden_layers
    found = [int(m.group(1)) for k in state if (m := re.match(re.escape(PREFIX) + r"(\d+)\.", k))]
    if not found:
        raise CheckpointError(f"no key starts with {PREFIX!r}; not an official mtLoRA adapter?", path=source)
    return max(found) + 1


def convert_official(path: Path, data: dict, model_config=None,
                     file: Path | None = None) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Official checkpoint directory -> (native AdapterConfig, native tensors). Validated by the caller too.

    `data` is the parsed adapter_config.json; `file` the weights file (default: `weights_file(path)`)."""
    config, block_mode = config_from_official(data, str(path / "adapter_config.json"))
    file = file or weights_file(path)
    state = read_official_weights(file)
    layout = {(layer, site): official_keys(config, block_mode, layer, site)
              for layer in range(_num_layers(state, model_config, str(file))) for site in config.sites()}
    expected = {key for keys in layout.values() for key in keys.values()}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"keys do not match the {config.method} layout of adapter_config.json: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}",
                              path=str(file), field=(missing or unexpected)[0])
    tensors: dict[str, torch.Tensor] = {}
    for (layer, site), keys in layout.items():
        tensors.update(_convert_site(config, state, keys, f"layers.{layer}.{site}", str(file)))
    return config, tensors


def _convert_site(config: AdapterConfig, state: dict, keys: dict[str, str], prefix: str,
                  source: str) -> dict[str, torch.Tensor]:
    a = state[keys["A"]]                                                          # [r, d_in]
    bs = [state[keys[f"B{i}"]] for i in range(config.num_experts)]                # N x [d_out, r]
    for i, b in enumerate(bs):
        if b.dim() != 2 or tuple(b.shape) != tuple(bs[0].shape):
            raise CheckpointError(f"tensor {keys[f'B{i}']} has shape {tuple(b.shape)}, expert 0 has "
                                  f"{tuple(bs[0].shape)}", path=source, field=keys[f"B{i}"])
    out = {f"{prefix}.lora_A": a, f"{prefix}.lora_B": torch.stack(bs)}           # lora_B: [N, d_out, r]
    if "route" not in keys:
        return out
    route = state[keys["route"]]                                                  # [g*N, d_in], group-major
    if config.has_router:
        out[f"{prefix}.router"] = route
        return out
    # Component mode with one expert: the router is inert (softmax over one logit is 1); check, then drop it.
    if route.dim() != 2 or route.shape[1] != a.shape[1] or bs[0].shape[0] % route.shape[0] != 0:
        raise CheckpointError(f"tensor {keys['route']} has shape {tuple(route.shape)}, inconsistent with "
                              f"{keys['A']} {tuple(a.shape)}", path=source, field=keys["route"])
    return out


# -- CLI -----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mtlora-convert-official",
        description="Convert an official mtLoRA (ICLR26_mtLoRA / HYDRALORA PEFT) checkpoint to the native format.")
    parser.add_argument("src", help="official checkpoint directory (adapter_config.json + adapter_model.bin "
                                    "or adapter_model.safetensors)")
    parser.add_argument("dst", help="native adapter directory to write (replaced atomically if it exists)")
    parser.add_argument("--base-model", default=None,
                        help="base model directory; when given, shapes are checked against it and its "
                             "fingerprint is recorded in the converted config")
    args = parser.parse_args(argv)
    from mtlora.convert import convert

    return convert(args.src, args.dst, args.base_model)


if __name__ == "__main__":
    sys.exit(main())
