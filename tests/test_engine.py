"""End-to-end trainer tests through the CLI (typer.testing), on tiny synthetic runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import esskit.engine as engine
from esskit.cli import app
from esskit.config import load_config

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "synthetic.toml"
TINY = ["train.steps=4", "train.batch_size=2", "data.crop=[64,64]", "data.base_size=[64,64]",
        "data.synthetic_image_size=64", "data.synthetic_train_size=6", "data.synthetic_val_size=3",
        "train.log_every=1", "eval.batch_size=2"]
runner = CliRunner()


def esskit(*args: str, overrides=TINY):
    sets = [a for o in overrides for a in ("--set", o)]
    return runner.invoke(app, [*args, *sets])


def weights(run_dir: Path, step: int) -> dict:
    return load_file(run_dir / f"checkpoint-{step:08d}" / "model.safetensors")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method", ["ess", "baseline"])
def test_train_writes_run_directory(tmp_path, method):
    run = tmp_path / "run"
    result = esskit("train", str(RECIPE), "--out", str(run), overrides=TINY + [f"method.name={method}"])
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.output
    assert (run / "checkpoint-00000004" / "model.safetensors").is_file()
    # The resolved config is itself a valid recipe that reproduces the run's settings.
    resolved = load_config(run / "config.toml")
    assert resolved.method.name == method and resolved.train.steps == 4 and resolved.data.crop == [64, 64]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    assert all(x["loss"] > 0 for x in lines if "loss" in x)
    report = json.loads((run / "eval.json").read_text())
    assert report["step"] == 4 and report["pixels"] > 0
    assert 0 <= report["mIoU"] <= 1 and len(report["IoU"]) == 19
    # evaluate reproduces the training run's final evaluation from the checkpoint alone.
    again = esskit("evaluate", str(RECIPE), "--checkpoint", str(run), overrides=TINY + [f"method.name={method}"])
    assert again.exit_code == 0, again.output
    assert json.loads((run / "eval.json").read_text())["mIoU"] == pytest.approx(report["mIoU"])


def test_feature_exact_search_trains_as_the_per_pixel_search(tmp_path):
    """knn_at = "feature_exact" is exact: the same losses and weights as a search per label pixel
    (60 classes: above the count where it falls back to that search)."""
    runs = {at: tmp_path / at for at in ("label", "feature_exact")}
    for at, run in runs.items():
        result = esskit("train", str(RECIPE), "--out", str(run),
                        overrides=TINY + ["data.num_classes=60", f"method.knn_at={at}"])
        assert result.exit_code == 0, result.output
    losses = [[json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in x]
              for run in runs.values()]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = (weights(run, 4) for run in runs.values())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    # evaluation predicts through the bound too: the same labels from the same weights
    label_eval = json.loads((runs["label"] / "eval.json").read_text())
    again = esskit("evaluate", str(RECIPE), "--checkpoint", str(runs["label"]),
                   overrides=TINY + ["data.num_classes=60", "method.knn_at=feature_exact"])
    assert again.exit_code == 0, again.output
    bounded_eval = json.loads((runs["label"] / "eval.json").read_text())
    assert bounded_eval["IoU"] == label_eval["IoU"] and bounded_eval["pixels"] == label_eval["pixels"]


def test_resume_equals_straight_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # 6 images / batch 2 = 3 batches per epoch: the resumed half crosses an epoch boundary.
    assert esskit("train", str(RECIPE), "--out", str(straight)).exit_code == 0
    first = esskit("train", str(RECIPE), "--out", str(split), overrides=TINY + ["train.stop_after=2"])
    assert first.exit_code == 0, first.output
    assert "--resume" in first.output and not (split / "eval.json").exists()
    second = esskit("train", str(RECIPE), "--resume", str(split))
    assert second.exit_code == 0, second.output
    a, b = weights(straight, 4), weights(split, 4)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    losses = [[json.loads(x).get("loss") for x in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (straight, split)]
    assert losses[0] == losses[1]


def test_resume_applies_the_recipes_optim_values_and_schedule(tmp_path):
    # A resume may change optim.* and train.steps (config.toml records the new values): the next step
    # runs at the new schedule's lr, the optimizer with the new momentum, not the checkpoint's.
    run = tmp_path / "run"
    tiny = TINY + ["optim.warmup_steps=0", "optim.lr=0.002"]
    assert esskit("train", str(RECIPE), "--out", str(run), overrides=tiny + ["train.stop_after=2"]).exit_code == 0
    result = esskit("train", str(RECIPE), "--resume", str(run),
                    overrides=tiny + ["train.steps=8", "optim.lr=0.02", "optim.momentum=0.5"])
    assert result.exit_code == 0, result.output
    lr = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert lr[2] == pytest.approx(0.002 * (1 - 1 / 4) ** 0.9)  # before the resume: the old schedule
    assert lr[3] == pytest.approx(0.02 * (1 - 2 / 8) ** 0.9) and lr[8] == pytest.approx(0.02 * (1 - 7 / 8) ** 0.9)
    groups = torch.load(run / "checkpoint-00000008" / "optimizer.bin", weights_only=False)["param_groups"]
    head = next(g for g in groups if g["name"] == "head")
    assert head["momentum"] == 0.5 and head["initial_lr"] == 0.02


def test_resume_refuses_a_different_model(tmp_path):
    run = tmp_path / "run"
    assert esskit("train", str(RECIPE), "--out", str(run), overrides=TINY + ["train.stop_after=1"]).exit_code == 0
    result = esskit("train", str(RECIPE), "--resume", str(run), overrides=TINY + ["data.num_classes=21"])
    assert result.exit_code == 2
    assert "data.num_classes (19 -> 21)" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("change", ["train.batch_size=3", "train.seed=1", "train.grad_accum=2"])
def test_resume_refuses_another_data_position(tmp_path, change):
    # The checkpoint's step stands for step x grad_accum batches of batch_size images in the seed's
    # order: with other values the resume would skip or repeat samples of the current epoch.
    run = tmp_path / "run"
    assert esskit("train", str(RECIPE), "--out", str(run), overrides=TINY + ["train.stop_after=1"]).exit_code == 0
    result = esskit("train", str(RECIPE), "--resume", str(run), overrides=TINY + [change])
    assert result.exit_code == 2, result.output
    assert change.split("=")[0] in result.output and "Traceback" not in result.output
    assert not (run / "checkpoint-00000002").exists()


def test_resume_refuses_another_process_count(tmp_path):
    # a checkpoint holds one random_states_N.pkl per process that wrote it; resuming a 2-process
    # checkpoint in one process would halve the effective batch and shift the data order
    run = tmp_path / "run"
    assert esskit("train", str(RECIPE), "--out", str(run), overrides=TINY + ["train.stop_after=1"]).exit_code == 0
    states = run / "checkpoint-00000001"
    (states / "random_states_1.pkl").write_bytes((states / "random_states_0.pkl").read_bytes())
    result = esskit("train", str(RECIPE), "--resume", str(run), overrides=TINY)
    assert result.exit_code == 2, result.output
    assert "written by 2 processes and this run has 1" in result.output and "--num_processes 2" in result.output
    assert not (run / "checkpoint-00000002").exists()


def test_existing_run_directory_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    assert esskit("train", str(RECIPE), "--out", str(run), overrides=TINY + ["train.steps=1"]).exit_code == 0
    result = esskit("train", str(RECIPE), "--out", str(run), overrides=TINY + ["train.steps=1"])
    assert result.exit_code == 2 and "already holds checkpoints" in result.output


@pytest.mark.parametrize("override, message", [
    ("method.kk=3", "unknown key method.kk (did you mean 'k'?)"),
    ("train.steps=many", "train.steps = 'many' must be of type int (a TOML int, e.g. 8)"),
    ("optim.lr=.01", "optim.lr = '.01' must be of type float (a TOML float, e.g. 0.01 or 1e-3)"),
    ("method.name=softmax", "method.name = 'softmax' is not one of"),
    ("data.name=imagenet", "data.name = 'imagenet' is not one of"),
])
def test_bad_input_is_one_line_error(tmp_path, override, message):
    result = esskit("train", str(RECIPE), "--out", str(tmp_path / "run"), overrides=TINY + [override])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_recipe(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "nope.toml not found" in result.output
    result = runner.invoke(app, ["train", str(tmp_path)])
    assert result.exit_code == 2 and f"recipe {tmp_path} is a directory, not a TOML file" in result.output


def test_label_outside_classes_names_the_sample(tmp_path, monkeypatch):
    from esskit import data

    class BadLabels(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            mask = torch.zeros(64, 64, dtype=torch.int64)
            mask[5, 7] = 19 if i == 2 else 0
            return torch.zeros(3, 64, 64, dtype=torch.uint8), mask

    monkeypatch.setitem(data.DATASETS, "synthetic", lambda cfg, split: BadLabels())
    result = esskit("train", str(RECIPE), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "synthetic/train sample 2: label 19 is outside [0, 19)" in result.output


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    real_loss, calls = engine.segmentation_loss, []

    def loss_nan_at_step_3(output, target, cfg):
        calls.append(1)
        loss, parts = real_loss(output, target, cfg)
        return (loss * float("nan") if len(calls) == 3 else loss), parts

    monkeypatch.setattr(engine, "segmentation_loss", loss_nan_at_step_3)
    run = tmp_path / "run"
    result = esskit("train", str(RECIPE), "--out", str(run), overrides=TINY + ["train.save_every=2"])
    assert result.exit_code == 2
    assert "loss is nan at step 3" in result.output
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-00000002"]
    load_file(run / "checkpoint-00000002" / "model.safetensors")


def test_interrupt_saves_and_exits_cleanly(tmp_path, monkeypatch):
    real_loss, calls = engine.segmentation_loss, []

    def interrupt_at_step_2(output, target, cfg):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, in the middle of a step
        return real_loss(output, target, cfg)

    monkeypatch.setattr(engine, "segmentation_loss", interrupt_at_step_2)
    run = tmp_path / "run"
    result = esskit("train", str(RECIPE), "--out", str(run))
    assert result.exit_code == 0, result.output
    assert "stopped at step 2" in result.output
    assert (run / "checkpoint-00000002" / "trainer_state.json").is_file()
    assert esskit("train", str(RECIPE), "--resume", str(run)).exit_code == 0
    assert (run / "checkpoint-00000004").is_dir()


def test_a_second_interrupt_quits_at_once(tmp_path, monkeypatch):
    real_loss, calls = engine.segmentation_loss, []

    def interrupt_twice_at_step_2(output, target, cfg):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # finish the step and save...
            for _ in range(5000):  # (two signals sent back to back may arrive as one)
                if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                    break  # the first was handled: it put back the previous handler
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGINT)  # ...no: quit now
        return real_loss(output, target, cfg)

    monkeypatch.setattr(engine, "segmentation_loss", interrupt_twice_at_step_2)
    run = tmp_path / "run"
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's, whatever ran before
    try:
        result = esskit("train", str(RECIPE), "--out", str(run))
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    assert result.exit_code == 130 and len(calls) == 2, (before, result.output[-300:])  # click's Abort
    assert not list(run.glob("checkpoint-*")) and restored is signal.default_int_handler


def test_grad_accum_and_bf16(tmp_path):
    run = tmp_path / "run"
    result = esskit("train", str(RECIPE), "--out", str(run),
                    overrides=TINY + ["train.steps=2", "train.grad_accum=2", "train.mixed_precision=bf16"])
    assert result.exit_code == 0, result.output
    assert "batch 2 x 2 accum" in result.output
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["train"]["grad_accum"] == 2 and saved["train"]["mixed_precision"] == "bf16"


def test_help_lists_commands_and_module_entry_point():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "evaluate"):
        assert command in result.output
    proc = subprocess.run([sys.executable, "-m", "esskit", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout
