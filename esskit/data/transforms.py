"""Training / evaluation transforms (torchvision.transforms.v2) and the dataset wrapper that applies
them with per-sample seeds and checks labels."""

from __future__ import annotations

import hashlib

import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from esskit.config import DataConfig
from esskit.data import IGNORE_INDEX
from esskit.errors import DataError


class RandomRescale:
    """mmseg's RandomResize(scale, ratio_range, keep_ratio=True): draw r in `ratio_range`, then
    rescale keeping the aspect ratio as large as fits the box `scale` * r, its long side against
    the long edge and its short side against the short edge (mmcv's rescale_size), so portrait and
    landscape images get the same scale. (torchvision's ScaleJitter reads its size as (W, H) and
    fits both edges in order, which halves Cityscapes' 1024 x 2048 at ratio 1.) Masks, as
    tv_tensors.Mask, are resized with nearest interpolation."""

    def __init__(self, scale, ratio_range):
        self.scale, (self.low, self.high) = scale, ratio_range

    def __call__(self, image, mask):
        ratio = self.low + float(torch.rand(())) * (self.high - self.low)
        size = keep_ratio_size(image.shape[-2:], self.scale, ratio)
        return v2.functional.resize(image, size), v2.functional.resize(mask, size)


def keep_ratio_size(size, box, ratio: float = 1.0) -> list[int]:
    """[H, W] of an image of `size` rescaled into `box` * ratio keeping its aspect ratio: the long
    side against the box's long edge, the short against the short (mmcv's rescale_size)."""
    h, w = size
    factor = ratio * min(max(box) / max(h, w), min(box) / min(h, w))
    return [max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))]


def train_transforms(cfg: DataConfig) -> v2.Compose:
    """mmseg-style: rescale to `base_size` times a random factor (RandomRescale), crop (padding
    masks with ignore; `cat_max_ratio` < 1 redraws one-class crops), flip, photometric distortion
    (`photometric`), normalise."""
    # pad with the mean colour, which Normalize makes 0: mmseg pads the normalised image with 0
    mean = [round(255 * m) for m in cfg.mean]
    crop = v2.RandomCrop(tuple(cfg.crop), pad_if_needed=True, fill={tv_tensors.Image: mean, tv_tensors.Mask: IGNORE_INDEX})
    steps = [RandomRescale(cfg.base_size, cfg.scale_range),
             crop if cfg.cat_max_ratio >= 1 else CategoryBalancedCrop(crop, cfg.cat_max_ratio)]
    if cfg.flip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.photometric:
        steps.append(photometric_distortion())
    return v2.Compose(steps + _to_float(cfg))


class CategoryBalancedCrop:
    """mmseg's RandomCrop(cat_max_ratio): redraw `crop` (up to `tries` times) while one class covers
    `cat_max_ratio` or more of the crop's labelled pixels, or it holds fewer than two classes."""

    def __init__(self, crop, cat_max_ratio: float, tries: int = 10):
        self.crop, self.cat_max_ratio, self.tries = crop, cat_max_ratio, tries

    def __call__(self, image, mask):
        for _ in range(self.tries):
            image_crop, mask_crop = self.crop(image, mask)
            counts = torch.bincount(mask_crop[mask_crop != IGNORE_INDEX].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return image_crop, mask_crop


def photometric_distortion() -> v2.Compose:
    """mmseg's PhotoMetricDistortion from torchvision's ColorJitter: brightness, contrast, saturation
    and hue, each with probability 1/2, on the uint8 image (masks pass through). Differences: the
    order is fixed (mmseg puts contrast after hue half the time) and brightness is a factor of
    0.875-1.125 (mmseg adds -32..32). Hue 0.1 of the circle is mmseg's hue_delta 18 on OpenCV's
    0-180 scale. (torchvision's RandomPhotometricDistort also permutes channels; mmseg does not.)"""
    jitters = [("brightness", (0.875, 1.125)), ("contrast", (0.5, 1.5)), ("saturation", (0.5, 1.5)), ("hue", 0.1)]
    return v2.Compose([v2.RandomApply([v2.ColorJitter(**{name: value})], p=0.5) for name, value in jitters])


def eval_transforms(cfg: DataConfig) -> v2.Compose:
    """Full resolution, normalised only."""
    return v2.Compose(_to_float(cfg))


def _to_float(cfg: DataConfig) -> list:
    return [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(cfg.mean, cfg.std)]


def _sample_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class EpochSampler(Sampler):
    """Shuffled indices whose order depends only on (seed, epoch); each index carries its epoch
    (epoch * len + i) so augmentation seeds follow the sample, not the process or the worker."""

    def __init__(self, length: int, seed: int, shuffle: bool = True):
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.length))
        g = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch))
        offset = self.epoch * self.length
        return iter((torch.randperm(self.length, generator=g) + offset).tolist())


class SegmentationSet(Dataset):
    """Applies `transform` to (image uint8 [3,H,W], mask int64 [H,W]) samples of `dataset`,
    seeding its randomness from (seed, epoch, index) so runs and resumes see the same crops.

    Labels outside [0, C) other than IGNORE_INDEX raise a DataError naming the sample, before
    they can reach a CUDA kernel.
    """

    def __init__(self, dataset: Dataset, transform, num_classes: int, seed: int = 0, name: str = "dataset"):
        self.dataset, self.transform, self.num_classes = dataset, transform, num_classes
        self.seed, self.name = seed, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        epoch, i = divmod(index, len(self.dataset))
        image, mask = self.dataset[i]
        self.check_labels(mask, i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, epoch, i))
            image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    def check_labels(self, mask: torch.Tensor, i: int) -> None:
        bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            value = int(mask[bad][0])
            raise DataError(f"{self.name} sample {i}: label {value} is outside [0, {self.num_classes}) "
                            f"and not ignore ({IGNORE_INDEX}); check data.num_classes")
