"""COCO-Stuff10k (v1.1): 182 classes (COCO's 91 thing ids incl. the 11 unused ones, 91 stuff),
labels in `.mat` files with 0 = unlabeled -> ignore, v -> v-1 (Table 1: C = 182)."""

from __future__ import annotations

import numpy as np

from esskit.data.images import PairDataset, check_num_classes, read_list, require, require_root, shift_lut
from esskit.errors import DataError

LAYOUT = ("images/COCO_train2014_*.jpg, annotations/COCO_train2014_*.mat (field S, 0 = unlabeled), "
          "imageLists/{train,test}.txt (split: train, test or val = test)")
SOURCE = "https://github.com/nightrome/cocostuff10k (cocostuff-10k-v1.1.zip)"
SPLITS = {"train": "train", "test": "test", "val": "test"}  # 10k has no val list; test is the 1k eval set

# COCO-Stuff label ids 1..182 (labels.txt of the COCO-Stuff repo); index i is label i+1.
THING_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella",
    "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet", "door", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "blender", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
    "hair brush",
]
STUFF_NAMES = [  # ids 92..182; "other" (183) exists only in the 2017 JSON and is unlabeled
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
    "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard",
    "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other",
    "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat",
    "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow",
    "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock",
    "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other",
    "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
]
CLASS_NAMES = THING_NAMES + STUFF_NAMES
FIRST_STUFF_ID = len(THING_NAMES) + 1  # 92
NUM_CLASSES = len(CLASS_NAMES)


def read_labels(path: str) -> np.ndarray:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError  # empty or truncated file (a cut header: IndexError, TypeError)

    try:
        return np.asarray(loadmat(path)["S"]).astype(np.int64)
    except (OSError, ValueError, KeyError, NotImplementedError, MatReadError, IndexError, TypeError) as e:
        raise DataError(f"cannot read COCO-Stuff10k mask {path} (expected a .mat with label array S): "
                        f"{e}") from None


def load(cfg, split: str) -> PairDataset:
    root = require_root(cfg, "cocostuff10k", LAYOUT)
    if split not in SPLITS:
        raise DataError(f"cocostuff10k: split {split!r} is not one of {', '.join(SPLITS)}")
    check_num_classes(cfg, "cocostuff10k", CLASS_NAMES)
    names = read_list(root / "imageLists" / f"{SPLITS[split]}.txt", "cocostuff10k", LAYOUT)
    images = [require(root / "images" / f"{name}.jpg", "cocostuff10k", LAYOUT) for name in names]
    masks = [require(root / "annotations" / f"{name}.mat", "cocostuff10k", LAYOUT) for name in names]
    return PairDataset(images, masks, shift_lut(256), CLASS_NAMES, read_labels)
