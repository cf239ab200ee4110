"""File helpers shared by the dataset loaders: read images and label masks (8- or 16-bit PNG), write
16-bit masks, check the on-disk layout, and `PairDataset`, the (image file, mask file) dataset that
the file-based loaders return.

Masks with more than 255 values (COCO+LVIS has 1284 classes) are stored as 16-bit greyscale PNGs
(PIL mode "I;16"); nothing here goes through uint8, so no value above 255 is ever truncated.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from esskit.errors import DataError

# Modes whose pixels are label values; "RGB"/"RGBA" masks are colour-coded and need a dataset-specific
# palette lookup, so they are refused rather than silently averaged into grey levels.
_LABEL_MODES = {"P", "L", "I;16", "I;16B", "I;16L", "I", "1"}


_WIDE_GREY = {"I;16", "I;16B", "I;16L", "I"}  # 16-bit greyscale (PIL opens some as 32-bit "I")


def read_image(path: str | Path, upright: bool = False) -> torch.Tensor:
    """RGB image as uint8 [3, H, W] (greyscale and palette JPEGs/PNGs are converted to RGB, 16-bit
    greyscale scaled to 8 bits). `upright` applies the EXIF orientation, as image viewers show a
    photo (`esskit predict`); dataset images are read as stored, as their masks were drawn."""
    try:
        with Image.open(path) as image:
            if upright:
                image = ImageOps.exif_transpose(image)
            array = rgb_from_pil(image)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def rgb_from_pil(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image; 16-bit greyscale is scaled to 8 bits."""
    if image.mode in _WIDE_GREY:  # PIL's convert("RGB") would clip every value above 255
        values = np.asarray(image).astype(np.float64)
        # 32-bit "I" also holds 8-bit grey (datasets stores integer arrays so): scale only 16-bit values
        eight_bit = image.mode == "I" and values.size and 0 <= values.min() and values.max() <= 255
        grey = (values if eight_bit else (values.clip(0, 65535) / 257).round()).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def labels_from_pil(image: Image.Image, where: str | Path) -> np.ndarray:
    """Label values of a mask image as int64 [H, W]: palette indices for "P", raw values otherwise."""
    if image.mode not in _LABEL_MODES:
        raise DataError(f"mask {where} has mode {image.mode!r}; expected a single-channel label PNG "
                        "(palette, 8-bit or 16-bit greyscale)")
    return np.asarray(image).astype(np.int64)


def read_mask(path: str | Path) -> np.ndarray:
    """Label values of a mask PNG (or 32-bit TIFF) as int64 [H, W]; 16-bit PNGs keep values above 255."""
    try:
        with Image.open(path) as image:
            return labels_from_pil(image, path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read mask {path}: {e}") from None


def write_mask(path: str | Path, values: np.ndarray, bits: int | None = None) -> None:
    """Write label values as a greyscale PNG: 16-bit ("I;16") when `bits` = 16 or any value > 255;
    `bits` = 32 writes a 32-bit TIFF ("I", deflated) instead, as PNG has no wider greyscale.

    Written to a temporary name and renamed, so an interrupted run never leaves a truncated PNG that
    a resumed `esskit build-dataset` would take for finished.
    """
    values = np.asarray(values)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    bits = bits or (16 if high > 255 else 8)
    kind = "TIFF" if bits == 32 else "PNG"
    if low < 0 or high >= 2 ** min(bits, 31):
        raise ValueError(f"mask values {low}..{high} do not fit in {bits}-bit {kind} {path}")
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    image = Image.fromarray(values.astype({8: np.uint8, 16: np.uint16, 32: np.int32}[bits]))
    image.save(partial, format=kind, **({"compression": "tiff_adobe_deflate"} if bits == 32 else {}))
    os.replace(partial, path)


def require_root(cfg, dataset: str, layout: str) -> Path:
    """`data.root` as a Path, or a DataError naming the expected layout."""
    if not cfg.root:
        raise DataError(f"{dataset}: data.root is not set; expected {layout} (see `esskit datasets`)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"{dataset}: data.root {root} is not a directory; expected {layout}")
    return root


def require(path: Path, dataset: str, layout: str) -> Path:
    """`path` if it exists, else a DataError naming it and the expected layout."""
    if not path.exists():
        raise DataError(f"{dataset}: {path} not found; expected {layout}")
    return path


def read_list(path: Path, dataset: str, layout: str) -> list[str]:
    """Non-empty lines of a split list file (ImageSets/*.txt, imageLists/*.txt)."""
    try:
        text = require(path, dataset, layout).read_text()
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not UTF-8
        raise DataError(f"{dataset}: cannot read split list {path} ({e}); expected {layout}") from None
    names = [line.strip() for line in text.splitlines()]
    names = [name for name in names if name]
    if not names:
        raise DataError(f"{dataset}: split list {path} is empty")
    return names


def check_num_classes(cfg, dataset: str, names: Sequence[str]) -> None:
    if cfg.num_classes != len(names):
        raise DataError(f"{dataset} has {len(names)} classes but data.num_classes = {cfg.num_classes}; "
                        f"set data.num_classes = {len(names)}")


def shift_lut(size: int) -> np.ndarray:
    """On-disk value v -> train id v-1, so 0 (unlabeled) -> -1 = IGNORE_INDEX (ADE20k, COCO)."""
    return np.arange(-1, size - 1, dtype=np.int64)


class PairDataset(torch.utils.data.Dataset):
    """(image uint8 [3,H,W], mask int64 [H,W]) from lists of files; `lut[v]` maps the stored value v
    to a train id or IGNORE_INDEX (one vectorised lookup, never a chain of in-place remaps)."""

    def __init__(self, images: Sequence[Path], masks: Sequence[Path], lut: np.ndarray,
                 class_names: Sequence[str], read_labels: Callable[[Path], np.ndarray] = read_mask):
        assert len(images) == len(masks)
        # str, not Path: a dataset of 100k Paths costs more to pickle into DataLoader workers.
        self.images, self.masks = [str(p) for p in images], [str(p) for p in masks]
        self.lut, self.class_names, self.read_labels = lut, list(class_names), read_labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_image(self.images[index])
        raw = self.read_labels(self.masks[index])
        if raw.shape != tuple(image.shape[1:]):
            raise DataError(f"mask {self.masks[index]} is {'x'.join(map(str, raw.shape))} but image "
                            f"{self.images[index]} is {image.shape[1]}x{image.shape[2]}")
        if raw.size and (raw.min() < 0 or raw.max() >= len(self.lut)):
            value = int(raw.min() if raw.min() < 0 else raw.max())
            raise DataError(f"mask {self.masks[index]} holds value {value}, outside the dataset's "
                            f"stored range 0..{len(self.lut) - 1}")
        labels = self.lut[raw]
        if labels.size and labels.max() >= len(self.class_names):  # a stored value no class of this dataset has
            value = int(raw[labels >= len(self.class_names)][0])
            raise DataError(f"mask {self.masks[index]} holds value {value}, which is no class of this dataset's "
                            f"{len(self.class_names)} (not its official label format): fix or drop that mask")
        return image, torch.from_numpy(labels)
