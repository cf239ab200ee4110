"""`esskit profile --device cuda`: real training steps on a GPU capped at the memory budget
(and `--device cpu`: the estimate's max batch, timed on the CPU).

`torch.cuda.set_per_process_memory_fraction` makes the caching allocator refuse to reserve more
than the budget, so a big GPU behaves like the paper's 12 GB card (the CUDA context, ~0.3-0.5 GiB
outside the allocator, is not part of the budget). A batch fits when two training steps run without
an out-of-memory error; peaks are `max_memory_reserved` (what the cap limits) and
`max_memory_allocated`. Times are medians over synchronised iterations after a warm-up.
"""

from __future__ import annotations

import gc
import platform
import time
from pathlib import Path
from statistics import median
from typing import Callable

import torch

from esskit.config import Config
from esskit.errors import EsskitError, is_batchnorm_one_value
from esskit.profile.estimate import Estimator, estimate_training_peak, reads_tensor_values
from esskit.profile.search import BATCHNORM_FAILURE, GIB, MIB, Trial
from esskit.profile.step import (MixedPrecision, TimedKnn, build_training, inference_step, synthetic_batch,
                                 training_step)

TRAIN_WARMUP, TRAIN_ITERS = 2, 5
INFER_WARMUP, INFER_ITERS = 3, 10
# cuDNN/cuBLAS report a failed workspace allocation with these instead of OutOfMemoryError.
OOM_MESSAGES = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")
# Kernels that index with 32 bits refuse tensors of 2^31+ elements at launch (e.g. the baseline's
# [8, 1284, 512, 512] logits on an H200 with room for them); non-sticky, so the search goes on.
SIZE_LIMIT_MESSAGES = ("CUDA error: invalid argument", "invalid configuration argument")


def gpu_name_and_memory(device: torch.device) -> tuple[str, int]:
    """The GPU's name and total memory: from NVML (nvidia-ml-py) when installed, else from torch."""
    props = torch.cuda.get_device_properties(device)
    try:
        import pynvml
    except ImportError:
        return props.name, props.total_memory
    try:
        pynvml.nvmlInit()
        try:
            # By PCI address: NVML indices ignore CUDA_VISIBLE_DEVICES, torch's do not.
            bus = getattr(props, "pci_bus_id", None)
            if bus is None:
                handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            else:
                handle = pynvml.nvmlDeviceGetHandleByPciBusId(
                    f"{props.pci_domain_id:08x}:{bus:02x}:{props.pci_device_id:02x}.0")
            name = pynvml.nvmlDeviceGetName(handle)
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return props.name, props.total_memory
    return (name.decode() if isinstance(name, bytes) else name), int(total)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in OOM_MESSAGES))


def failure_reason(error: BaseException) -> str | None:
    """Why a batch cannot run ("out of memory" or a kernel's size limit), or None for a real bug."""
    if is_out_of_memory(error):
        return "out of memory"
    if isinstance(error, RuntimeError) and any(m in str(error) for m in SIZE_LIMIT_MESSAGES):
        return "a kernel refused the tensor size (CUDA error: invalid argument; 2^31+ elements?)"
    return BATCHNORM_FAILURE if is_batchnorm_one_value(error) else None


def release_memory(device: torch.device) -> None:
    """Return everything the last trial left to the allocator, then the allocator's cache to the
    driver, so each trial starts from an empty GPU and its peak is its own."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


class StepTimer:
    """A cell's training-step, kNN and inference times on one device: the trainer's step
    (`esskit.profile.step`), synchronised on CUDA. Model and optimizer are built once per cell: from
    a trial's second step on, a fresh model holds what a reused one holds (weights, momentum), so
    peaks are the same, and building a ResNet50 for each of a cell's ~10 trials was overhead (~0.5 s
    each on a CPU). `before_build` runs first (the GPU's release of the last cell's memory)."""

    def __init__(self, device: torch.device, before_build: Callable[[], None] = lambda: None):
        self.device, self.before_build = device, before_build
        self.built: tuple | None = None  # (cfg, model, optimizer, amp) of the cell being timed

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def training(self, cfg: Config):
        if self.built is None or self.built[0] != cfg:
            self.built = None
            self.before_build()
            # one GradScaler per cell, as one per run in training: a scale backed off stays backed off
            self.built = (cfg, *build_training(cfg, self.device),
                          MixedPrecision(cfg.train.mixed_precision, self.device.type))
        return self.built[1:]

    def train_steps(self, cfg: Config, batch: int, steps: int, time_knn: bool = False,
                    inputs: str | None = None) -> list[tuple[float, float]]:
        """Run `steps` training steps; the seconds of each, synchronised, and of the kNN searches in
        it (0 unless `time_knn`: the synchronisation around each search costs a little). `inputs`:
        "noise" or "synthetic" (`synthetic_batch`; default profile.inputs)."""
        model, optimizer, amp = self.training(cfg)
        seconds = []
        for step in range(steps):  # a new batch each step
            images, target = synthetic_batch(cfg, batch, self.device, inputs or cfg.profile.inputs, step)
            knn = TimedKnn.for_config(cfg, self.sync) if time_knn else None
            self.sync()
            start = time.perf_counter()
            training_step(model, optimizer, images, target, cfg, amp, knn)
            self.sync()
            seconds.append((time.perf_counter() - start, knn.seconds if knn else 0.0))
        return seconds

    def times(self, cfg: Config, batch: int, between: Callable[[], None] = lambda: None) -> dict:
        """Medians at `batch`: s/iter and s/img of training, the kNN's seconds and share of the step
        (not for the baseline), s/img of inference; `between` runs between the three timed runs."""
        steps = [s for s, _ in self.train_steps(cfg, batch, TRAIN_WARMUP + TRAIN_ITERS)[TRAIN_WARMUP:]]
        seconds = median(steps)
        # to the microsecond, and shares from the unrounded seconds: a GPU step of 0.005 s/img
        # would keep one significant digit at 4 decimals
        row = {"train_s_per_iter": round(seconds, 6), "train_s_per_img": round(seconds / batch, 6),
               # (slowest - fastest) / median of the timed steps: how far a ratio of two cells can be trusted
               "train_spread": round((max(steps) - min(steps)) / seconds, 4)}
        if cfg.method.name != "baseline":  # separate steps: the timed kNN's syncs stay out of the above
            between()
            timed = self.train_steps(cfg, batch, TRAIN_WARMUP + TRAIN_ITERS, time_knn=True)[TRAIN_WARMUP:]
            knn = median([k for _, k in timed])
            row["knn_s_per_iter"], row["knn_share"] = round(knn, 6), round(knn / seconds, 4)
        between()
        row["infer_s_per_img"] = round(self.inference_seconds(cfg), 6)
        return row

    def inference_seconds(self, cfg: Config) -> float:
        """Median seconds of forward + `predict_labels` on one image of the crop size (eval mode)."""
        model, _, amp = self.training(cfg)
        model.eval()
        images, _ = synthetic_batch(cfg, 1, self.device, cfg.profile.inputs)
        seconds = []
        try:
            for i in range(INFER_WARMUP + INFER_ITERS):
                self.sync()
                start = time.perf_counter()
                inference_step(model, images, amp, cfg)
                self.sync()
                if i >= INFER_WARMUP:
                    seconds.append(time.perf_counter() - start)
        finally:
            model.train()
        return median(seconds)


class CudaMeasurer:
    source = "measured"

    def __init__(self, budget_bytes: int, device: str = "cuda"):
        if not torch.cuda.is_available():
            raise EsskitError("--device cuda: no CUDA GPU is visible here; use --device meta for an estimate")
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        name, total = gpu_name_and_memory(self.device)
        allocator_total = torch.cuda.get_device_properties(self.device).total_memory
        if budget_bytes > allocator_total:
            raise EsskitError(f"--budget-gib {budget_bytes / GIB:g} exceeds this GPU's memory "
                              f"({name}, {allocator_total / GIB:.1f} GiB)")
        torch.cuda.set_per_process_memory_fraction(budget_bytes / allocator_total, self.device)
        self.budget_bytes = budget_bytes
        self.device_name = f"{name} ({total / GIB:.0f} GiB, capped at {budget_bytes / GIB:g} GiB)"
        self.timer = StepTimer(self.device, lambda: release_memory(self.device))

    def try_batch(self, cfg: Config, batch: int) -> Trial:
        release_memory(self.device)
        reason = None
        try:
            # noise, whatever profile.inputs: every label pixel enters the loss and feature_exact's bound
            # proves least there, the worst case the estimate models too
            self.timer.train_steps(cfg, batch, steps=2, inputs="noise")
        except Exception as error:  # noqa: BLE001 (only out-of-memory and size limits are expected)
            reason = failure_reason(error)
            if reason is None:
                raise
            # The frames holding the trial's tensors go with the exception; gradients that the
            # failed backward left on the reused model must go too, or they weigh on the next trial.
            if self.timer.built is not None:
                self.timer.built[1].zero_grad(set_to_none=True)
        fits = reason is None
        peak = torch.cuda.max_memory_reserved(self.device)
        peak_allocated = torch.cuda.max_memory_allocated(self.device)
        release_memory(self.device)
        # After a failure the peaks are those of a partial step: a lower bound, not a result.
        return Trial(batch, fits, peak if fits else None, peak_allocated if fits else None,
                     None if fits or reason == "out of memory" else reason)

    def extra(self, cfg: Config, batch: int, tried: int | None = None) -> dict:
        """Times at `batch` (the max batch or --batch; 0: none ran), and the fake-tensor estimate at
        the same batch, or at `tried` when none ran, for comparison (reserved and allocated)."""
        if reads_tensor_values(cfg):
            row = {"estimated_peak_mib": None, "estimated_peak_allocated_mib": None}
        else:
            estimate = estimate_training_peak(cfg, batch or tried or 1, cap_bytes=self.budget_bytes)
            row = {"estimated_peak_mib": round(estimate.peak_bytes / MIB, 1),
                   "estimated_peak_allocated_mib": round(estimate.peak_allocated_bytes / MIB, 1)}
        if batch == 0:
            return row
        release_memory(self.device)
        try:
            row.update(self.timer.times(cfg, batch, lambda: release_memory(self.device)))
        except Exception as error:  # noqa: BLE001
            reason = failure_reason(error)
            if reason is None:
                raise
            # Fragmentation over more iterations can tip the max batch over the cap.
            row["note"] = f"{reason} while timing at batch {batch}"
            row["timing_failed"] = True
        release_memory(self.device)
        return row


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


class CpuTimer(Estimator):
    """`esskit profile --device cpu`: the max batch and peaks of `--device meta` (a CPU has no
    allocator cap to search against), and the training, kNN and inference times measured on this
    CPU at that batch (or --batch): the time ratios and kNN share without a GPU, at small crops."""

    source = "estimated + CPU times"

    def __init__(self, budget_bytes: int):
        super().__init__(budget_bytes)
        threads = torch.get_num_threads()
        self.device_name = f"{cpu_name()} ({threads} torch thread{'s' if threads > 1 else ''})"
        self.timer = StepTimer(torch.device("cpu"))

    def extra(self, cfg: Config, batch: int, tried: int | None = None) -> dict:
        return self.timer.times(cfg, batch) if batch else {}
