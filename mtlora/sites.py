"""Adapter sites of a LLaMA decoder layer, defined once: names, where they sit, what they read, their shapes.

Contract:
- `SITES`: every site, in the one canonical order, as a `Site`: `name` is the dotted module path relative to the
  decoder layer (and the native tensor prefix `layers.{L}.{name}`); `block` the sub-block it belongs to
  ("self_attn" | "mlp"); `module` the projection it wraps (None: block level, parallel to the whole sub-block);
  `reads` the activation it reads (`ATTN_IN` = input_layernorm output, `ATTN_OUT` = o_proj input, `MLP_IN` =
  post_attention_layernorm output, `MLP_ACT` = down_proj input); `fused` the engine's fused projection whose output
  columns it adds into ("qkv" | "gate_up", None: its own output). `SITE_NAMES` lists the names.
- `FUSED`: fused projection -> its projections in column order (the engine concatenates weights in this order).
- `LINEAR_MODULES`: projections component-level adapters may target; `site_of_module(m)` -> site name.
  `PLACEMENT_SITES`: block-level placement -> its sites.
- `site_dims(model_config, site) -> (d_in, d_out)` from any object with LlamaConfig attribute names (transformers'
  LlamaConfig, the engine's ModelConfig); `fused_columns(model_config, fused) -> [FusedColumn]`.
Used by `config.AdapterConfig` (validation, `sites()`), `inject` (attach, expected shapes), the engine's
`AdapterSlots` (site order) and its decoder (weight fusion, column views).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtlora.errors import ConfigError

ATTN_IN, ATTN_OUT, MLP_IN, MLP_ACT = "attn_in", "attn_out", "mlp_in", "mlp_act"


@dataclass(frozen=True)
class Site:
    name: str
    block: str
    module: str | None
    reads: str
    fused: str | None


SITES: tuple[Site, ...] = (
    Site("self_attn", "self_attn", None, ATTN_IN, None),
    Site("mlp", "mlp", None, MLP_IN, None),
    Site("self_attn.q_proj", "self_attn", "q_proj", ATTN_IN, "qkv"),
    Site("self_attn.k_proj", "self_attn", "k_proj", ATTN_IN, "qkv"),
    Site("self_attn.v_proj", "self_attn", "v_proj", ATTN_IN, "qkv"),
    Site("self_attn.o_proj", "self_attn", "o_proj", ATTN_OUT, None),
    Site("mlp.gate_proj", "mlp", "gate_proj", MLP_IN, "gate_up"),
    Site("mlp.up_proj", "mlp", "up_proj", MLP_IN, "gate_up"),
    Site("mlp.down_proj", "mlp", "down_proj", MLP_ACT, None),
)
SITE_NAMES: tuple[str, ...] = tuple(s.name for s in SITES)
BY_NAME: dict[str, Site] = {s.name: s for s in SITES}
LINEAR_MODULES: tuple[str, ...] = tuple(s.module for s in SITES if s.module is not None)
FUSED: dict[str, tuple[str, ...]] = {
    f: tuple(s.module for s in SITES if s.fused == f) for f in dict.fromkeys(s.fused for s in SITES if s.fused)
}
PLACEMENT_SITES: dict[str, tuple[str, ...]] = {"ffn": ("mlp",), "attention": ("self_attn",),
                                               "both": ("self_attn", "mlp")}


@dataclass(frozen=True)
class FusedColumn:
    """One site's output columns [start, start + width) inside a fused projection output."""

    site: str
    start: int
    width: int


def site(name: str) -> Site:
    """The `Site` of a name; an unknown name is a ConfigError listing the known ones."""
    if name not in BY_NAME:
        raise ConfigError(f"unknown adapter site {name!r}; expected one of {sorted(BY_NAME)}", field="site")
    return BY_NAME[name]


def site_of_module(module: str) -> str:
    """`q_proj` -> `self_attn.q_proj`, `down_proj` -> `mlp.down_proj`."""
    for s in SITES:
        if s.module == module:
            return s.name
    raise ConfigError(f"unknown target module {module!r}; expected one of {LINEAR_MODULES}", field="target_modules")


def _widths(model_config) -> dict[str, int]:
    """Activation widths of one decoder layer: d (hidden), q (heads * head_dim), kv, ffn."""
    d = model_config.hidden_size
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or d // heads
    return {"d": d, "q": heads * head_dim, "kv": (getattr(model_config, "num_key_value_heads", None) or heads)
            * head_dim, "ffn": model_config.intermediate_size}


_DIMS = {   # site -> (input width, output width), as keys of _widths
    "self_attn": ("d", "d"), "mlp": ("d", "d"),
    "self_attn.q_proj": ("d", "q"), "self_attn.k_proj": ("d", "kv"), "self_attn.v_proj": ("d", "kv"),
    "self_attn.o_proj": ("q", "d"),
    "mlp.gate_proj": ("d", "ffn"), "mlp.up_proj": ("d", "ffn"), "mlp.down_proj": ("ffn", "d"),
}
assert set(_DIMS) == set(SITE_NAMES)


def site_dims(model_config, name: str) -> tuple[int, int]:
    """(in_features, out_features) of an adapter site, from the base model's config alone."""
    site(name)
    w = _widths(model_config)
    d_in, d_out = _DIMS[name]
    return w[d_in], w[d_out]


def fused_columns(model_config, fused: str) -> list[FusedColumn]:
    """Where each site of a fused projection ("qkv", "gate_up") writes inside its output, in column order."""
    if fused not in FUSED:
        raise ConfigError(f"unknown fused projection {fused!r}; expected one of {sorted(FUSED)}", field="fused")
    out, start = [], 0
    for s in SITES:
        if s.fused == fused:
            width = site_dims(model_config, s.name)[1]
            out.append(FusedColumn(s.name, start, width))
            start += width
    return out
