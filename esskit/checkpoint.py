"""Crash-safe checkpoints: accelerate `save_state` into a temporary directory, renamed into place."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file

from esskit.errors import ConfigError, TrainingError
from esskit.files import new_file_mode

# The recipe keys that fix the model's parameter shapes: a checkpoint loads only into their values.
SHAPE_KEYS = ("model.backbone", "model.norm", "model.embed_dim", "method.name", "data.num_classes")
PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
WEIGHTS_FILE = "model.safetensors"


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int) -> Path:
    """Write checkpoint-{step} atomically (a crash mid-save leaves the previous ones intact) and keep
    the newest `keep`. Call on every process."""
    final = run_dir / f"{PREFIX}{step:08d}"
    tmp = run_dir / f".tmp-{PREFIX}{step:08d}"
    if accelerator.is_main_process:  # this save's leftover, and any an earlier crash left at another step
        for stale in run_dir.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()  # every rank's files (random_states_N.pkl) are in tmp before it is marked whole
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
            _finish_tree(tmp)
    # a full disk: OSError from open/write, SafetensorError from the weights, RuntimeError from
    # torch.save (optimizer.bin, random_states_N.pkl: "unexpected pos ..."); free what this save took
    except (OSError, SafetensorError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"cannot write {final.name} in {run_dir}: {e}; {newest_checkpoint_note(run_dir)}") from None
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _finish_tree(directory: Path) -> None:
    """Flush every file to disk, readable as the umask allows (safetensors writes its file 0600)."""
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, new_file_mode())
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest first (a copy such as checkpoint-00000002-backup is
    not one of them)."""
    found = [p for p in Path(run_dir).glob(f"{PREFIX}*")
             if re.fullmatch(rf"{PREFIX}\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def newest_checkpoint_note(run_dir: Path) -> str:
    found = list_checkpoints(run_dir)
    return f"the newest one, {found[-1]}, is intact" if found else f"none was saved in {run_dir} yet"


def damaged(checkpoint: Path, error: Exception) -> TrainingError:
    """The one-line error of a checkpoint whose files cannot be read, naming an older complete one."""
    older = [p for p in list_checkpoints(checkpoint.parent) if p.name < checkpoint.name]
    hint = (f"move it aside to use {older[-1]}" if older else "no older checkpoint exists in the run directory")
    why = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return TrainingError(f"checkpoint {checkpoint} is damaged ({why}); {hint}")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest complete one inside a run directory."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path) if path.is_dir() else []
    if not found:
        raise TrainingError(f"no complete checkpoint in {path} (expected {path}/{PREFIX}NNNNNNNN/{STATE_FILE}); "
                            f"pass a run directory written by `esskit train`")
    return found[-1]


def checkpoint_step(checkpoint: Path) -> int:
    try:
        return int(json.loads((checkpoint / STATE_FILE).read_text())["step"])
    except (OSError, ValueError) as e:
        raise damaged(checkpoint, ValueError(f"{STATE_FILE}: {e}")) from None
    except (KeyError, TypeError):
        raise damaged(checkpoint, ValueError(f"{STATE_FILE} holds no step")) from None


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Model weights only (evaluate / predict)."""
    path = checkpoint / WEIGHTS_FILE
    try:
        saved = load_file(path)
    except (OSError, SafetensorError) as e:
        raise damaged(checkpoint, e) from None
    mismatches = _mismatches(model.state_dict(), saved)
    if mismatches:
        more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        raise ConfigError(f"{path} does not match the recipe's {type(model).__name__}: {mismatches[0]}{more}; "
                          f"the recipe must match {checkpoint.parent / 'config.toml'} in {', '.join(SHAPE_KEYS)}")
    model.load_state_dict(saved)


def _mismatches(expected: dict, saved: dict) -> list[str]:
    """What keeps `saved` from loading into a model with state dict `expected`, in model order."""
    found = []
    for name, tensor in expected.items():
        if name not in saved:
            found.append(f"parameter {name} missing from the checkpoint")
        elif saved[name].shape != tensor.shape:
            found.append(f"{name} is {list(saved[name].shape)} in the checkpoint but {list(tensor.shape)} "
                         f"in the model")
    return found + [f"unexpected parameter {name} in the checkpoint" for name in saved if name not in expected]
