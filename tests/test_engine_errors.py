"""Trainer failure modes and run-directory bookkeeping, through the CLI on tiny synthetic runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_engine import RECIPE, esskit

import esskit.engine as engine

TINY = ["train.steps=2", "train.batch_size=2", "data.crop=[32,32]", "data.base_size=[32,32]",
        "data.synthetic_image_size=32", "data.synthetic_train_size=4", "data.synthetic_val_size=2",
        "train.log_every=1", "eval.batch_size=2", "model.pretrained=false"]

pytestmark = pytest.mark.usefixtures("one_thread")


def train(run: Path, *extra: str, resume: bool = False):
    return esskit("train", str(RECIPE), "--resume" if resume else "--out", str(run), overrides=TINY + list(extra))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob("checkpoint-*"))


def one_line_error(result, *parts: str) -> None:
    """The command failed with one `error:` line holding every part (after any training output)."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(part in last for part in parts), result.output


def nan_at_call(monkeypatch, nan_call: int) -> list[float]:
    """Make the `nan_call`-th loss (1-based, one per micro-batch) NaN; returns the losses seen."""
    real_loss, seen = engine.segmentation_loss, []

    def loss(output, target, cfg):
        value, parts = real_loss(output, target, cfg)
        value = value * float("nan") if len(seen) + 1 == nan_call else value
        seen.append(float(value.detach()))
        return value, parts

    monkeypatch.setattr(engine, "segmentation_loss", loss)
    return seen


def test_nan_in_an_earlier_micro_batch_stops_before_the_step(tmp_path, monkeypatch):
    nan_at_call(monkeypatch, 3)  # step 2's first of two micro-batches
    run = tmp_path / "run"
    result = train(run, "train.grad_accum=2", "train.save_every=1")
    one_line_error(result, "loss is nan at step 2", f"the newest one, {run / 'checkpoint-00000001'}, is intact")
    assert checkpoints(run) == ["checkpoint-00000001"]


def test_nan_before_any_checkpoint_says_none_was_saved(tmp_path, monkeypatch):
    nan_at_call(monkeypatch, 1)
    result = train(tmp_path / "run")
    one_line_error(result, "loss is nan at step 1", "none was saved")


def test_logged_loss_and_lr_are_those_of_the_step(tmp_path, monkeypatch):
    seen = nan_at_call(monkeypatch, 0)  # never NaN: only records the micro-batch losses
    run = tmp_path / "run"
    assert train(run, "train.grad_accum=2", "optim.warmup_steps=0", "optim.lr=0.002").exit_code == 0
    steps = [r for r in records(run) if "loss" in r]
    assert [r["loss"] for r in steps] == pytest.approx([sum(seen[:2]) / 2, sum(seen[2:]) / 2], rel=1e-6)
    # poly schedule over 2 steps, power 0.9: step 1 runs at the base lr, step 2 at half of it ** 0.9
    assert [r["lr"] for r in steps] == pytest.approx([0.002, 0.002 * 0.5 ** 0.9])


def test_an_evaluation_midway_leaves_the_training_run_as_it_was(tmp_path):
    """The evaluation's loader takes no seed from the global RNG, which the decoder's dropout draws from."""
    losses = []
    for name, every in (("plain", "0"), ("evaluated", "2")):
        assert train(tmp_path / name, "train.steps=4", f"train.eval_every={every}").exit_code == 0
        losses.append([r["loss"] for r in records(tmp_path / name) if "loss" in r])
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_bad_data_fails_before_the_model_and_leaves_no_run_folder(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model (and its pretrained weights) came before the data check")

    monkeypatch.setattr(engine, "model_from_config", no_model)
    run = tmp_path / "new" / "run"
    one_line_error(train(run, "data.val_split=test", "model.pretrained=true"), "data.val_split = 'test'")
    assert not (tmp_path / "new").exists()  # the folders the writability check made are gone again


def test_eval_batch_of_different_image_sizes_asks_for_batch_size_1(tmp_path, monkeypatch):
    from esskit import data
    from esskit.data.synthetic import SyntheticSegmentation

    real = data.DATASETS["synthetic"]

    def val_of_two_sizes(cfg, split):
        if split == "train":
            return real(cfg, split)
        return torch.utils.data.ConcatDataset([SyntheticSegmentation(cfg.num_classes, 1, size, split)
                                               for size in (32, 40)])

    monkeypatch.setitem(data.DATASETS, "synthetic", val_of_two_sizes)
    run = tmp_path / "run"
    one_line_error(train(run, "train.steps=1"), "eval.batch_size = 2", "32x32, 40x40", "set eval.batch_size = 1")
    assert esskit("evaluate", str(RECIPE), "--checkpoint", str(run),
                  overrides=TINY + ["eval.batch_size=1"]).exit_code == 0
    assert json.loads((run / "eval.json").read_text())["pixels"] > 32 * 32


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    run = tmp_path / "run"
    assert train(run).exit_code == 0
    before = {name: (run / name).read_bytes() for name in ("config.toml", "eval.json", "metrics.jsonl")}
    one_line_error(train(run, "train.steps=1", resume=True),
                   f"train.steps = 1 but {run / 'checkpoint-00000002'} is at step 2; set train.steps >= 2")
    assert {name: (run / name).read_bytes() for name in before} == before


def test_checkpoint_of_another_model_names_the_parameter(tmp_path):
    run = tmp_path / "run"
    assert train(run, "train.steps=1").exit_code == 0
    result = esskit("evaluate", str(RECIPE), "--checkpoint", str(run), overrides=TINY + ["data.num_classes=20"])
    one_line_error(result, "is [19, 32] in the checkpoint but [20, 32] in the model",
                   f"must match {run / 'config.toml'}", "data.num_classes")


def test_weights_from_a_checkpoint_skip_the_imagenet_download(tmp_path, monkeypatch):
    real_build, asked = engine.build_model, []

    def build_offline(*args, **kwargs):
        asked.append(args[5])  # pretrained
        return real_build(*args[:5], False, *args[6:], **kwargs)

    monkeypatch.setattr(engine, "build_model", build_offline)
    run = tmp_path / "run"
    assert train(run, "train.stop_after=1").exit_code == 0
    assert train(run, "model.pretrained=true", resume=True).exit_code == 0
    result = esskit("evaluate", str(RECIPE), "--checkpoint", str(run), overrides=TINY + ["model.pretrained=true"])
    assert result.exit_code == 0, result.output
    assert asked == [False, False, False]


def test_metrics_log_starts_fresh_and_resume_drops_steps_after_the_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 99, "loss": 1.0}) + "\n")  # an older run's
    assert train(run, "train.steps=4", "train.save_every=2", "train.keep_checkpoints=3").exit_code == 0
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 4]  # four steps, then the final evaluation
    # A crash after step 4 was logged, before its checkpoint: the resume retrains steps 3 and 4.
    for path in (run / "checkpoint-00000004").iterdir():
        path.unlink()
    (run / "checkpoint-00000004").rmdir()
    (run / "eval.json").unlink()
    written = []
    monkeypatch.setattr(engine, "write_atomic", lambda path, text: written.append(Path(path).name))
    assert train(run, "train.steps=4", "train.save_every=2", "train.keep_checkpoints=3", resume=True).exit_code == 0
    assert [(r["step"], "eval" in r) for r in records(run)] == [(1, False), (2, False), (3, False), (4, False),
                                                                (4, True)]
    assert written == ["eval.json"]  # atomically, never half a file
    monkeypatch.undo()  # a finished run resumed evaluates again, and logs that evaluation once
    assert train(run, "train.steps=4", "train.save_every=2", "train.keep_checkpoints=3", resume=True).exit_code == 0
    assert [(r["step"], "eval" in r) for r in records(run)] == [(1, False), (2, False), (3, False), (4, False),
                                                                (4, True)]


def test_a_crashed_save_leaves_no_temporary_checkpoint_behind(tmp_path):
    # what a process killed mid-save leaves: a partial .tmp-checkpoint at a step the run never saves again
    run = tmp_path / "run"
    (run / ".tmp-checkpoint-00000007").mkdir(parents=True)
    (run / ".tmp-checkpoint-00000007" / "model.safetensors").write_bytes(b"partial")
    assert train(run).exit_code == 0
    assert checkpoints(run) == ["checkpoint-00000002"] and not list(run.glob(".tmp-*"))


def test_batchnorm_with_one_value_per_channel_is_a_one_line_error(tmp_path):
    # batch 1 at 16 px: the stride-16 map is 1 x 1, and BatchNorm refuses a single value per channel
    result = train(tmp_path / "run", "train.batch_size=1", "data.crop=[16,16]", "data.base_size=[16,16]",
                   "data.synthetic_image_size=16")
    one_line_error(result, "train.batch_size = 1", "data.crop = [16, 16]", "model.norm = 'gn'")


def test_refused_resume_keeps_config_and_evaluate_checks_what_the_weights_mean(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert train(run, "train.stop_after=1", "method.normalize=false").exit_code == 0
    saved = (run / "config.toml").read_text()
    # a resume that fails on its data leaves the run's recipe as it was (predict and analyze read it)
    one_line_error(train(run, "method.normalize=false", "train.steps=8", "data.val_split=vall", resume=True),
                   "data.val_split = 'vall'")
    assert (run / "config.toml").read_text() == saved
    # ... and so does one that fails at its first step (written with the resume's first checkpoint)
    monkeypatch.setattr(engine, "segmentation_loss", lambda *a: (_ for _ in ()).throw(engine.ConfigError("no")))
    one_line_error(train(run, "method.normalize=false", "train.steps=8", resume=True), "error: no")
    assert (run / "config.toml").read_text() == saved
    monkeypatch.undo()
    assert train(run, "method.normalize=false", resume=True).exit_code == 0
    assert "steps = 2" in (run / "config.toml").read_text()
    logged = records(run)
    # the checkpoint was trained on raw vectors: evaluating it as a normalised model is refused
    one_line_error(esskit("evaluate", str(RECIPE), "--checkpoint", str(run), overrides=TINY),
                   "method.normalize (False -> True)", "evaluate with that recipe")
    # another method (ess_full with essnet would drop the head's stride-4 normalisation) is refused too
    one_line_error(esskit("evaluate", str(RECIPE), "--checkpoint", str(run),
                          overrides=TINY + ["method.normalize=false", "method.name=ess_full"]),
                   "method.name ('ess' -> 'ess_full')", "evaluate with that recipe")
    result = esskit("evaluate", str(RECIPE), "--checkpoint", str(run), overrides=TINY + ["method.normalize=false"])
    assert result.exit_code == 0, result.output
    assert records(run) == logged  # evaluate writes eval.json, not the training log
    # settings training refuses as ignored, in a run trained before that check: still evaluated
    old = (run / "config.toml").read_text().replace('negatives = "nearest"', 'negatives = "random"')
    (run / "config.toml").write_text(old.replace("knn_block = 1", "knn_block = 2"))
    result = esskit("evaluate", str(run / "config.toml"), "--checkpoint", str(run))
    assert result.exit_code == 0, result.output
    one_line_error(train(run, "method.normalize=false", "method.negatives=random", "method.knn_block=2",
                         "train.steps=6", resume=True), "negatives = 'random' searches nothing")


def test_errors_raised_in_dataloader_workers_stay_one_line(capsys):
    # torch re-raises a worker's DataError with the worker's traceback in its message (num_workers > 0,
    # as every real-data recipe runs): the CLI prints the original error's line only
    import typer

    from esskit.cli import _fail
    from esskit.errors import DataError

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\nesskit.errors.DataError: mask m.png is 10x10 but "
                        "image i.png is 40x60\n")
    with pytest.raises(typer.Exit) as exit_:
        _fail(wrapped)
    assert exit_.value.exit_code == 2
    assert capsys.readouterr().err == "error: mask m.png is 10x10 but image i.png is 40x60\n"


def test_non_finite_batchnorm_statistics_are_not_saved(tmp_path, monkeypatch):
    """A diverging lr can overflow BatchNorm's running variances while the loss (from batch
    statistics) stays finite: no checkpoint holds them, and the older one is really intact."""
    real_forward, calls = engine.forward, []

    def forward(model, images, cfg):
        calls.append(1)
        if len(calls) == 2:  # step 2, as an overflowing running_var would be
            bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))
        return real_forward(model, images, cfg)

    monkeypatch.setattr(engine, "forward", forward)
    run = tmp_path / "run"
    result = train(run, "train.save_every=1", "train.steps=3")
    one_line_error(result, "non-finite values at step 2", "running_var",
                   f"the newest one, {run / 'checkpoint-00000001'}, is intact")
    assert checkpoints(run) == ["checkpoint-00000001"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a GPU")
def test_fp16_training_on_the_cpu_is_refused(tmp_path):
    # accelerate would run it in fp32 under an fp16 label
    one_line_error(train(tmp_path / "run", "train.mixed_precision=fp16"), "train.mixed_precision = 'fp16' needs a GPU")


def test_damaged_or_renamed_checkpoints(tmp_path):
    """A copy named checkpoint-N-backup is not a checkpoint; a damaged one is a one-line error that
    names the older complete checkpoint; the weights are as readable as the other run files."""
    import shutil

    from esskit.files import new_file_mode

    run = tmp_path / "run"
    assert train(run, "train.save_every=1", "train.steps=2").exit_code == 0
    newest = run / "checkpoint-00000002"
    assert (newest / "model.safetensors").stat().st_mode & 0o777 == new_file_mode()  # safetensors writes 0600
    shutil.copytree(newest, run / "checkpoint-00000002-backup")
    assert esskit("evaluate", str(RECIPE), "--checkpoint", str(run), overrides=TINY).exit_code == 0
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    saved = (run / "config.toml").read_text()
    for command in (["evaluate", str(RECIPE), "--checkpoint", str(run)], ["train", str(RECIPE), "--resume", str(run)]):
        one_line_error(esskit(*command, overrides=TINY + ["train.steps=3"]), f"checkpoint {newest} is damaged",
                       f"move it aside to use {run / 'checkpoint-00000001'}")
    assert (run / "config.toml").read_text() == saved  # the refused resume (train.steps = 3) left the run's recipe
    (run / "checkpoint-00000001" / "trainer_state.json").write_text('{"step": ')
    with pytest.MonkeyPatch.context() as patch:  # refused before the evaluation, not after it
        patch.setattr(engine, "evaluate", lambda *a: pytest.fail("evaluated a damaged checkpoint"))
        one_line_error(esskit("evaluate", str(RECIPE), "--checkpoint", str(run / "checkpoint-00000001"),
                              overrides=TINY), "is damaged (trainer_state.json: Expecting value", "no older checkpoint")


@pytest.mark.parametrize("content", [b"", b"garbage\n"])
def test_unreadable_rng_states_refuse_the_resume(tmp_path, content):
    """accelerate's load_state resumes with fresh RNG states when it cannot read them, silently (random
    negatives, dropout and the like would then not continue the run): a damaged-checkpoint error."""
    run = tmp_path / "run"
    assert train(run, "train.save_every=1", "train.steps=2").exit_code == 0
    (run / "checkpoint-00000002" / "random_states_0.pkl").write_bytes(content)
    one_line_error(esskit("train", str(RECIPE), "--resume", str(run), overrides=TINY + ["train.steps=3"]),
                   f"checkpoint {run / 'checkpoint-00000002'} is damaged (random_states_0.pkl cannot be read",
                   f"move it aside to use {run / 'checkpoint-00000001'}")


# a full disk as safetensors / open() report it, and as torch.save does (optimizer.bin, *.pkl)
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3528 vs 3516")])
def test_a_failed_save_is_one_line_and_frees_its_space(tmp_path, monkeypatch, error):
    import accelerate

    real, calls = accelerate.Accelerator.save_state, []

    def full_disk(self, output_dir, **kwargs):
        calls.append(output_dir)
        real(self, output_dir, **kwargs)
        if len(calls) == 2:
            raise error

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full_disk)
    run = tmp_path / "run"
    one_line_error(train(run, "train.save_every=1", "train.steps=3"),
                   f"cannot write checkpoint-00000002 in {run}: {error}",
                   f"the newest one, {run / 'checkpoint-00000001'}, is intact")
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-00000001"]


def test_an_empty_out_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Path("") would be this directory
    one_line_error(esskit("train", str(RECIPE), overrides=TINY + ['train.out_dir=""']), "train.out_dir is empty")
    assert list(tmp_path.iterdir()) == []


def test_evaluation_searches_in_the_recipes_knn_blocks(tmp_path, monkeypatch):
    """method.knn_chunk_mib bounds the nearest-class search of evaluation too (it kept 64 MiB)."""
    import esskit.models.heads as heads

    real, budgets = heads.knn_exact, []
    monkeypatch.setattr(heads, "knn_exact", lambda x, mu, k, chunk_bytes: budgets.append(chunk_bytes)
                        or real(x, mu, k, chunk_bytes))
    assert train(tmp_path / "run", "method.knn_chunk_mib=1").exit_code == 0
    assert budgets and set(budgets) == {2**20}
