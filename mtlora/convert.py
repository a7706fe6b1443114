"""`mtlora-convert SRC DST`: write any adapter `load_adapter` reads (native, PEFT LoRA, official mtLoRA) as native.

Contract:
- `detect_format(path) -> "native" | "peft-lora" | "official"` from `adapter_config.json` alone (the same rules
  `mtlora.checkpoint.load_adapter` applies); errors are `CheckpointError` naming the file.
- `main(argv)` loads SRC with `load_adapter` (every check of the native format, plus the conversion's own), and with
  `--base-model DIR` checks shapes against that base, takes its layer count (needed for PEFT adapters that adapt
  only some layers) and records its fingerprint; `--dtype` casts the tensors (rejecting values that overflow).
  DST is written with `save_adapter` (atomic, replaces an existing directory). Exit status 0 on success, 1 with one
  `error: ...` line on stderr naming the file and field otherwise, 2 for usage errors (argparse).
`mtlora-convert-official` (`mtlora.official:main`) stays as it was.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from mtlora.errors import MtloraError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def detect_format(path: str | Path) -> str:
    """Which loader `load_adapter` uses for the adapter directory at `path`."""
    from mtlora import official, peft_format
    from mtlora.checkpoint import CONFIG_NAME, read_json

    data = read_json(Path(path) / CONFIG_NAME)
    if peft_format.is_peft_config(data):
        return "peft-lora"
    return "official" if official.is_official_config(data) else "native"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtlora-convert",
        description="Convert an adapter directory to the native mtlora format. The source format is detected from "
                    "its adapter_config.json: a standard Hugging Face PEFT LoRA adapter (peft_type LORA, written "
                    "by peft's save_pretrained), an official mtLoRA checkpoint (ICLR26_mtLoRA fork: HYDRALORA, or "
                    "LORA with fork fields such as lora_nums), or a native adapter (re-validated and rewritten). "
                    "See docs/checkpoint-format.md for what is honoured and what is refused.")
    parser.add_argument("src", help="adapter directory to read (adapter_config.json + adapter_model.safetensors, "
                                    "or adapter_model.bin, read with torch.load(weights_only=True))")
    parser.add_argument("dst", help="native adapter directory to write (replaced atomically if it exists)")
    parser.add_argument("--base-model", default=None, metavar="DIR",
                        help="local base model directory (its config.json is read, no weights): tensor shapes are "
                             "checked against it, its layer count is used (required for PEFT adapters with "
                             "layers_to_transform, exclude_modules or a regex target_modules) and its fingerprint "
                             "is recorded in the converted config. Default: no base checks, no fingerprint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the tensors to this dtype (values beyond its range are an error). "
                             "Default: keep the source dtype")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return convert(args.src, args.dst, args.base_model, DTYPES.get(args.dtype))


def convert(src: str, dst: str, base_model: str | None = None, dtype=None) -> int:
    """Write the adapter at `src` (any format load_adapter reads) as a native adapter at `dst`; the exit status
    (1 with a message on stderr for a bad base model or adapter). Shared by mtlora-convert and
    mtlora-convert-official."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mtlora.checkpoint import load_adapter, save_adapter

    model_config = None
    if base_model:
        from transformers import AutoConfig

        try:
            model_config = AutoConfig.from_pretrained(base_model, local_files_only=True)
        except (OSError, ValueError) as exc:  # no config.json, not a model directory, invalid repo id, ...
            print(f"error: --base-model {base_model}: cannot read the base model's config ({exc})", file=sys.stderr)
            return 1
    try:
        fmt = detect_format(src)
        config, tensors = load_adapter(src, model_config=model_config, dtype=dtype)
        if model_config is not None:
            from mtlora.base import config_fingerprint

            config.base_fingerprint = config_fingerprint(model_config)
        save_adapter(dst, config, tensors)
    except MtloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"converted {fmt} adapter {src} -> native {config.method} adapter (rank {config.rank}, "
          f"{len(tensors)} tensors) at {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
