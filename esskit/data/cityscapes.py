"""Cityscapes (fine annotations): labelIds PNGs mapped to the 19 evaluation classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from esskit.data import IGNORE_INDEX
from esskit.data.images import PairDataset, check_num_classes, require, require_root
from esskit.errors import DataError

LAYOUT = ("leftImg8bit/{split}/{city}/*_leftImg8bit.png and "
          "gtFine/{split}/{city}/*_gtFine_labelIds.png, or the *_gtFine_labelTrainIds.png that "
          "cityscapesscripts' createTrainIdLabelImgs writes (mmseg's) (split: train, val, test)")
SOURCE = "https://www.cityscapes-dataset.com/downloads/ (leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip)"

# cityscapesscripts/helpers/labels.py: labelId -> trainId for the 19 classes with ignoreInEval False.
# Every other labelId (unlabeled, ego vehicle, parking, rail track, guard rail, caravan, trailer, ...)
# is void, as in the benchmark.
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CLASS_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
               "motorcycle", "bicycle"]
NUM_CLASSES = len(CLASS_NAMES)


def label_lut() -> np.ndarray:
    # labelIds PNGs hold 0..33 (license plate's -1 is never drawn): anything else, e.g. the 255 of a
    # *_labelTrainIds.png renamed, is PairDataset's one-line error, not silently void
    lut = np.full(34, IGNORE_INDEX, dtype=np.int64)
    for label_id, train_id in LABEL_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


def train_id_lut() -> np.ndarray:
    """*_gtFine_labelTrainIds.png: the 19 train ids as stored, 255 void; any other value is refused."""
    lut = np.arange(256, dtype=np.int64)
    lut[255] = IGNORE_INDEX
    return lut


def load(cfg, split: str) -> PairDataset:
    root = require_root(cfg, "cityscapes", LAYOUT)
    image_dir = require(root / "leftImg8bit" / split, "cityscapes", LAYOUT)
    label_dir = require(root / "gtFine" / split, "cityscapes", LAYOUT)
    check_num_classes(cfg, "cityscapes", CLASS_NAMES)
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DataError(f"cityscapes: no {image_dir}/<city>/*_leftImg8bit.png found; expected {LAYOUT}")
    # labelIds (in the download) when the first image has them, else the train-id masks mmseg reads
    stems = [label_dir / image.parent.name / image.name.replace("_leftImg8bit.png", "") for image in images]
    suffix, lut = "_gtFine_labelIds.png", label_lut()
    if not Path(f"{stems[0]}{suffix}").is_file() and Path(f"{stems[0]}_gtFine_labelTrainIds.png").is_file():
        suffix, lut = "_gtFine_labelTrainIds.png", train_id_lut()
    masks = [Path(f"{stem}{suffix}") for stem in stems]
    for mask in masks:
        require(mask, "cityscapes", LAYOUT)
    return PairDataset(images, masks, lut, CLASS_NAMES)
