"""`mtlora-train`: the command line, generated from `TrainConfig` (one flag per field, underscore names).

Contract:
- Accepts the official mtLoRA `train.py` commands unchanged: the same flag names, booleans as bare flags or with
  an explicit value (`--enable_blc`, `--logging_first_step True`), `--trainable` as an alias of
  `--target_modules` and `--blc_alpha` of `--blc_weight`. Official flags that only steer the Hugging Face Trainer
  and have no effect here (`--do_train`, `--logging_strategy`, ...) are accepted and logged as ignored;
  `--deepspeed` and k-bit loading are refused with a message saying what to use instead.
- `--config FILE.yaml`: option values from a YAML mapping; flags given on the command line win.
- `--count_params_only`: print the trainable parameter count computed on the meta device and exit.
- Sub-commands (first argument): `mtlora-train study ...` (mtlora_train.study: train every arm of a comparison,
  serve, evaluate, report) and `mtlora-train gradient-conflict ...` (mtlora_train.gradconflict); each has --help.
Exit status: 0 on success, 2 for invalid options or data (message on stderr), 1 for other failures.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from typing import Any

from mtlora.errors import MtloraError
from mtlora_train.config import TrainConfig, load_yaml

logger = logging.getLogger("mtlora_train")

# Official train.py / TrainingArguments flags with no effect here: name -> takes a value?
IGNORED_FLAGS = {"do_train": False, "logging_strategy": True, "logging_first_step": False,
                 "ddp_find_unused_parameters": True, "overwrite_output_dir": False, "validation_file": True,
                 "main_process_port": True, "torch_dtype": True, "adaptformer_init_scale": True}
ALIASES = {"trainable": "target_modules", "blc_alpha": "blc_weight"}


def str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "y"):
        return True
    if v.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def comma_list(v: str) -> list[str]:
    return [m.strip() for m in v.split(",") if m.strip()]


def _arg_type(tp: Any):
    """argparse type for a dataclass field type (Optional[X] -> X)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args and typing.get_origin(tp) is not list else tp
    if typing.get_origin(base) is list or base is list:
        return comma_list
    return {int: int, float: float, str: str, bool: str2bool}[base]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtlora-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train an mtlora / hydralora / lora adapter on instruction data (docs/training.md). "
                    "Sub-commands: `mtlora-train study --config STUDY.yaml` (train, serve and evaluate every arm of "
                    "a comparison) and `mtlora-train gradient-conflict` (inter-task gradient conflict); each has "
                    "--help.")
    parser.add_argument("--config", help="YAML file of option values (command-line flags override it).")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = _arg_type(hints[f.name])
        names = [f"--{f.name}"] + [f"--{a}" for a, target in ALIASES.items() if target == f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", ""), "default": default}
        if kind is str2bool:
            kw.update(nargs="?", const=True, type=str2bool)
        else:
            kw.update(type=kind)
        parser.add_argument(*names, **kw)
    compat = parser.add_argument_group("accepted for compatibility with the official train.py (no effect)")
    for name, takes_value in IGNORED_FLAGS.items():
        compat.add_argument(f"--{name}", dest=f"_ignored_{name}", default=None,
                            **({"nargs": "?", "const": True} if not takes_value else {}),
                            help="ignored (Hugging Face Trainer option)")
    refused = parser.add_argument_group("official options that are refused")
    refused.add_argument("--deepspeed", dest="_deepspeed", default=None,
                         help="not supported: use DDP/FSDP through `accelerate launch` (docs/training.md)")
    refused.add_argument("--load_in_kbits", dest="_load_in_kbits", type=int, default=16,
                         help="only 16 (no k-bit quantised training)")
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """A validated TrainConfig from the command line (+ --config YAML)."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_yaml(pre.config))
    ns = parser.parse_args(argv)
    if ns._deepspeed is not None:
        parser.error("--deepspeed is not supported; launch with `accelerate launch` (DDP or FSDP) instead")
    if ns._load_in_kbits != 16:
        parser.error("--load_in_kbits: only 16 is supported (use --bf16 for half-precision weights)")
    for name in IGNORED_FLAGS:
        if getattr(ns, f"_ignored_{name}") is not None:
            logger.info("ignoring --%s (Hugging Face Trainer option with no effect in mtlora-train)", name)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**values).validate()


def count_params(cfg: TrainConfig) -> int:
    """Trainable parameters of the configured adapter on the configured (or default) base, on the meta device."""
    from transformers import AutoConfig

    from mtlora.base import resolve_model
    from mtlora_train.params import count_trainable_params

    model_config = AutoConfig.from_pretrained(resolve_model(cfg.model_name_or_path))
    return count_trainable_params(model_config, cfg.adapter_config())


SUBCOMMANDS = {"study": "mtlora_train.study", "gradient-conflict": "mtlora_train.gradconflict"}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    try:
        cfg = parse_config(argv)
        if cfg.count_params_only:
            print(f"{count_params(cfg):,} trainable parameters ({cfg.adapter_config().method})")
            return 0
        if not cfg.dataset_dir:
            raise MtloraError("--dataset_dir is required for training")
        from mtlora_train.recipe import MtloraRecipe

        MtloraRecipe(cfg).setup().train()
        return 0
    except MtloraError as exc:
        print(f"mtlora-train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
