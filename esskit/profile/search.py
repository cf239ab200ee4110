"""The largest batch that fits a memory budget, for every (method, C) of a profile.

`max_batch_size` doubles the batch from 1 until a training step does not fit, then bisects between
the last batch that fitted and the first that did not. `profile_grid` runs it for each cell with a
backend that answers "does this batch fit?": `estimate.Estimator` (fake tensors, CPU),
`measure.CudaMeasurer` (real steps on a GPU capped at the budget) or `measure.CpuTimer` (the
estimate, with times measured on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

from esskit.config import METHODS, PROFILE_DEVICES, Config
from esskit.errors import ConfigError
from esskit.profile.step import cell_config

MIB = 2**20
GIB = 2**30
PRECISIONS = ("no", "fp16", "bf16")
# One row per (method, C) in results.csv, in this order (results.json rows add the trials).
# `batch` is where peak and times were taken: the max batch, or --batch (then max_batch is empty).
COLUMNS = ("device", "method", "backbone", "classes", "crop", "precision", "budget_gib", "max_batch", "batch",
           "peak_mib", "peak_allocated_mib", "train_s_per_iter", "train_s_per_img", "train_spread", "knn_s_per_iter",
           "knn_share",
           "infer_s_per_img", "source", "estimated_peak_mib", "estimated_peak_allocated_mib", "note")


BATCHNORM_FAILURE = "BatchNorm sees one value per channel (use a larger --crop)"


@dataclass(frozen=True)
class Trial:
    """One training attempt at `batch`: whether it fitted and, when known, its peak memory."""

    batch: int
    fits: bool
    peak_bytes: int | None = None  # reserved memory (measured) or its estimate
    peak_allocated_bytes: int | None = None  # allocated memory (measured) or its estimate
    failure: str | None = None  # why it did not run, when not for lack of memory


def max_batch_size(try_batch: Callable[[int], Trial], limit: int = 256,
                   on_trial: Callable[[Trial], None] | None = None) -> tuple[int, list[Trial]]:
    """The largest batch in 1..`limit` whose trial fits (0 when neither batch 1 nor, after a BatchNorm
    failure at batch 1, batch 2 does), assuming that a batch fits whenever a larger one does.
    Returns it with every trial, in the order run."""
    trials: list[Trial] = []

    def fits(batch: int) -> bool:
        trial = try_batch(batch)
        trials.append(trial)
        if on_trial:
            on_trial(trial)
        return trial.fits

    if limit < 1:
        return 0, trials
    good, bad = 1, None
    if not fits(1):
        # BatchNorm cannot train on one value per channel: batch 1 fails where batch 2 may run.
        if trials[-1].failure != BATCHNORM_FAILURE or limit < 2 or not fits(2):
            return 0, trials
        good = 2
    while bad is None:
        if good >= limit:
            return good, trials
        candidate = min(2 * good, limit)
        if fits(candidate):
            good = candidate
        else:
            bad = candidate
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, trials


@dataclass(kw_only=True)
class ProfileSpec:
    """What `esskit profile` runs: every method for every class count C."""

    classes: list[int]  # class counts C
    methods: list[str] = field(default_factory=lambda: ["baseline", "ess"])  # any of METHODS
    backbone: str = "resnet50"  # timm backbone (Figure 1 / Table 6 use ResNet50)
    crop: tuple[int, int] = (512, 512)  # training crop [H, W] (Figure 1: 512x512)
    budget_gib: float = 12.0  # GPU memory budget (the paper's 12 GB Titan)
    precision: str = "no"  # train.mixed_precision: "no", "fp16" or "bf16"
    device: str = "meta"  # "meta": estimate on the CPU; "cuda": measure on the GPU; "cpu": estimate + CPU times
    max_batch: int = 256  # the search stops here
    batch: int = 0  # > 0: no search; peak and times at this batch (equal-batch comparisons)
    base: Config = field(default_factory=Config)  # recipe and --set values for everything else

    def __post_init__(self):
        if not self.classes or min(self.classes) < 2:
            raise ConfigError(f"--classes {self.classes}: give class counts >= 2, e.g. --classes 19,150,1284")
        if not self.methods:
            raise ConfigError(f"--methods: no method given; name some of {', '.join(METHODS)}")
        for method in self.methods:
            if method not in METHODS:
                raise ConfigError(f"--methods: {method!r} is not one of {', '.join(METHODS)}")
        if self.device not in PROFILE_DEVICES:
            raise ConfigError(f"--device {self.device!r} is not one of {', '.join(PROFILE_DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--mixed-precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        self.classes = list(dict.fromkeys(self.classes))  # a repeated C or method would run its cells twice
        self.methods = list(dict.fromkeys(self.methods))
        if not math.isfinite(self.budget_gib) or self.budget_gib <= 0:
            raise ConfigError(f"--budget-gib {self.budget_gib:g} must be a positive number of GiB, e.g. 12")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch {self.max_batch} must be at least 1, e.g. 256")
        if self.batch < 0:
            raise ConfigError(f"--batch {self.batch} must be 0 (search the max batch) or a batch size >= 1")
        if min(self.crop) < 1:
            raise ConfigError(f"--crop {self.crop[0]}x{self.crop[1]} must be positive, e.g. 512 or 400x800")
        if self.device == "meta" and self.base.profile.inputs != "noise":
            raise ConfigError(f"--inputs {self.base.profile.inputs} sets what timed steps see, and --device meta times "
                              f"nothing; use --device cuda or cpu, or drop --inputs")

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_gib * GIB)

    def config(self, method: str, num_classes: int) -> Config:
        return cell_config(self.base, method=method, num_classes=num_classes, backbone=self.backbone,
                           crop=self.crop, precision=self.precision)


class Backend(Protocol):
    source: str  # "measured", "estimated" or "estimated + CPU times"
    device_name: str

    def try_batch(self, cfg: Config, batch: int) -> Trial: ...

    # timings etc. at that batch (none when 0; `tried`: the batch that did not run, for --batch)
    def extra(self, cfg: Config, batch: int, tried: int | None = None) -> dict: ...


def profile_grid(spec: ProfileSpec, backend: Backend, on_update: Callable[[dict], None],
                 on_rows: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """One row per (method, C); `on_update` sees each row grow (for the live table), `on_rows` the
    finished rows after each cell (to save them as they come)."""
    rows = []
    for method in spec.methods:
        for num_classes in spec.classes:
            rows.append(profile_cell(spec, backend, method, num_classes, on_update))
            on_rows(rows)
    return rows


def profile_cell(spec: ProfileSpec, backend: Backend, method: str, num_classes: int,
                 on_update: Callable[[dict], None]) -> dict:
    cfg = spec.config(method, num_classes)
    row = dict.fromkeys(COLUMNS)
    row.update(device=backend.device_name, method=method, backbone=spec.backbone, classes=num_classes,
               crop=f"{spec.crop[0]}x{spec.crop[1]}", precision=spec.precision, budget_gib=spec.budget_gib,
               source=backend.source, note="")
    on_update({**row, "status": "searching"})

    def show(trial: Trial) -> None:
        verdict = "fits" if trial.fits else "too big"
        on_update({**row, "status": f"batch {trial.batch} {verdict} ({_mib(trial.peak_bytes)} MiB)"})

    if spec.batch:
        trials = [backend.try_batch(cfg, spec.batch)]
        show(trials[0])
        best = spec.batch if trials[0].fits else 0
    else:
        best, trials = max_batch_size(lambda batch: backend.try_batch(cfg, batch), spec.max_batch, show)
        row["max_batch"] = best
    row["batch"] = best
    at_best = next((t for t in reversed(trials) if t.batch == best), None)
    if at_best is not None:
        row["peak_mib"] = _mib(at_best.peak_bytes)
        row["peak_allocated_mib"] = _mib(at_best.peak_allocated_bytes)
    row["note"] = _note(spec, best, trials)
    if best > 0:
        on_update({**row, "status": "timing"})
    extra = backend.extra(cfg, best, spec.batch)
    # Two steps fitted but the timed run did not (fragmentation builds up over more steps): the max
    # batch is one that keeps training, so step down while a smaller batch fits (not with --batch).
    while extra.pop("timing_failed", False) and not spec.batch and best > 1:
        trial = backend.try_batch(cfg, best - 1)
        trials.append(trial)
        show(trial)
        if not trial.fits:
            break
        note = f"batch {best} ran out of memory over the timed steps; max batch lowered to {best - 1}"
        best = row["max_batch"] = row["batch"] = best - 1
        row.update(peak_mib=_mib(trial.peak_bytes), peak_allocated_mib=_mib(trial.peak_allocated_bytes), note=note)
        extra = backend.extra(cfg, best)
    row.update(extra)
    row["trials"] = [{"batch": t.batch, "fits": t.fits, "peak_mib": _mib(t.peak_bytes),
                      "peak_allocated_mib": _mib(t.peak_allocated_bytes)} for t in trials]
    on_update({**row, "status": "done"})
    return row


def _note(spec: ProfileSpec, best: int, trials: list[Trial]) -> str:
    # the search treats it as "too big"; say so, it is not a memory limit (unless a larger batch ran:
    # batch 1's BatchNorm failure when batch 2 fits)
    failed = next((t for t in trials if t.failure and t.batch > best), None)
    if failed is not None:
        return f"batch {failed.batch} does not run: {failed.failure}"
    if spec.batch and best == 0:
        needed = trials[0].peak_bytes
        return (f"batch {spec.batch} does not fit in {spec.budget_gib:g} GiB" +
                (f" (needs {needed / GIB:.1f} GiB)" if needed else " (out of memory)"))
    if best == 0:
        needed = trials[0].peak_bytes if trials else None
        if needed is None:
            return "batch 1 does not fit (out of memory)"
        return f"batch 1 needs {needed / GIB:.1f} GiB > {spec.budget_gib:g} GiB budget"
    if best == spec.max_batch and not spec.batch:
        return f"search limit --max-batch {spec.max_batch} reached"
    return ""


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / MIB, 1)
