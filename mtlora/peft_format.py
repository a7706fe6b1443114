"""Standard Hugging Face PEFT LoRA adapters (`peft_type` "LORA", written by `peft`'s `save_pretrained`) -> native.

A PEFT LoRA directory holds `adapter_config.json` (a `peft.LoraConfig` dump) and `adapter_model.safetensors` (or
`adapter_model.bin`, read with `torch.load(weights_only=True)` only). Keys, as `get_peft_model_state_dict` writes
them (adapter name stripped), for module M = `model.layers.{L}.{self_attn|mlp}.{proj}` of a LLaMA-style model:

    base_model.model.{M}.lora_A.weight   [r_M, d_in]
    base_model.model.{M}.lora_B.weight   [d_out, r_M]

PEFT computes delta = s_M * B A x with s_M = alpha_M / r_M (`use_rslora`: alpha_M / sqrt(r_M)), where r_M and
alpha_M come from `rank_pattern` / `alpha_pattern` (first key K, in dict order, with `re.match(r"(.*\\.)?(K)$", M)`)
or `r` / `lora_alpha`. Which modules are adapted follows `peft.tuners.tuners_utils.check_target_module_exists`:
`exclude_modules` first (a string is a full-match regex, a list matches names exactly or by `.suffix`); then a
string `target_modules` is a full-match regex over module names ("all-linear": every projection), a list
matches exactly (layer filters not applied) or by `.suffix` (then `layers_to_transform`, with `layers_pattern`,
filters by the first numbered layer index). Only the seven LLaMA projections are adaptable; a target that matches
any other module (embed_tokens, lm_head, a norm, ...) is refused naming it. List entries matching no module are
ignored, as PEFT ignores them.

Conversion into the single native format (`method: lora`), exact in math: the native rank is the largest r_M;
smaller ranks are zero-padded (zero rows of A, zero columns of B); native `target_modules` is every projection
kind adapted in some layer; a (layer, projection) PEFT does not adapt gets zero A and B. When every adapted module
has the same s_M, native alpha = s * rank and the weights are copied unchanged; otherwise each B is multiplied by
its s_M (in at least fp32) and native alpha = rank (scaling 1).

Every config field is honoured (`HONOURED_FIELDS`), ignored with the reason it cannot change the inference forward
(`IGNORED_FIELDS`), or refused when set (`REFUSED_FIELDS`, with why); an unknown field is an error. Every key of
the weights file must be consumed and every expected key present. Errors are `ConfigError` / `CheckpointError`
naming the field or key and the file. `is_peft_config` tells a PEFT LoRA dump from an official mtLoRA-fork one
(which carries fork-only fields such as `lora_nums`).

`write_peft_lora(path, config, tensors)` is the inverse for a native plain-LoRA adapter: it writes the PEFT layout
above (`r` = rank, `lora_alpha` = alpha, so PEFT's and vLLM's scaling alpha / r is the native one), which `peft`'s
`PeftModel.from_pretrained` and vLLM's `LoRARequest` load; `mtlora-bench engine` uses it to serve the same
adapters in both engines.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mtlora.config import LINEAR_MODULES, AdapterConfig
from mtlora.errors import CheckpointError, ConfigError, IncompatibleAdapterError
from mtlora.sites import site_of_module

logger = logging.getLogger(__name__)

PREFIX = "base_model.model."
# Fields only the official mtLoRA fork writes: their presence means `mtlora.official` handles the directory.
OFFICIAL_ONLY_FIELDS = ("lora_nums", "enable_block_adapter", "enable_blc", "block_adapter_type",
                        "enable_fine_grained_routing", "merge_weights")
HONOURED_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "use_rslora",
                   "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
                   "base_model_name_or_path", "bias")   # bias: checked to be "none"
IGNORED_FIELDS = {
    "task_type": "model head type; a non-causal-LM head would come with modules_to_save, which is refused",
    "inference_mode": "training flag", "lora_dropout": "dropout, training only",
    "auto_mapping": "class to rebuild the base model with", "peft_version": "version of the writer",
    "revision": "revision of the base model (informational)", "megatron_core": "module name, used with "
    "megatron_config only", "runtime_config": "runtime options (e.g. ephemeral GPU offload)",
    "qalora_group_size": "used with use_qalora only", "ensure_weight_tying": "ties embedding / modules_to_save "
    "adapters, which are refused", "eva_config": "initialisation of A, overwritten by the saved weights",
    "init_lora_weights": "initialisation, overwritten by the saved weights (base-modifying inits are refused)",
}
REFUSED_FIELDS = {  # refused when set (not None / False / empty), with why
    "use_dora": "DoRA (weight-decomposed LoRA) rescales the base weight; not supported",
    "lora_bias": "a bias on lora_B is not supported",
    "modules_to_save": "full copies of base modules are not supported",
    "fan_in_fan_out": "LLaMA projections are nn.Linear (fan_in_fan_out must be false)",
    "layer_replication": "replicated layers change the base model's depth",
    "target_parameters": "LoRA on nn.Parameter targets (e.g. MoE experts) is not supported",
    "trainable_token_indices": "trainable embedding tokens are not supported",
    "megatron_config": "Megatron parallel layers are not supported",
    "loftq_config": "LoftQ replaces the base weights; the adapter needs that modified base",
    "corda_config": "CorDA initialisation modifies the base weights; convert the adapter with peft first",
    "lora_ga_config": "LoRA-GA initialisation modifies the base weights; convert the adapter with peft first",
    "kasa_config": "KaSA truncates the base weights' singular values",
    "velora_config": "VeLoRA variant is not supported", "monteclora_config": "MonteCLoRA variant is not supported",
    "alora_invocation_tokens": "activated LoRA (depends on invocation tokens) is not supported",
    "use_qalora": "QA-LoRA pools the input; not supported", "use_bdlora": "BD-LoRA is not supported",
    "arrow_config": "Arrow routing is not supported",
}
# init_lora_weights values that change the base weights: the saved adapter only fits that residual base.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def is_peft_config(data: dict) -> bool:
    """A PEFT dump (it carries `peft_type`) that is not the official mtLoRA fork's (HYDRALORA or fork fields)."""
    return "peft_type" in data and data.get("peft_type") != "HYDRALORA" and \
        not any(f in data for f in OFFICIAL_ONLY_FIELDS)


@dataclass
class PeftLora:
    """The fields of a PEFT LoraConfig that decide which modules are adapted and how."""

    r: int
    alpha: float
    target_modules: list[str] | str
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    rank_pattern: dict | None = None
    alpha_pattern: dict | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    base_model: str | None = None


@dataclass
class ModulePlan:
    """How one adapted module converts: its PEFT rank and scaling."""

    rank: int
    scaling: float


# -- config --------------------------------------------------------------------------------------------------------
def _is_set(value) -> bool:
    return value not in (None, False, "", [], {}, ())


def peft_lora_config(data: dict, source: str) -> PeftLora:
    """Check every field of a PEFT adapter_config.json dict; errors name the field."""
    def err(name: str, why: str) -> ConfigError:
        return ConfigError(f"PEFT field {name}={data.get(name)!r}: {why}", field=name, path=source)

    unknown = sorted(set(data) - set(HONOURED_FIELDS) - set(IGNORED_FIELDS) - set(REFUSED_FIELDS))
    if unknown:
        raise ConfigError(f"unknown PEFT config field(s) {unknown}; refusing to guess their effect",
                          field=unknown[0], path=source)
    if data.get("peft_type") != "LORA":
        raise err("peft_type", "only LORA adapters are supported (and the official fork's HYDRALORA)")
    for name, why in REFUSED_FIELDS.items():
        if _is_set(data.get(name)):
            raise err(name, why)
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise err("init_lora_weights", "this initialisation modifies the base weights, so the adapter only fits "
                  "that residual base; convert it with peft's save_pretrained(path_initial_model_for_weight_"
                  "conversion=...) first")
    if data.get("bias", "none") != "none":
        raise err("bias", "trained base biases are not supported (must be 'none')")
    r, alpha = data.get("r", 8), data.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise err("r", "must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise err("lora_alpha", "must be a positive number")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = data.get(name) or {}
        if not isinstance(pattern, dict):
            raise err(name, "expected an object {module name or regex: value}")
        for key, value in pattern.items():
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and \
                (name == "alpha_pattern" or isinstance(value, int))
            if not ok:
                raise ConfigError(f"PEFT field {name}[{key!r}]={value!r}: must be a positive "
                                  f"{'number' if name == 'alpha_pattern' else 'integer'}", field=name, path=source)
            _compile(key, name, source)
    targets = data.get("target_modules")
    if targets == "all-linear":       # peft expands it to every linear layer but the output layer
        targets = list(LINEAR_MODULES)
    if isinstance(targets, str):
        _compile(targets, "target_modules", source)
    elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise err("target_modules", "expected a non-empty list of module names or a regex string")
    exclude = data.get("exclude_modules")
    for name in ("exclude_modules", "layers_pattern"):
        value = data.get(name)
        if not (value is None or isinstance(value, str) or
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise err(name, "expected a string or a list of strings")
    if isinstance(exclude, str):
        _compile(exclude, "exclude_modules", source)
    layers = data.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool) or
                                   isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        raise err("layers_to_transform", "expected a layer index or a list of them")
    return PeftLora(r=r, alpha=float(alpha), target_modules=targets, exclude_modules=exclude or None,
                    use_rslora=bool(data.get("use_rslora")), rank_pattern=data.get("rank_pattern") or {},
                    alpha_pattern=data.get("alpha_pattern") or {}, layers_to_transform=layers,
                    layers_pattern=data.get("layers_pattern"), base_model=data.get("base_model_name_or_path"))


def _compile(pattern: str, name: str, source: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"PEFT field {name}: invalid regex {pattern!r}: {exc}", field=name, path=source) from None


# -- which modules are adapted (peft's check_target_module_exists and get_pattern_key) ------------------------------
def module_names(num_layers: int) -> list[str]:
    """Every module name of a LLaMA-style causal LM, as `named_modules()` lists them (the root excluded)."""
    names = ["model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]
    for layer in range(num_layers):
        p = f"model.layers.{layer}"
        names += [p, f"{p}.self_attn", f"{p}.mlp", f"{p}.input_layernorm", f"{p}.post_attention_layernorm",
                  f"{p}.mlp.act_fn"] + [f"{p}.{site_of_module(m)}" for m in LINEAR_MODULES]
    return names


def is_targeted(cfg: PeftLora, key: str) -> bool:
    """peft's `check_target_module_exists` for a LoraConfig (modules_to_save is refused, so it is not checked)."""
    ex = cfg.exclude_modules
    if ex and (re.fullmatch(ex, key) if isinstance(ex, str) else
               key in ex or any(key.endswith(f".{e}") for e in ex)):
        return False
    targets = cfg.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = cfg.layers_to_transform
    if not found or layers is None or (isinstance(layers, list) and not layers):
        return found
    if not cfg.layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [cfg.layers_pattern] if isinstance(cfg.layers_pattern, str) else cfg.layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(pattern: dict, key: str, default):
    """peft's `get_pattern_key`: the first pattern key K (dict order) with re.match(r"(.*\\.)?(K)$", key)."""
    for k, value in pattern.items():
        if re.match(rf"(.*\.)?({k})$", key):
            return value
    return default


def plan_modules(cfg: PeftLora, num_layers: int, source: str) -> dict[tuple[int, str], ModulePlan]:
    """(layer, projection) -> ModulePlan for every module PEFT adapts; non-projection targets are refused."""
    plan: dict[tuple[int, str], ModulePlan] = {}
    for name in module_names(num_layers):
        if not is_targeted(cfg, name):
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)", name)
        if m is None or m.group(2) not in LINEAR_MODULES:
            raise ConfigError(f"target_modules={cfg.target_modules!r} selects module {name!r}; only the LLaMA "
                              f"projections {LINEAR_MODULES} can be adapted", field="target_modules", path=source)
        r = _pattern_value(cfg.rank_pattern, name, cfg.r)
        alpha = float(_pattern_value(cfg.alpha_pattern, name, cfg.alpha))
        plan[(int(m.group(1)), m.group(2))] = ModulePlan(r, alpha / (math.sqrt(r) if cfg.use_rslora else r))
    if not plan:
        raise ConfigError(f"target_modules={cfg.target_modules!r} (with exclude_modules / layers_to_transform) "
                          f"selects no projection of a {num_layers}-layer LLaMA model", field="target_modules",
                          path=source)
    return plan


def _layers_restricted(cfg: PeftLora) -> bool:
    """Whether the adapted layers may not be all of them (then the key file cannot tell the layer count)."""
    t = cfg.target_modules
    return cfg.layers_to_transform is not None or bool(cfg.exclude_modules) or \
        isinstance(t, str) or (isinstance(t, list) and any("." in x for x in t))


# -- weights -------------------------------------------------------------------------------------------------------
def _num_layers(cfg: PeftLora, state: dict, model_config, source: str) -> int:
    if model_config is not None:
        return model_config.num_hidden_layers
    found = [int(m.group(1)) for k in state if (m := re.match(re.escape(PREFIX) + r"model\.layers\.(\d+)\.", k))]
    if not found:
        raise CheckpointError(f"no key starts with {PREFIX + 'model.layers.'!r}; not a PEFT LoRA adapter for a "
                              "LLaMA-style model?", path=source)
    if _layers_restricted(cfg):
        raise CheckpointError("the config adapts only some modules (layers_to_transform, exclude_modules or a "
                              "regex target_modules), so the base model's layer count cannot be read from the "
                              "keys; give the base model (mtlora-convert --base-model DIR)", path=source)
    return max(found) + 1


def convert_peft(path: Path, data: dict, model_config=None,
                 file: Path | None = None) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """PEFT LoRA directory -> (native AdapterConfig, native tensors); the caller validates the result too."""
    from mtlora.official import read_official_weights, weights_file

    cfg_source = str(path / "adapter_config.json")
    cfg = peft_lora_config(data, cfg_source)
    file = file or weights_file(path)
    state = read_official_weights(file)
    plan = plan_modules(cfg, _num_layers(cfg, state, model_config, str(file)), cfg_source)
    keys = {lp: (f"{PREFIX}model.layers.{lp[0]}.{site_of_module(lp[1])}.lora_A.weight",
                 f"{PREFIX}model.layers.{lp[0]}.{site_of_module(lp[1])}.lora_B.weight") for lp in plan}
    expected = {k for pair in keys.values() for k in pair}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"keys do not match the modules adapter_config.json adapts: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}", path=str(file),
                              field=(missing or unexpected)[0])
    rank = max(p.rank for p in plan.values())
    scalings = {p.scaling for p in plan.values()}
    fold = len(scalings) > 1
    config = AdapterConfig(method="lora", rank=rank, alpha=float(rank) if fold else next(iter(scalings)) * rank,
                           target_modules=[m for m in LINEAR_MODULES if any(p == m for _, p in plan)],
                           base_model=cfg.base_model)
    dims = _dims(config, plan, keys, state, model_config, str(file))
    num_layers = max(layer for layer, _ in plan) + 1 if model_config is None else model_config.num_hidden_layers
    dtype = next(iter(state.values())).dtype
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(num_layers):
        for proj in config.target_modules:
            d_in, d_out = dims[proj]
            a, b = torch.zeros(rank, d_in, dtype=dtype), torch.zeros(1, d_out, rank, dtype=dtype)
            if (layer, proj) in plan:
                p = plan[(layer, proj)]
                src_a, src_b = _checked_pair(state, keys[(layer, proj)], p.rank, (d_in, d_out), str(file))
                a[:p.rank] = src_a
                if fold:
                    wide = torch.promote_types(src_b.dtype, torch.float32)
                    b = b.to(wide)
                    src_b = src_b.to(wide) * p.scaling
                b[0, :, :p.rank] = src_b
            site = f"layers.{layer}.{site_of_module(proj)}"
            tensors[f"{site}.lora_A"], tensors[f"{site}.lora_B"] = a, b
    logger.info("%s: PEFT LoRA, %d adapted modules, native rank %d%s", path, len(plan), rank,
                ", per-module scaling folded into lora_B" if fold else "")
    return config, tensors


def _dims(config: AdapterConfig, plan, keys, state, model_config, source: str) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) per projection kind: from the base config, else from the first adapted module's tensors."""
    from mtlora.inject import site_dims

    dims = {}
    for proj in config.target_modules:
        if model_config is not None:
            dims[proj] = site_dims(model_config, site_of_module(proj))
            continue
        first = min(lp for lp in plan if lp[1] == proj)
        a, b = state[keys[first][0]], state[keys[first][1]]
        if a.dim() != 2 or b.dim() != 2:
            raise CheckpointError(f"tensors {keys[first]} must be 2-D", path=source, field=keys[first][0])
        dims[proj] = (a.shape[1], b.shape[0])
    return dims


def _checked_pair(state, pair: tuple[str, str], r: int, dims: tuple[int, int], source: str):
    """The (A, B) tensors of one module, shapes checked: a wrong rank contradicts the config, a wrong width the base."""
    a, b = state[pair[0]], state[pair[1]]
    for key, t, want, rank_axis in ((pair[0], a, (r, dims[0]), 0), (pair[1], b, (dims[1], r), 1)):
        if tuple(t.shape) == want:
            continue
        if t.dim() == 2 and t.shape[rank_axis] == r:
            raise IncompatibleAdapterError(f"tensor {key} has shape {tuple(t.shape)}, this base model needs {want} "
                                           "(adapter trained for another base?)", path=source, field=key)
        raise CheckpointError(f"tensor {key} has shape {tuple(t.shape)}, expected {want} (rank {r} from r / "
                              "rank_pattern of adapter_config.json)", path=source, field=key)
    return a, b


# -- writing -------------------------------------------------------------------------------------------------------
def write_peft_lora(path: str | Path, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Native plain-LoRA adapter (`method: lora`, native tensor names) -> a PEFT LoRA directory at `path`."""
    from safetensors.torch import save_file

    if config.method != "lora":
        raise ConfigError(f"only plain lora adapters have a PEFT LoRA form, got method {config.method!r}",
                          field="method")
    state = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)", name)
        if m is None or m[3] not in config.target_modules or site_of_module(m[3]) != f"{m[2]}.{m[3]}":
            raise CheckpointError(f"tensor {name} is not a lora_A / lora_B of the adapter's target_modules "
                                  f"{config.target_modules}", field=name)
        if m[4] == "B":                                 # native [1, d_out, r] -> PEFT [d_out, r]
            if t.dim() != 3 or t.shape[0] != 1:
                raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, expected [1, d_out, r]", field=name)
            t = t[0]
        state[f"{PREFIX}model.{name[:-len('.lora_A')]}.lora_{m[4]}.weight"] = t.detach().to("cpu").contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    data = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
            "target_modules": list(config.target_modules), "bias": "none", "use_rslora": False,
            "lora_dropout": 0.0, "inference_mode": True, "base_model_name_or_path": config.base_model}
    (path / "adapter_config.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path
