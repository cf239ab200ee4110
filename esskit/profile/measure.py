"""`esskit profile --device cuda`: real training steps on a GPU capped at the memory budget.

`torch.cuda.set_per_process_memory_fraction` makes the caching allocator refuse to reserve more
than the budget, so a big GPU behaves like the paper's 12 GB card (the CUDA context, ~0.3-0.5 GiB
outside the allocator, is not part of the budget). A batch fits when two training steps run without
an out-of-memory error; peaks are `max_memory_reserved` (what the cap limits) and
`max_memory_allocated`. Times are medians over synchronised iterations after a warm-up.
"""

from __future__ import annotations

import gc
import time
from statistics import median

import torch

from esskit.config import Config
from esskit.errors import EsskitError, is_batchnorm_one_value
from esskit.profile.estimate import estimate_training_peak
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
        self._built: tuple | None = None  # (cfg, model, optimizer) of the cell being measured

    def _training(self, cfg: Config):
        """The cell's model and optimizer, built once per cell: from a trial's second step on, a fresh
        model holds what a reused one holds (weights, momentum), so peaks are the same, and building
        a ResNet50 for each of a cell's ~10 trials was overhead (~0.5 s each on a CPU)."""
        if self._built is None or self._built[0] != cfg:
            self._built = None
            release_memory(self.device)
            self._built = (cfg, *build_training(cfg, self.device))
        return self._built[1:]

    def try_batch(self, cfg: Config, batch: int) -> Trial:
        release_memory(self.device)
        reason = None
        try:
            self._train_steps(cfg, batch, steps=2)
        except Exception as error:  # noqa: BLE001 (only out-of-memory and size limits are expected)
            reason = failure_reason(error)
            if reason is None:
                raise
            # The frames holding the trial's tensors go with the exception; gradients that the
            # failed backward left on the reused model must go too, or they weigh on the next trial.
            if self._built is not None:
                self._built[1].zero_grad(set_to_none=True)
        fits = reason is None
        peak = torch.cuda.max_memory_reserved(self.device)
        peak_allocated = torch.cuda.max_memory_allocated(self.device)
        release_memory(self.device)
        # After a failure the peaks are those of a partial step: a lower bound, not a result.
        return Trial(batch, fits, peak if fits else None, peak_allocated if fits else None,
                     None if fits or reason == "out of memory" else reason)

    def _train_steps(self, cfg: Config, batch: int, steps: int, time_knn: bool = False) -> list[tuple[float, float]]:
        """Run `steps` training steps; the seconds of each, synchronised, and of the kNN searches in
        it (0 unless `time_knn`: the synchronisation around each search costs a little)."""
        model, optimizer = self._training(cfg)
        amp = MixedPrecision(cfg.train.mixed_precision, "cuda")
        seconds = []
        for _ in range(steps):
            images, target = synthetic_batch(cfg, batch, self.device)
            knn = TimedKnn.for_config(cfg, lambda: torch.cuda.synchronize(self.device)) if time_knn else None
            torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            training_step(model, optimizer, images, target, cfg, amp, knn)
            torch.cuda.synchronize(self.device)
            seconds.append((time.perf_counter() - start, knn.seconds if knn else 0.0))
        return seconds

    def extra(self, cfg: Config, batch: int, tried: int | None = None) -> dict:
        """Times at `batch` (the max batch or --batch; 0: none ran), and the fake-tensor estimate at
        the same batch, or at `tried` when none ran, for comparison (reserved and allocated)."""
        estimate = estimate_training_peak(cfg, batch or tried or 1, cap_bytes=self.budget_bytes)
        row = {"estimated_peak_mib": round(estimate.peak_bytes / MIB, 1),
               "estimated_peak_allocated_mib": round(estimate.peak_allocated_bytes / MIB, 1)}
        if batch == 0:
            return row
        release_memory(self.device)
        try:
            steps = self._train_steps(cfg, batch, TRAIN_WARMUP + TRAIN_ITERS)[TRAIN_WARMUP:]
            seconds = median([s for s, _ in steps])
            row["train_s_per_iter"] = round(seconds, 4)
            row["train_s_per_img"] = round(seconds / batch, 4)
            if cfg.method.name != "baseline":  # separate steps: the timed kNN's syncs stay out of the above
                release_memory(self.device)
                timed = self._train_steps(cfg, batch, TRAIN_WARMUP + TRAIN_ITERS, time_knn=True)[TRAIN_WARMUP:]
                row["knn_s_per_iter"] = round(median([k for _, k in timed]), 4)
                row["knn_share"] = round(row["knn_s_per_iter"] / seconds, 4)
            release_memory(self.device)
            row["infer_s_per_img"] = round(self._inference_seconds(cfg), 4)
        except Exception as error:  # noqa: BLE001
            reason = failure_reason(error)
            if reason is None:
                raise
            # Fragmentation over more iterations can tip the max batch over the cap.
            row["note"] = f"{reason} while timing at batch {batch}"
            row["timing_failed"] = True
        release_memory(self.device)
        return row

    def _inference_seconds(self, cfg: Config) -> float:
        """Median seconds of forward + `predict_labels` on one image of the crop size (eval mode)."""
        model, _ = self._training(cfg)
        model.eval()
        amp = MixedPrecision(cfg.train.mixed_precision, "cuda")
        images, _ = synthetic_batch(cfg, 1, self.device)
        seconds = []
        try:
            for i in range(INFER_WARMUP + INFER_ITERS):
                torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                inference_step(model, images, amp, cfg)
                torch.cuda.synchronize(self.device)
                if i >= INFER_WARMUP:
                    seconds.append(time.perf_counter() - start)
        finally:
            model.train()
        return median(seconds)

