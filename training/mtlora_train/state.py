"""Resumable training checkpoints, written atomically.

Layout of `<output_dir>/checkpoint-<step>/`:
    adapter/             adapter_config.json + adapter_model.safetensors (mtlora.checkpoint.save_adapter; servable)
    optimizer.pt         optimizer.state_dict()
    scheduler.pt         lr scheduler state_dict()
    rng_<rank>.pt        python / numpy / torch (CPU and CUDA) generator states of each process
    extra.pt             auxiliary-loss state (spectral SVD maps and schedule)
    trainer_state.json   global_step, epoch, batch position in the epoch, data fingerprint, loss history

Everything is first written to a hidden temporary folder next to the target, fsynced, then renamed into place, so a
crash leaves either the previous checkpoints or a complete new one (a leftover `.checkpoint-*.tmp*` is ignored).

A finished run also leaves `<output_dir>/train_config.json` (its TrainConfig); `run_config(output_dir)` reads it,
or the config inside the newest checkpoint for runs that predate that file.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlora.checkpoint import read_json
from mtlora.errors import CheckpointError

STATE_FILE = "trainer_state.json"
TRAIN_CONFIG_FILE = "train_config.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Generator states in types `torch.load(weights_only=True)` accepts (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                   int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")) + [root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # directories on some filesystems
            pass
        finally:
            os.close(fd)


def begin_checkpoint(output_dir: Path, step: int) -> Path:
    """Create (empty) the temporary folder `checkpoint-<step>` is assembled in; every process may write into it."""
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # debris of a crashed save of the same step
    tmp.mkdir(parents=True)
    return tmp


def finish_checkpoint(tmp: Path, output_dir: Path, step: int) -> Path:
    """fsync the assembled folder and rename it to `checkpoint-<step>` (replacing an older save of that step)."""
    final = output_dir / f"checkpoint-{step}"
    try:
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. step and epoch end coincide): swap the old one out
            aside = output_dir / f".checkpoint-{step}.old{os.getpid()}"
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    if not keep:
        return
    ckpts = list_checkpoints(output_dir)
    for old in ckpts[: max(0, len(ckpts) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def run_config(output_dir: Path) -> dict[str, Any]:
    """The TrainConfig fields of the run that wrote `output_dir` (see the module docstring)."""
    if (output_dir / TRAIN_CONFIG_FILE).is_file():
        return read_json(output_dir / TRAIN_CONFIG_FILE)
    ckpts = list_checkpoints(output_dir)
    if ckpts and "config" in (st := read_state(ckpts[-1])):
        return st["config"]
    raise CheckpointError(f"neither {TRAIN_CONFIG_FILE} nor a checkpoint with its config: not an mtlora-train "
                          "output folder", path=str(output_dir))


def resolve_resume(arg: str, output_dir: Path) -> Path:
    """The checkpoint folder named by --resume_from_checkpoint ('last'/'latest'/'true' = newest in output_dir)."""
    if arg.lower() in ("last", "latest", "true"):
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            raise CheckpointError("no checkpoint-<step> folder to resume from", path=str(output_dir))
        return ckpts[-1]
    path = Path(arg)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"not a training checkpoint (missing {STATE_FILE})", path=str(path))
    return path


# What `MtloraRecipe.load_checkpoint` reads from trainer_state.json.
STATE_KEYS = ("global_step", "epoch", "batch_in_epoch", "data_fingerprint", "num_processes", "history")


def read_state(path: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint folder; a damaged file or a missing key is a CheckpointError naming it."""
    file = path / STATE_FILE
    state = read_json(file)
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"missing field(s) {missing}", path=str(file), field=missing[0])
    return state


def load_torch(path: Path, name: str) -> Any:
    """A checkpoint's .pt file, read with `weights_only=True`: tensors, numbers, strings and containers only, so
    a tampered checkpoint cannot run code when it is resumed."""
    f = path / name
    if not f.is_file():
        raise CheckpointError(f"missing {name}", path=str(path))
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, or a pickle with objects weights_only refuses
        raise CheckpointError(f"cannot load with torch.load(weights_only=True): {exc}", path=str(f)) from None
