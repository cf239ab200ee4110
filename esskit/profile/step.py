"""The training and inference step that `esskit profile` measures (CUDA) and estimates (fake tensors).

It is the trainer's step (`esskit.engine.train`) assembled from the same parts: `model_from_config`,
`segmentation_loss`, `build_optimizer` and `predict_labels`, with mixed precision applied the way
accelerate's `prepare` applies it for the trainer: the forward under autocast, its outputs cast back
to fp32, the loss outside autocast, and a GradScaler for fp16.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from accelerate.utils import convert_to_fp32
from torchvision import tv_tensors

from esskit.config import SYNTHETIC_MIN_IMAGE_SIZE, Config, build_config, config_to_dict
from esskit.data.synthetic import SyntheticSegmentation
from esskit.data.transforms import eval_transforms
from esskit.engine import model_from_config
from esskit.knn import knn_backend
from esskit.losses import segmentation_loss
from esskit.models import predict_labels
from esskit.optim import build_optimizer

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cell_config(base: Config, *, method: str, num_classes: int, backbone: str, crop: tuple[int, int],
                precision: str) -> Config:
    """`base` (a recipe or the defaults) with one profiled cell's settings, validated like a recipe."""
    raw = config_to_dict(base)
    raw["method"]["name"] = method
    raw["data"]["num_classes"] = num_classes
    raw["data"]["crop"] = list(crop)
    raw["model"]["backbone"] = backbone
    raw["model"]["pretrained"] = False  # weights do not change memory or time; never download
    raw["train"]["mixed_precision"] = precision
    return build_config(raw, f"esskit profile ({method}, C={num_classes})")


class MixedPrecision:
    """accelerate's native AMP for one device type; `scaler=False` skips the GradScaler (its
    `.item()` on the found-inf flag cannot run on fake tensors; it holds only a few scalars)."""

    def __init__(self, precision: str, device_type: str, scaler: bool = True):
        self.dtype = AMP_DTYPES.get(precision)
        self.device_type = device_type
        use_scaler = scaler and precision == "fp16"
        # GradScaler's default 2^16 overflows fp16 on ESS's first gradients (backbone conv1 ~1.3 at
        # init), so it would skip the first steps of a trial, which then holds no momentum and times
        # steps that apply nothing; 2^10 is where those skips leave it (the baseline's are ~0.015)
        self.scaler = torch.amp.GradScaler(device_type, init_scale=2.0**10) if use_scaler else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def forward(self, model: torch.nn.Module, images: torch.Tensor) -> dict:
        with self.autocast():
            output = model(images)
        return convert_to_fp32(output) if self.dtype is not None else output

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


def build_training(cfg: Config, device: torch.device | str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The trainer's model (train mode) on `device` and its optimizer."""
    model = model_from_config(cfg).train()
    if torch.device(device).type != "cpu":  # fake tensors cannot be swapped by .to() even onto their device
        model.to(device)
    return model, build_optimizer(model, cfg)


def synthetic_batch(cfg: Config, batch: int, device, inputs: str = "noise",
                    index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels at the crop size. "noise": random images and labels, no ignore pixels:
    every pixel enters the loss (the worst case for memory), and the fake-tensor estimate relies on
    it (see estimate.py). "synthetic" (`profile.inputs`, timed steps only): batch `index` of the
    synthetic dataset's images, normalised as the trainer's, and its labels (regions of Zipf-drawn
    classes, thin ignore borders). Each is drawn square at the crop's long side and cut to the crop
    at its top left, without the trainer's rescaling and flips; drawn in threads (numpy releases the
    GIL; ~0.07 s an image at 512²)."""
    h, w = cfg.data.crop
    if inputs == "synthetic":
        data = SyntheticSegmentation(cfg.data.num_classes, batch * (index + 1), max(h, w, SYNTHETIC_MIN_IMAGE_SIZE))
        with ThreadPoolExecutor() as pool:
            samples = list(pool.map(data.__getitem__, range(batch * index, batch * (index + 1))))
        images, target = (torch.stack(parts)[..., :h, :w] for parts in zip(*samples))
        images = eval_transforms(cfg.data)(tv_tensors.Image(images)).as_subclass(torch.Tensor)  # the trainer's
        return images.to(device), target.to(device)
    images = torch.randn(batch, 3, h, w, device=device)
    target = torch.randint(0, cfg.data.num_classes, (batch, h, w), device=device)
    return images, target


class TimedKnn:
    """A kNN search that adds up the wall time spent inside it. `sync` (torch.cuda.synchronize on
    a GPU) runs before and after each call, so the time is that of the search's own kernels, not
    of the forward queued before it."""

    def __init__(self, knn, sync: Callable[[], None] | None = None):
        self.knn, self.sync, self.seconds, self._depth = knn, sync, 0.0, 0
        # the fused search's candidate build (search, normalisation and target drop in one kernel) is timed whole
        self.candidates = None if getattr(knn, "candidates", None) is None else self._candidates
        self.fused = getattr(knn, "fused", None)  # whether its kernels run (BoundedNeighbours.lookup asks)

    def timed(self, fn, *args):
        """fn(*args), its time added; the losses time shared neighbour lists' work through it. A
        search called inside is counted once, in the outer call."""
        if self._depth:
            return fn(*args)
        if self.sync:
            self.sync()
        start = time.perf_counter()
        self._depth += 1
        try:
            out = fn(*args)
        finally:
            self._depth -= 1
        if self.sync:
            self.sync()
        self.seconds += time.perf_counter() - start
        return out

    def __call__(self, queries, keys, k):
        return self.timed(self.knn, queries, keys, k)

    def _candidates(self, *args):
        return self.timed(self.knn.candidates, *args)

    @classmethod
    def for_config(cls, cfg: Config, sync: Callable[[], None] | None = None) -> "TimedKnn":
        return cls(knn_backend(cfg.method.knn, cfg.method.knn_chunk_bytes), sync)


def training_step(model, optimizer, images: torch.Tensor, target: torch.Tensor, cfg: Config,
                  amp: MixedPrecision, knn=None) -> None:
    """One optimizer step as `esskit.engine.train` runs it with grad_accum = 1 (`knn`: see
    `segmentation_loss`)."""
    loss, _ = segmentation_loss(amp.forward(model, images), target, cfg.method, knn)
    amp.backward(loss)
    amp.step(optimizer)
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def inference_step(model, images: torch.Tensor, amp: MixedPrecision, cfg: Config) -> torch.Tensor:
    """Forward and per-pixel labels, as `esskit.engine.evaluate` predicts."""
    return predict_labels(amp.forward(model, images), images.shape[-2:], cfg.method.knn_chunk_bytes,
                          cfg.method.bounded_search)
