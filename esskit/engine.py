"""Training and evaluation loops over accelerate. Read `train` top to bottom: build, then for each
step: batch, loss, backward, optimizer step, log, evaluate, save."""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import signal
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import load as load_file, set_seed
from safetensors import SafetensorError
from torch.utils.data import DataLoader, Dataset, Subset

from esskit import report
from esskit.checkpoint import (SHAPE_KEYS, checkpoint_step, damaged, find_checkpoint, list_checkpoints, load_weights,
                               newest_checkpoint_note, save_checkpoint)
from esskit.config import Config, load_config, save_config
from esskit.data import build_dataset
from esskit.data.transforms import EpochSampler
from esskit.errors import ConfigError, DataError, TrainingError, is_batchnorm_one_value
from esskit.files import write_atomic
from esskit.inference import infer
from esskit.losses import segmentation_loss
from esskit.metrics import SegMetrics
from esskit.models import build_model, predict_labels
from esskit.optim import build_optimizer, build_scheduler, resume_schedule
from esskit.syncbn import convert_sync_batchnorm


def make_accelerator(cfg: Config, training: bool = True) -> Accelerator:
    """The run's Accelerator. fp16 on the CPU: accelerate would silently train in fp32 under an fp16
    label, so training refuses it; evaluation and prediction of an fp16 run fall back to fp32."""
    # One process may run several trainings (tests, profiler): drop the previous run's precision
    # settings, keep the distributed state.
    AcceleratorState._reset_state(reset_partial_state=False)
    cpu = cfg.train.cpu or not torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    if precision == "fp16" and cpu:
        if training:
            where = "train.cpu = true" if cfg.train.cpu else "no CUDA device is available"
            raise ConfigError(f"train.mixed_precision = 'fp16' needs a GPU ({where}); use 'bf16' or 'no' on the CPU")
        precision = "no"
    try:
        # Without CUDA, cpu=True is what makes accelerate use gloo under torchrun / accelerate launch.
        return Accelerator(cpu=cpu, mixed_precision=precision)
    except ValueError as e:
        raise ConfigError(f"train.mixed_precision = {cfg.train.mixed_precision!r}: {e}") from None


def model_from_config(cfg: Config, pretrained: bool | None = None) -> torch.nn.Module:
    """The recipe's model; `pretrained=False` when a checkpoint supplies every weight (fetching
    ImageNet weights first would only cost a download, and fail offline)."""
    pretrained = cfg.model.pretrained if pretrained is None else pretrained
    return build_model(cfg.model.backbone, cfg.data.num_classes, cfg.method.name, cfg.model.embed_dim,
                       cfg.model.norm, pretrained, backbone_bn_momentum=cfg.optim.backbone_bn_momentum,
                       normalize=cfg.method.normalize, variant=cfg.method.variant)


def build_split(cfg: Config, key: str, train: bool) -> Dataset:
    """The dataset of `data.<key>` (train_split or val_split), its loader's errors as one-line DataErrors."""
    split = getattr(cfg.data, key)
    try:
        return build_dataset(cfg.data, split, train=train, seed=cfg.train.seed)
    except ValueError as e:
        raise DataError(f"data.{key} = {split!r} cannot be loaded for data.name = {cfg.data.name!r}: {e}") from None


def train(cfg: Config, run_dir: Path, resume: bool = False) -> dict | None:
    """Train `cfg` into `run_dir` (continuing its newest checkpoint when `resume`); returns the
    final evaluation, or None when stopped early by a signal or `train.stop_after`."""
    cfg.method.check_training()
    accelerator = make_accelerator(cfg)
    checkpoint = prepare_run_dir(run_dir, cfg, resume, accelerator.is_main_process)
    set_seed(cfg.train.seed)
    # the data before the model: a bad data.root or val_split fails before pretrained weights download
    train_set = build_split(cfg, "train_split", train=True)
    val_set = build_split(cfg, "val_split", train=False)
    if len(train_set) < (needed := cfg.train.batch_size * accelerator.num_processes):
        per = f" x {accelerator.num_processes} processes = {needed}" if accelerator.num_processes > 1 else ""
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size}{per} is larger than the training set "
                          f"({len(train_set)} images)")
    model = model_from_config(cfg, pretrained=False if resume else None)
    if cfg.train.sync_bn and accelerator.num_processes > 1:
        model = convert_sync_batchnorm(model, accelerator.device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.train.steps, cfg.optim.warmup_steps)
    sampler = EpochSampler(len(train_set), cfg.train.seed)
    loader = DataLoader(train_set, cfg.train.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers, pin_memory=accelerator.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand: once per optimizer step

    start = 0
    if checkpoint:
        start = checkpoint_step(checkpoint)
        # each process saves its RNG state: their number is the process count that wrote the checkpoint
        writers = len(list(checkpoint.glob("random_states_*.pkl")))
        if writers and writers != accelerator.num_processes:
            raise ConfigError(f"--resume {run_dir}: {checkpoint.name} was written by {writers} processes and this run "
                              f"has {accelerator.num_processes}; the effective batch and each process's place in "
                              f"the data order depend on it: launch {writers} (accelerate launch --num_processes "
                              f"{writers})")
        # accelerate's load_state swallows any error reading this process's RNG states and resumes
        # with fresh ones, silently: read them first
        rng_states = checkpoint / f"random_states_{accelerator.process_index}.pkl"
        try:
            if rng_states.exists():
                load_file(rng_states)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise damaged(checkpoint, ValueError(f"{rng_states.name} cannot be read: {type(e).__name__}")) from None
        try:
            accelerator.load_state(str(checkpoint))
        except (OSError, SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # truncated files
            raise damaged(checkpoint, e) from None
        resume_schedule(optimizer, scheduler, cfg)
        report.info(accelerator, f"resumed from {checkpoint} at step {start}")
    if accelerator.is_main_process:  # now that model, data and checkpoint load: a refused run leaves nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        if not checkpoint:  # a resume writes it with its first checkpoint (a run that fails at its first step
            save_config(cfg, run_dir / "config.toml")  # keeps the config its checkpoints were trained with)
    effective = cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
    report.info(accelerator, f"{cfg.method.name} {cfg.model.backbone} C={cfg.data.num_classes}, "
                f"batch {cfg.train.batch_size} x {cfg.train.grad_accum} accum x {accelerator.num_processes} "
                f"processes = {effective} on {accelerator.device} (lr {cfg.optim.lr:g} as given, not "
                f"scaled with the batch), run dir {run_dir}")
    batches = endless_batches(accelerator, loader, start * cfg.train.grad_accum, sampler)
    log = report.MetricsLog(run_dir / "metrics.jsonl", accelerator.is_main_process)
    log.restart(start if checkpoint else None, final_step=cfg.train.steps)
    stop = StopSignal()
    steps, accum = cfg.train.steps, cfg.train.grad_accum
    with stop, report.TrainProgress(accelerator, start, steps) as progress:
        for step in range(start, steps):
            model.train()
            done = step + 1
            lr = next(g["lr"] for g in optimizer.param_groups if g["name"] == "head")  # this step's base lr
            sums = None  # [loss, *parts] summed over the micro-batches
            for micro in range(accum):
                images, target = next(batches)
                sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
                with sync:
                    loss, parts = segmentation_loss(forward(model, images, cfg), target, cfg.method)
                    accelerator.backward(loss / accum)
                values = torch.stack([v.detach().float() for v in (loss, *parts.values())])
                sums = values if sums is None else sums + values
            # All-reduced before the optimizer step: every process sees a non-finite loss of any
            # micro-batch on any process, and stops at the same step before applying it; so with a
            # stop signal that reached only some processes (they must all save the checkpoint).
            stop_flag = sums.new_tensor([float(stop.requested)])
            means = accelerator.reduce(torch.cat([sums / accum, stop_flag]), "mean").tolist()
            loss_value, parts, stop_any = means[0], dict(zip(parts, means[1:-1])), means[-1] > 0
            if not math.isfinite(loss_value):
                first = f" (the first step after resuming: {checkpoint} may also be damaged)" if (
                    checkpoint and done == start + 1) else ""
                raise TrainingError(f"loss is {loss_value} at step {done}; no checkpoint was written for it "
                                    f"({newest_checkpoint_note(run_dir)}); lower optim.lr or disable "
                                    f"train.mixed_precision{first}")
            if cfg.optim.clip_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16: GradScaler skips inf-gradient steps
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.update(done, loss_value, lr)
            if done % cfg.train.log_every == 0 or done == steps:
                log.write({"step": done, "loss": loss_value, "lr": lr, "s_per_step": progress.seconds_per_step,
                           **parts})
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < steps:
                result = evaluate(accelerator, model, cfg, val_set)
                log.write({"step": done, "eval": report.scalars(result)})
                progress.note(f"step {done}: mIoU {result['mIoU']:.4f}")
            stopping = stop_any or (cfg.train.stop_after and done - start >= cfg.train.stop_after)
            if stopping or done == steps or (cfg.train.save_every and done % cfg.train.save_every == 0):
                check_finite_state(accelerator, model, run_dir, done)
                if accelerator.is_main_process:
                    save_config(cfg, run_dir / "config.toml")  # what this checkpoint was trained with
                save_checkpoint(accelerator, run_dir, done, cfg.train.keep_checkpoints)
            if stopping and done < steps:
                report.info(accelerator, f"stopped at step {done}; checkpoint saved, continue with "
                            f"--resume {run_dir}")
                end_processes(accelerator)
                return None
    result = evaluate(accelerator, model, cfg, val_set)
    finish_eval(accelerator, run_dir, cfg, result, steps)
    end_processes(accelerator)
    return result


def end_processes(accelerator: Accelerator) -> None:
    """Destroy the process group once a command has succeeded: a gloo group left to interpreter exit
    can abort a finished run (SIGABRT, "terminate called without an active exception"). Not after an
    error, where another rank may still wait in a collective (torchtitan does the same)."""
    accelerator.end_training()  # destroys it since accelerate 1.0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def forward(model: torch.nn.Module, images: torch.Tensor, cfg: Config) -> dict:
    """The training forward; BatchNorm's refusal of one value per channel as a one-line error."""
    try:
        return model(images)
    except ValueError as e:
        if not is_batchnorm_one_value(e):
            raise
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} with data.crop = {cfg.data.crop}: a "
                          f"BatchNorm layer sees one value per channel ({str(e).split('input size ')[-1]}); use "
                          f"a larger data.crop, train.batch_size >= 2 or model.norm = 'gn'") from None


def check_finite_state(accelerator: Accelerator, model: torch.nn.Module, run_dir: Path, step: int) -> None:
    """Refuse to save non-finite weights or BatchNorm statistics: a diverging lr can overflow the
    running variances (or, far off, the weights) while the loss, from batch statistics, stays finite."""
    state = accelerator.unwrap_model(model).state_dict()
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    bad_any = accelerator.reduce(torch.tensor([float(len(bad))], device=accelerator.device), "sum").item() > 0
    if bad_any:  # all processes raise together: the one that saves must not wait for the others
        named = f" ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else " (on another process)"
        raise TrainingError(f"the model holds non-finite values at step {step}{named}; no checkpoint was "
                            f"written for it ({newest_checkpoint_note(run_dir)}); lower optim.lr or disable "
                            f"train.mixed_precision")


def endless_batches(accelerator: Accelerator, loader, start_batch: int, sampler: EpochSampler):
    """Batches across epochs, starting `start_batch` batches in (resume continues the data order)."""
    epoch, skip = divmod(start_batch, len(loader))
    while True:
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        # accelerate's loaders re-seed the sampler from their own epoch counter on each __iter__, but
        # skip_first_batches' loader does not reach a sharded (multi-process) one: set it directly too
        epoch_loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        yield from epoch_loader
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, cfg: Config, dataset: Dataset) -> dict:
    """Metrics over `dataset` (the validation split). Each process takes every world-size-th image
    (no padding duplicates) and the confusion counts are summed across processes."""
    indices = range(len(dataset) if not cfg.eval.max_images else min(cfg.eval.max_images, len(dataset)))
    shard = Subset(dataset, indices[accelerator.process_index::accelerator.num_processes])
    # Batches are stacked here, not in the workers: a size mismatch then raises a one-line error.
    # its own generator: a loader's iterator draws its base seed from the global RNG, which would shift
    # every later dropout mask of the training run that evaluates midway
    loader = DataLoader(shard, cfg.eval.batch_size, num_workers=cfg.data.num_workers, collate_fn=list,
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    metrics = SegMetrics(cfg.data.num_classes, device=accelerator.device)
    model.eval()
    # Without the DDP wrapper, whose forward broadcasts buffers: a process with fewer (or no) images
    # would leave that collective unpaired. Its one broadcast, done here once: rank 0's BN statistics.
    net = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1:
        for buffer in net.buffers():
            torch.distributed.broadcast(buffer, src=0)
    for batch in report.eval_progress(accelerator, loader):
        images, target = stack_same_size(batch, cfg)
        images, target = images.to(accelerator.device), target.to(accelerator.device)
        with accelerator.autocast():
            output = infer(net, images, cfg.eval, coarse=True)
        metrics.update(predict_labels(output, target.shape[-2:], cfg.method.knn_chunk_bytes,
                                      cfg.method.bounded_search), target)
    metrics.all_reduce()
    # class_pixels: target pixels per class, the frequency that `evaluate --per-class` sorts by (Fig. 6)
    return {**metrics.compute(), "pixels": metrics.num_pixels, "class_pixels": metrics.target_count.tolist()}


def stack_same_size(batch: list, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, targets) of one evaluation batch. Padding images of different sizes would change
    the model's predictions (padded context, image pooling), so they are refused instead."""
    sizes = sorted({"x".join(map(str, image.shape[-2:])) for image, _ in batch})
    if len(sizes) > 1:
        raise DataError(f"eval.batch_size = {cfg.eval.batch_size}, but the images of {cfg.data.name}/"
                        f"{cfg.data.val_split} differ in size ({', '.join(sizes)}); set eval.batch_size = 1")
    return torch.stack([image for image, _ in batch]), torch.stack([target for _, target in batch])


def finish_eval(accelerator: Accelerator, run_dir: Path, cfg: Config, result: dict, step: int,
                log: bool = True) -> None:
    """eval.json, and with `log` (training's final evaluation) its record in metrics.jsonl."""
    if accelerator.is_main_process:
        payload = {"step": step, "method": cfg.method.name, "num_classes": cfg.data.num_classes, **result}
        write_atomic(run_dir / "eval.json", json.dumps(report.json_safe(payload), indent=1))
        if log:
            report.MetricsLog(run_dir / "metrics.jsonl", True).write({"step": step, "eval": report.scalars(result)})
        report.metrics_table(result, title=f"{cfg.method.name} · {cfg.data.name} · step {step}")


# Keys that fix where a checkpoint stands in the data order: a resume skips step x grad_accum batches
# of batch_size images of this training set, shuffled by the seed
ORDER_KEYS = ("train.seed", "train.batch_size", "train.grad_accum", "data.name", "data.train_split",
              "data.synthetic_train_size")

# Keys that change what a checkpoint's outputs mean without changing its weights' shapes
MEANING_KEYS = ("method.name", "method.normalize", "method.variant", "data.mean", "data.std")


def evaluate_checkpoint(cfg: Config, checkpoint_path: Path) -> dict:
    """`esskit evaluate`: the recipe's model with the checkpoint's weights on the validation split."""
    checkpoint = find_checkpoint(checkpoint_path)
    step = checkpoint_step(checkpoint)  # now: a damaged trainer_state.json fails before the evaluation
    trained = checkpoint.parent / "config.toml"
    if trained.is_file():
        diffs = _differences(load_config(trained), cfg, MEANING_KEYS)
        if diffs:
            raise ConfigError(f"the recipe differs from {trained} in {diffs}, which the checkpoint was trained "
                              f"with; evaluate with that recipe")
    accelerator = make_accelerator(cfg, training=False)
    val_set = build_split(cfg, "val_split", train=False)
    model = model_from_config(cfg, pretrained=False)
    load_weights(model, checkpoint)
    model = accelerator.prepare(model)
    result = evaluate(accelerator, model, cfg, val_set)
    run_dir = checkpoint.parent
    finish_eval(accelerator, run_dir, cfg, result, step, log=False)  # not the training log
    end_processes(accelerator)
    return result


def prepare_run_dir(run_dir: Path, cfg: Config, resume: bool, is_main: bool) -> Path | None:
    """Check the run directory before any work: writable, not silently overwritten, and on resume
    holding a run of the same model shape whose checkpoint train.steps has not passed. Returns the
    checkpoint to resume from. (`train` writes config.toml once the recipe's model and data load.)"""
    checkpoint = None
    if resume:
        saved = run_dir / "config.toml"
        if not saved.is_file():
            raise ConfigError(f"--resume {run_dir}: no config.toml there; pass a run directory written by "
                              f"`esskit train`")
        trained = load_config(saved)
        diffs = _differences(trained, cfg, SHAPE_KEYS)
        if diffs:
            raise ConfigError(f"--resume {run_dir}: the recipe differs from the run in {diffs}")
        diffs = _differences(trained, cfg, ORDER_KEYS)
        if diffs:
            raise ConfigError(f"--resume {run_dir}: the recipe differs from the run in {diffs}, which place the "
                              f"checkpoint in the data order (step x grad_accum batches of batch_size images, "
                              f"shuffled by the seed); resume with the run's values, e.g. its {saved}")
        checkpoint = find_checkpoint(run_dir)
        if cfg.train.steps < (at := checkpoint_step(checkpoint)):
            raise ConfigError(f"train.steps = {cfg.train.steps} but {checkpoint} is at step {at}; "
                              f"set train.steps >= {at}")
    elif list_checkpoints(run_dir):
        raise ConfigError(f"run directory {run_dir} already holds checkpoints; continue it with "
                          f"--resume {run_dir} or choose another --out")
    if is_main:
        made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # innermost first
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"run directory {run_dir} is not writable: {e.strerror}") from None
        for path in made:  # made again once model and data load: a run refused before then leaves no folder
            path.rmdir()
    return checkpoint


def _differences(old: Config, new: Config, keys) -> str:
    """The `keys` whose values differ, as "key (old -> new), ..." ("" when none)."""
    return ", ".join(f"{k} ({_get(old, k)!r} -> {_get(new, k)!r})" for k in keys if _get(old, k) != _get(new, k))


def _get(cfg: Config, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


class StopSignal(contextlib.AbstractContextManager):
    """Ctrl-C / SIGTERM: finish the current step, save a checkpoint, exit cleanly. A second one acts
    at once, as without esskit (a stuck step or a long evaluation can still be quit)."""

    requested = False

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self._restore()

    def _restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def __exit__(self, *exc):
        self._restore()
        return False

