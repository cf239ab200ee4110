"""ADE20k SceneParsing (ADEChallengeData2016): 150 classes, 0 = "other" is ignored, k -> k-1."""

from __future__ import annotations

from esskit.data.images import PairDataset, check_num_classes, require, require_root, shift_lut
from esskit.errors import DataError

LAYOUT = ("images/{training,validation}/ADE_*.jpg and annotations/{training,validation}/ADE_*.png "
          "with data.root = ADEChallengeData2016 (split: train or training, val or validation)")
SOURCE = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}

# mmsegmentation's ADE20KDataset order (reduce_zero_label), the benchmark's objectInfo150 order.
CLASS_NAMES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
    "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet",
    "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle",
    "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
]
NUM_CLASSES = len(CLASS_NAMES)


def load(cfg, split: str) -> PairDataset:
    root = require_root(cfg, "ade20k", LAYOUT)
    if split not in SPLITS:
        raise DataError(f"ade20k: split {split!r} is not one of {', '.join(SPLITS)}")
    check_num_classes(cfg, "ade20k", CLASS_NAMES)
    image_dir = require(root / "images" / SPLITS[split], "ade20k", LAYOUT)
    mask_dir = require(root / "annotations" / SPLITS[split], "ade20k", LAYOUT)
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise DataError(f"ade20k: no *.jpg in {image_dir}; expected {LAYOUT}")
    masks = [require(mask_dir / f"{image.stem}.png", "ade20k", LAYOUT) for image in images]
    return PairDataset(images, masks, shift_lut(256), CLASS_NAMES)
