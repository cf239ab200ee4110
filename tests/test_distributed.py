"""Multi-process training on CPU (gloo) through the real launchers, SyncBN, distributed evaluation and
crash-safe checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from safetensors.torch import load_file

from esskit.syncbn import CpuSyncBatchNorm

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "synthetic.toml"
TINY = ["train.steps=4", "train.batch_size=2", "data.crop=[64,64]", "data.base_size=[64,64]",
        "data.synthetic_image_size=64", "data.synthetic_train_size=8", "data.synthetic_val_size=5",
        "train.log_every=1", "eval.batch_size=2", "model.backbone=resnet18"]
BIN = Path(sys.executable).parent


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def run(cmd, env=None, check=True, timeout=600):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def launch2(*args):
    """Two gloo processes through `accelerate launch` (torchrun underneath)."""
    return run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no",
                "-m", "esskit", *args])


def single(*args, **kw):
    return run([sys.executable, "-m", "esskit", *args], **kw)


def _syncbn_worker(rank: int, init_file: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    full = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3 + 1
    weight = torch.randn(3, dtype=torch.float64)
    local = full[rank * 2:(rank + 1) * 2].clone().requires_grad_()
    sync = CpuSyncBatchNorm(3, momentum=0.1).double()
    sync.weight.data.copy_(weight)
    y = sync(local)
    (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    if rank == 0:
        torch.save({"y": y.detach(), "grad": local.grad, "running_var": sync.running_var,
                    "running_mean": sync.running_mean}, out)
    dist.destroy_process_group()


def test_cpu_sync_batchnorm_equals_batchnorm_on_the_global_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_syncbn_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2)
    got = torch.load(out)
    torch.manual_seed(0)
    full = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3 + 1).requires_grad_()
    weight = torch.randn(3, dtype=torch.float64)
    bn = nn.BatchNorm2d(3, momentum=0.1).double()
    bn.weight.data.copy_(weight)
    y = bn(full)
    # Each rank weights its outputs by its local position: rank 0's half of the global objective.
    (y[:2] * torch.arange(y[:2].numel(), dtype=y.dtype).view_as(y[:2])).sum().backward(retain_graph=True)
    (y[2:] * torch.arange(y[2:].numel(), dtype=y.dtype).view_as(y[2:])).sum().backward()
    torch.testing.assert_close(got["y"], y[:2].detach())
    torch.testing.assert_close(got["grad"], full.grad[:2])
    torch.testing.assert_close(got["running_mean"], bn.running_mean)
    torch.testing.assert_close(got["running_var"], bn.running_var)


SLOW_SAVE_ON_RANK_1 = textwrap.dedent("""
    import os, sys, time
    import accelerate
    real_save = accelerate.Accelerator.save_state

    def slow_on_rank_1(self, output_dir=None, **kwargs):
        if self.process_index == 1:  # its random_states_1.pkl comes late
            time.sleep(2)
        return real_save(self, output_dir, **kwargs)

    accelerate.Accelerator.save_state = slow_on_rank_1
    from esskit.cli import app
    app(sys.argv[1:])
""")


def test_two_process_training_with_syncbn_and_distributed_eval(tmp_path):
    # Rank 1 writes its checkpoint files 2 s late (SLOW_SAVE_ON_RANK_1): each checkpoint is marked
    # whole only with them in it.
    run_dir, driver = tmp_path / "ddp", tmp_path / "driver.py"
    driver.write_text(SLOW_SAVE_ON_RANK_1)
    proc = run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", str(driver), "train", str(RECIPE),
                "--out", str(run_dir), *sets(TINY + ["train.sync_bn=true"])])
    assert "x 2 processes = 4" in proc.stdout
    assert (run_dir / "checkpoint-00000004" / "random_states_1.pkl").is_file()  # both ranks' RNG saved
    distributed = json.loads((run_dir / "eval.json").read_text())
    # 5 validation images over 2 processes: 3 + 2, no padding duplicates.
    single("evaluate", str(RECIPE), "--checkpoint", str(run_dir), *sets(TINY))
    alone = json.loads((run_dir / "eval.json").read_text())
    assert distributed["pixels"] == alone["pixels"] == 5 * 64 * 64 - _ignored_pixels(alone)
    for key in ("mIoU", "fwIoU", "pAcc", "mAcc"):
        assert distributed[key] == pytest.approx(alone[key], abs=1e-12)
    # One image: rank 1 evaluates none and must not wait on a collective that rank 0's forward skips
    run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "esskit", "evaluate", str(RECIPE),
         "--checkpoint", str(run_dir), *sets(TINY + ["eval.max_images=1"])], timeout=240)
    assert json.loads((run_dir / "eval.json").read_text())["pixels"] == 64 * 64 - _ignored_pixels(alone, 1)


def _ignored_pixels(report: dict, images: int | None = None) -> int:
    from esskit.config import load_config
    from esskit.data import IGNORE_INDEX, build_dataset

    cfg = load_config(RECIPE, TINY)
    val = build_dataset(cfg.data, "val", train=False)
    return sum(int((val[i][1] == IGNORE_INDEX).sum()) for i in range(images or len(val)))


def test_two_process_resume_matches_straight_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    launch2("train", str(RECIPE), "--out", str(straight), *sets(TINY + ["train.sync_bn=true"]))
    launch2("train", str(RECIPE), "--out", str(split), *sets(TINY + ["train.sync_bn=true", "train.stop_after=2"]))
    launch2("train", str(RECIPE), "--resume", str(split), *sets(TINY + ["train.sync_bn=true"]))
    a = load_file(straight / "checkpoint-00000004" / "model.safetensors")
    b = load_file(split / "checkpoint-00000004" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


KILL_DURING_SECOND_SAVE = textwrap.dedent("""
    import os, signal, sys
    import accelerate
    real_save, calls = accelerate.Accelerator.save_state, []

    def save_then_die(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        result = real_save(self, output_dir, **kwargs)
        if len(calls) == 2:  # files of the second checkpoint written, not yet renamed into place
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    accelerate.Accelerator.save_state = save_then_die
    from esskit.cli import app
    app(sys.argv[1:])
""")


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DURING_SECOND_SAVE)
    args = ["train", str(RECIPE), "--out", str(run_dir), *sets(TINY + ["train.save_every=2"])]
    proc = run([sys.executable, str(driver), *args], check=False)
    assert proc.returncode == -9
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-00000002"]
    assert (run_dir / ".tmp-checkpoint-00000004").is_dir()  # the interrupted save, never renamed
    load_file(run_dir / "checkpoint-00000002" / "model.safetensors")
    resumed = single("train", str(RECIPE), "--resume", str(run_dir), *sets(TINY + ["train.save_every=2"]))
    assert "at step 2" in resumed.stdout
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 4
    assert not (run_dir / ".tmp-checkpoint-00000004").exists()


def test_unwritable_run_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = single("train", str(RECIPE), "--out", str(blocker / "run"), *sets(TINY), check=False)
    assert proc.returncode == 2
    assert "is not writable" in proc.stderr and "run dir" not in proc.stdout


NAN_ON_RANK_1 = textwrap.dedent("""
    import os, sys
    import esskit.engine as engine
    real_loss, calls = engine.segmentation_loss, []

    def nan_on_rank_1_at_step_2(output, target, cfg):
        calls.append(1)
        loss, parts = real_loss(output, target, cfg)
        if os.environ.get("RANK") == "1" and len(calls) == 2:
            loss = loss * float("nan")
        return loss, parts

    engine.segmentation_loss = nan_on_rank_1_at_step_2
    from esskit.cli import app
    app(sys.argv[1:])
""")


def test_non_finite_loss_on_one_process_stops_all_without_hanging(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(NAN_ON_RANK_1)
    proc = run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", str(driver),
                "train", str(RECIPE), "--out", str(tmp_path / "run"), *sets(TINY)], check=False)
    assert proc.returncode != 0
    # Both ranks see the all-reduced loss, so both report the same step and exit.
    assert proc.stderr.count("loss is nan at step 2") == 2, proc.stderr[-2000:]
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_resume_mid_epoch_continues_the_data_order_on_a_sharded_loader():
    # Rank 0 of two processes (accelerate's BatchSamplerShard), 8 images, batch 2: 2 batches an
    # epoch. A resume at any batch must yield what an uninterrupted run yields from there, also in
    # epochs >= 1, where skip_first_batches' loader once kept the sampler at epoch 0.
    from types import SimpleNamespace

    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader, Dataset

    from esskit.data.transforms import EpochSampler
    from esskit.engine import endless_batches

    class Ids(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return i  # the sampler's index: epoch * 8 + image

    def batches(start: int, count: int) -> list[list[int]]:
        sampler = EpochSampler(8, seed=0)
        loader = prepare_data_loader(DataLoader(Ids(), 2, sampler=sampler, drop_last=True), num_processes=2,
                                     process_index=0, put_on_device=False)
        it = endless_batches(SimpleNamespace(skip_first_batches=skip_first_batches), loader, start, sampler)
        return [next(it).tolist() for _ in range(count)]

    straight = batches(0, 6)
    for start in range(1, 6):
        assert batches(start, 6 - start) == straight[start:], start


def test_two_process_batch_larger_than_training_set_names_the_processes(tmp_path):
    # 3 images, batch 2 per process: 2 x 2 = 4 > 3 (the message said "2 is larger than 3 images")
    proc = run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "esskit", "train", str(RECIPE),
                "--out", str(tmp_path / "run"), *sets(TINY + ["data.synthetic_train_size=3"])], check=False)
    assert proc.returncode != 0
    assert "train.batch_size = 2 x 2 processes = 4 is larger than the training set (3 images)" in proc.stderr


def test_a_finished_command_destroys_its_process_group():
    """A gloo group left to interpreter exit aborted a finished 2-process run now and then (SIGABRT,
    "terminate called without an active exception", seen in CI); end_processes destroys it."""
    import socket
    from types import SimpleNamespace

    import torch.distributed as dist

    from esskit.engine import end_processes

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    ended = []
    end_processes(SimpleNamespace(end_training=lambda: ended.append(True)))  # as an accelerate that keeps it
    assert ended and not dist.is_initialized()
