"""Pascal VOC 2012 segmentation, plus the SBD "aug" training split (10,582 images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from esskit.data import IGNORE_INDEX
from esskit.data.images import PairDataset, check_num_classes, read_list, read_mask, require, require_root
from esskit.errors import DataError

LAYOUT = ("JPEGImages/*.jpg, SegmentationClass/*.png (palette) and ImageSets/Segmentation/{train,val}.txt "
          "with data.root = VOCdevkit/VOC2012; split aug also needs SBD's "
          "benchmark_RELEASE/dataset/{cls/*.mat, train.txt, val.txt} at data.sbd_root "
          "(default <root>/../VOCaug/dataset)")
SOURCE = ("http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ (VOCtrainval_11-May-2012.tar); SBD: "
          "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz")
CLASS_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]
VOID = 255  # object boundaries and difficult regions in SegmentationClass
NUM_CLASSES = len(CLASS_NAMES)


def label_lut() -> np.ndarray:
    lut = np.arange(256, dtype=np.int64)  # palette index = class index
    lut[VOID] = IGNORE_INDEX
    return lut


def read_labels(path: str) -> np.ndarray:
    """Palette PNG (VOC) or SBD `.mat` (GTcls.Segmentation: 0 background, 1..20 classes, no void)."""
    if not path.endswith(".mat"):
        return read_mask(path)
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError  # empty or truncated file (a cut header: IndexError, TypeError)

    try:
        gt = loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"]
        return np.asarray(gt.Segmentation).astype(np.int64)
    except (OSError, ValueError, KeyError, AttributeError, MatReadError, IndexError, TypeError) as e:
        raise DataError(f"cannot read SBD mask {path} (expected struct GTcls with field Segmentation): "
                        f"{e}") from None


def sbd_root(cfg, root: Path) -> Path:
    # mmsegmentation's layout puts SBD's dataset/ folder at VOCdevkit/VOCaug/dataset.
    return Path(cfg.sbd_root).expanduser() if cfg.sbd_root else root.parent / "VOCaug" / "dataset"


def aug_names(cfg, root: Path) -> list[tuple[str, Path]]:
    """(name, mask) for the "aug" split: (SBD train + SBD val + VOC train) - VOC val, the standard
    10,582-image set. VOC's own PNG is preferred where it exists (it marks void boundaries)."""
    sets = root / "ImageSets" / "Segmentation"
    sbd = sbd_root(cfg, root)
    voc_train = read_list(sets / "train.txt", "voc", LAYOUT)
    voc_val = set(read_list(sets / "val.txt", "voc", LAYOUT))
    sbd_names = [n for split in ("train", "val") for n in read_list(sbd / f"{split}.txt", "voc", LAYOUT)]
    names = sorted((set(voc_train) | set(sbd_names)) - voc_val)
    pairs = []
    for name in names:
        png = root / "SegmentationClass" / f"{name}.png"
        pairs.append((name, png if png.is_file() else require(sbd / "cls" / f"{name}.mat", "voc", LAYOUT)))
    return pairs


def load(cfg, split: str) -> PairDataset:
    root = require_root(cfg, "voc", LAYOUT)
    check_num_classes(cfg, "voc", CLASS_NAMES)
    if split == "aug":
        pairs = aug_names(cfg, root)
    else:
        names = read_list(root / "ImageSets" / "Segmentation" / f"{split}.txt", "voc", LAYOUT)
        pairs = [(n, require(root / "SegmentationClass" / f"{n}.png", "voc", LAYOUT)) for n in names]
    images = [require(root / "JPEGImages" / f"{name}.jpg", "voc", LAYOUT) for name, _ in pairs]
    return PairDataset(images, [mask for _, mask in pairs], label_lut(), CLASS_NAMES, read_labels)
