"""Adapter configuration: one typed, validated, versioned dataclass shared by training, checkpoints and serving.

Contract:
- `AdapterConfig(...)` validates every field in `__post_init__` and raises `ConfigError` naming the field.
- `to_dict()` / `from_dict()` round-trip exactly through `adapter_config.json`; `from_dict` rejects unknown fields
  and newer format versions.
- Shape checks that need the base model (e.g. a routing group size that does not divide the output dimension) are
  made where the adapter meets the model (`AdapterConfig.groups_for(out_features)`), naming both numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mtlora.errors import ConfigError
from mtlora.sites import LINEAR_MODULES, PLACEMENT_SITES, site_of_module

FORMAT_VERSION = 1

METHODS = ("mtlora", "hydralora", "lora")
PLACEMENTS = tuple(PLACEMENT_SITES)
__all__ = ["AdapterConfig", "FORMAT_VERSION", "LINEAR_MODULES", "METHODS", "PLACEMENTS"]


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class AdapterConfig:
    """Hyper-parameters of one adapter; each field's help (dataclass metadata) documents it."""

    method: str = _help("Adapter method: 'mtlora' (block level), 'hydralora' (component level) or 'lora'.")
    rank: int = _help("Rank r of the shared down-projection A [r, d_in].", default=16)
    alpha: float = _help("Scaling numerator: the adapter output is multiplied by alpha / rank.", default=32.0)
    num_experts: int = _help("Number N of expert up-projections B_i (must be 1 for plain lora).", default=1)
    placement: str | None = _help(
        "mtlora only: which sub-block the block adapter runs parallel to: 'ffn', 'attention' or 'both'.",
        default=None,
    )
    routing_group_size: int | None = _help(
        "Fine-grained routing: output channels per routing group (g = d_out // size). None: one group.",
        default=None,
    )
    target_modules: list[str] = _help(
        "hydralora/lora only: linear projections to adapt, e.g. ['q_proj', 'v_proj'].", default_factory=list
    )
    dropout: float = _help("Dropout probability on A's input (training only).", default=0.0)
    base_model: str | None = _help("Name or path of the base model the adapter was trained on.", default=None)
    base_fingerprint: str | None = _help(
        "sha256 of the base model's architecture fields (see mtlora.base.config_fingerprint).", default=None
    )
    format_version: int = _help("Version of the adapter_config.json schema.", default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown adapter method {self.method!r}; expected one of {METHODS}", field="method")
        for name in ("rank", "num_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}", field=name)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}", field="alpha")
        self.alpha = float(self.alpha)
        # Type check first: float("abc") would raise a bare ValueError that names no field.
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}", field="dropout")
        if self.routing_group_size is not None and (
            isinstance(self.routing_group_size, bool) or not isinstance(self.routing_group_size, int)
            or self.routing_group_size < 1
        ):
            raise ConfigError(
                f"routing_group_size must be a positive integer or null, got {self.routing_group_size!r}",
                field="routing_group_size",
            )
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int) \
                or self.format_version < 1:
            raise ConfigError(f"format_version must be a positive integer, got {self.format_version!r}",
                              field="format_version")
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"format_version {self.format_version} is newer than this mtlora supports ({FORMAT_VERSION}); "
                "upgrade mtlora",
                field="format_version",
            )
        self._validate_method_fields()

    def _validate_method_fields(self) -> None:
        if self.method == "mtlora":
            if self.placement not in PLACEMENTS:
                raise ConfigError(
                    f"mtlora needs placement in {PLACEMENTS}, got {self.placement!r}", field="placement"
                )
            if self.target_modules:
                raise ConfigError("mtlora is block level: target_modules must be empty", field="target_modules")
        else:
            if self.placement is not None:
                raise ConfigError(f"placement applies to mtlora only, not {self.method}", field="placement")
            if not isinstance(self.target_modules, (list, tuple)):
                raise ConfigError(f"target_modules must be a list of projection names, got {self.target_modules!r}",
                                  field="target_modules")
            if not self.target_modules:
                raise ConfigError(f"{self.method} needs at least one target module", field="target_modules")
            bad = [m for m in self.target_modules if m not in LINEAR_MODULES]
            if bad:
                raise ConfigError(
                    f"unknown target module(s) {bad}; expected names from {LINEAR_MODULES}", field="target_modules"
                )
            self.target_modules = list(dict.fromkeys(self.target_modules))
        if self.method == "lora" and (self.num_experts != 1 or self.routing_group_size is not None):
            raise ConfigError("plain lora has one expert and no router", field="num_experts")

    # -- derived quantities -------------------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def has_router(self) -> bool:
        return self.num_experts > 1

    def groups_for(self, out_features: int) -> int:
        """Number g of routing groups over `out_features` output channels; errors name both numbers."""
        if self.routing_group_size is None or not self.has_router:
            return 1
        if out_features % self.routing_group_size != 0:
            raise ConfigError(
                f"routing_group_size {self.routing_group_size} does not divide the output dimension "
                f"{out_features}",
                field="routing_group_size",
            )
        return out_features // self.routing_group_size

    def sites(self) -> list[str]:
        """Adapter sites inside one decoder layer, as dotted module paths relative to the layer."""
        if self.method == "mtlora":
            return list(PLACEMENT_SITES[self.placement])
        return [site_of_module(m) for m in self.target_modules]

    # -- (de)serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | None = None) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} in adapter config", field=unknown[0], path=path)
        if "method" not in data:
            raise ConfigError("missing required field 'method'", field="method", path=path)
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(str(exc), field=exc.field, path=path) from None
        except TypeError as exc:  # wrong types that dataclass construction itself rejects
            raise ConfigError(str(exc), path=path) from None
