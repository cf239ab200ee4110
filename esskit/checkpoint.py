"""Crash-safe checkpoints: accelerate `save_state` into a temporary directory, renamed into place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from esskit.errors import ConfigError, TrainingError

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
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank's files (random_states_N.pkl) are in tmp before it is marked whole
    if accelerator.is_main_process:
        state = tmp / STATE_FILE
        state.write_text(json.dumps({"step": step}))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest first."""
    found = [p for p in Path(run_dir).glob(f"{PREFIX}*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


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
    return int(json.loads((checkpoint / STATE_FILE).read_text())["step"])


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Model weights only (evaluate / predict)."""
    path = checkpoint / WEIGHTS_FILE
    saved = load_file(path)
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
