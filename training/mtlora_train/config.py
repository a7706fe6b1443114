"""Typed training configuration and its mapping onto `mtlora.config.AdapterConfig`.

Contract:
- `TrainConfig` holds every `mtlora-train` option; field names are the official mtLoRA `train.py` flag names
  (underscore style), field help is the CLI help, and defaults follow the official `train.py` unless noted.
- `TrainConfig.validate()` raises `ConfigError` naming the field for values the trainer cannot honour.
- `TrainConfig.adapter_config()` decides the adapter structure the way the official code does: `mtlora` and
  `hydralora` share one configuration (in the official code `mtlora` is an alias of `hydralora`); the flags decide
  which mtLoRA parts are on: `--enable_block_adapter` (block level, placement from `--block_adapter_type`),
  `--enable_fine_grained_routing` (`--routing_group_size` output channels per routing group), and spectral
  regularisation (a loss, not a structural change). Without `--enable_block_adapter` the adapter is component level
  on `--target_modules` and is stored as `hydralora`. `lora` is one expert and no router.
- `load_yaml(path)` reads a YAML mapping of field names; unknown keys are errors naming the file and key.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlora.config import METHODS, PLACEMENTS, AdapterConfig
from mtlora.errors import ConfigError

logger = logging.getLogger(__name__)

PROMPT_FORMATS = ("official", "plain", "qa", "chat")
SPECTRAL_VARIANTS = ("paper", "official")


def _f(help_text: str, default: Any = None, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(metadata={"help": help_text, **kw.pop("meta", {})}, **kw)
    return field(default=default, metadata={"help": help_text, **kw.pop("meta", {})}, **kw)


@dataclass
class TrainConfig:
    """Every option of `mtlora-train`. The CLI is generated from these fields (see cli.py)."""

    # -- what to train --------------------------------------------------------------------------------------------
    method: str = _f("Adapter method: lora, hydralora (component level) or mtlora (flags pick the parts).", "mtlora")
    model_name_or_path: str | None = _f("Base model directory or name; default: the embedded default model.")
    tokenizer_name_or_path: str | None = _f("Tokenizer directory; default: the base model's.")
    dataset_dir: str | None = _f("Folder of .json/.jsonl records {instruction,input,output,task_type}, one "
                                 ".jsonl file, or a Hugging Face dataset id (needs the hub and `datasets`).")
    output_dir: str = _f("Where checkpoints, logs and the final adapter (<output_dir>/adapter) go.", "output")
    lora_rank: int = _f("Rank r of the shared A.", 8)
    lora_alpha: float = _f("Scaling numerator: adapter output times alpha / r.", 32.0)
    lora_dropout: float = _f("Dropout on the adapter input during training.", 0.1)
    lora_nums: int = _f("Number N of expert B matrices (hydralora/mtlora; lora always uses 1).", 2)
    target_modules: list[str] = _f("Component-level targets, comma separated (alias: --trainable).",
                                   default_factory=lambda: ["q_proj", "v_proj"])
    enable_block_adapter: bool = _f("mtLoRA block-level adapter (parallel to a whole sub-block).", False)
    block_adapter_type: str = _f("Block adapter placement: attention, ffn or both.", "attention")
    block_adapter_style: str = _f("Official flag; only 'lowrank' (the mtLoRA adapter) is supported.", "lowrank")
    block_adapter_rank: int | None = _f("Official flag; must equal --lora_rank when given.")
    enable_fine_grained_routing: bool = _f("Route per group of output channels instead of per token.", False)
    routing_group_size: int = _f("Output channels per routing group (g = d_out / size); with fine routing.", 1)
    # -- losses ---------------------------------------------------------------------------------------------------
    enable_blc: bool = _f("Add the load-balancing loss (squared CV of the mean routing weight per expert).", False)
    blc_weight: float = _f("Coefficient of the balance loss (alias: --blc_alpha).", 0.01)
    enable_spectral_reg: bool = _f("Add spectral-aware regularisation of the expert B matrices.", False)
    spectral_reg_lambda: float = _f("Coefficient of the spectral term.", 0.25)
    spectral_reg_frequency: int = _f("Refresh the SVD every N epochs.", 1)
    spectral_reg_steps: int | None = _f("If set, refresh the SVD every N optimizer steps (overrides epochs).")
    spectral_reg_variant: str = _f("'paper' (cross-expert term as the paper states it) or 'official' "
                                   "(per-expert weighted Gram term of the official code); see docs/training.md.",
                                   "paper")
    # -- optimisation ---------------------------------------------------------------------------------------------
    learning_rate: float = _f("Peak AdamW learning rate.", 2e-4)
    weight_decay: float = _f("AdamW weight decay.", 0.0)
    lr_scheduler_type: str = _f("transformers scheduler name: linear, cosine, constant, ...", "linear")
    warmup_ratio: float = _f("Fraction of the optimizer steps used for linear warm-up.", 0.0)
    max_grad_norm: float = _f("Gradient clipping norm (0 disables).", 1.0)
    per_device_train_batch_size: int = _f("Sequences per device per micro-batch.", 8)
    gradient_accumulation_steps: int = _f("Micro-batches per optimizer step.", 1)
    num_train_epochs: float = _f("Epochs (fractions allowed) when --max_steps is not set.", 1.0)
    max_steps: int = _f("Optimizer steps to run; overrides --num_train_epochs when > 0.", -1)
    max_seq_length: int = _f("Sequences are truncated to this many tokens.", 1024)
    seed: int = _f("Seed for initialisation, data order and dropout.", 42)
    bf16: bool = _f("bf16 autocast; the base model is loaded in bf16, adapters stay fp32.", False)
    gradient_checkpointing: bool = _f("Non-reentrant activation checkpointing of decoder layers.", False)
    # -- checkpoints, logging -------------------------------------------------------------------------------------
    save_steps: int = _f("Write a resumable checkpoint every N optimizer steps (0: never).", 500)
    save_strategy: str = _f("steps (every --save_steps), epoch (end of each epoch) or no.", "steps")
    save_total_limit: int | None = _f("Keep at most this many checkpoints (oldest removed first); unset or 0: all.")
    resume_from_checkpoint: str | None = _f("Checkpoint folder to resume from, or 'last' for the newest one "
                                            "in --output_dir.")
    logging_steps: int = _f("Log the loss terms every N optimizer steps.", 10)
    logging_dir: str | None = _f("TensorBoard folder (default <output_dir>/runs).")
    report_to: str = _f("'none' or 'tensorboard' (needs the tensorboard package).", "none")
    # -- data -----------------------------------------------------------------------------------------------------
    prompt_format: str = _f("official: prompt tokens + EOS as separator (as the official code); plain: "
                            "prompt + newline; qa: 'Q: {prompt}\\nA: {output}' (the layout mtlora-eval "
                            "bbh/tasks prompts with); chat: the tokenizer's chat template.", "official")
    data_cache_dir: str | None = _f("Tokenised-data cache (default $MTLORA_CACHE_DIR or ~/.cache/mtlora).")
    skip_bad_records: bool = _f("Skip malformed records (counted in the log) instead of failing.", False)
    dataloader_num_workers: int = _f("DataLoader worker processes.", 0)
    # -- modes ----------------------------------------------------------------------------------------------------
    count_params_only: bool = _f("Print the trainable parameter count (computed on the meta device) and exit.",
                                 False)

    # ------------------------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; expected one of {METHODS}", field="method")
        if self.block_adapter_type not in PLACEMENTS:
            raise ConfigError(f"block_adapter_type must be one of {PLACEMENTS}, got {self.block_adapter_type!r}",
                              field="block_adapter_type")
        if self.block_adapter_style != "lowrank":
            raise ConfigError("only block_adapter_style 'lowrank' (the mtLoRA block adapter) is supported, got "
                              f"{self.block_adapter_style!r}", field="block_adapter_style")
        if self.block_adapter_rank not in (None, self.lora_rank):
            raise ConfigError(f"block_adapter_rank {self.block_adapter_rank} differs from lora_rank "
                              f"{self.lora_rank}; this format has one rank per adapter", field="block_adapter_rank")
        if self.enable_block_adapter and self.method == "lora":
            raise ConfigError("the block adapter is an mtlora part; use --method mtlora", field="method")
        if self.spectral_reg_variant not in SPECTRAL_VARIANTS:
            raise ConfigError(f"spectral_reg_variant must be one of {SPECTRAL_VARIANTS}", field="spectral_reg_variant")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"prompt_format must be one of {PROMPT_FORMATS}", field="prompt_format")
        if self.save_strategy not in ("steps", "epoch", "no"):
            raise ConfigError("save_strategy must be steps, epoch or no", field="save_strategy")
        if self.report_to not in ("none", "tensorboard"):
            raise ConfigError("report_to must be 'none' or 'tensorboard'", field="report_to")
        positive = ("lora_rank", "lora_nums", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "max_seq_length", "spectral_reg_frequency", "logging_steps", "routing_group_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", field=name)
        if self.spectral_reg_steps is not None and self.spectral_reg_steps < 1:
            raise ConfigError("spectral_reg_steps must be >= 1 or unset", field="spectral_reg_steps")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set num_train_epochs > 0 or max_steps > 0", field="num_train_epochs")
        for name in ("blc_weight", "spectral_reg_lambda", "learning_rate", "weight_decay", "max_grad_norm",
                     "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0", field=name)
        if self.save_total_limit is not None and self.save_total_limit < 0:
            raise ConfigError(f"save_total_limit must be >= 1 or unset (0 also keeps all), got "
                              f"{self.save_total_limit}", field="save_total_limit")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}", field="warmup_ratio")
        self.adapter_config()  # structural checks (target modules, dropout, ...) live in AdapterConfig
        return self

    def adapter_config(self, base_model: str | None = None, base_fingerprint: str | None = None) -> AdapterConfig:
        """The adapter structure these flags select (see the module docstring)."""
        routed = self.method != "lora" and self.lora_nums > 1
        group = self.routing_group_size if (self.enable_fine_grained_routing and routed) else None
        common = dict(rank=self.lora_rank, alpha=float(self.lora_alpha), dropout=self.lora_dropout,
                      base_model=base_model, base_fingerprint=base_fingerprint)
        if self.method == "lora":
            if self.lora_nums != 1:
                logger.info("method lora uses one expert; ignoring lora_nums=%d", self.lora_nums)
            return AdapterConfig(method="lora", num_experts=1, target_modules=list(self.target_modules), **common)
        if self.enable_block_adapter:
            return AdapterConfig(method="mtlora", num_experts=self.lora_nums, placement=self.block_adapter_type,
                                 routing_group_size=group, **common)
        return AdapterConfig(method="hydralora", num_experts=self.lora_nums, routing_group_size=group,
                             target_modules=list(self.target_modules), **common)

    @property
    def uses_balance(self) -> bool:
        return self.enable_blc and self.blc_weight > 0 and self.method != "lora" and self.lora_nums > 1

    @property
    def uses_spectral(self) -> bool:
        return self.enable_spectral_reg and self.spectral_reg_lambda > 0 and self.method != "lora"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Field values from a YAML mapping; errors name the file and the key."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("config file not found", path=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:   # a folder, no permission, not UTF-8
        raise ConfigError(f"cannot read the config file: {exc}", path=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of option names to values", path=str(path))
    unknown = sorted(set(data) - field_names())
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}", field=unknown[0], path=str(path))
    if isinstance(data.get("target_modules"), str):
        data["target_modules"] = [m.strip() for m in data["target_modules"].split(",") if m.strip()]
    return data
