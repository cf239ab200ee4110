"""Datasets. Each returns (image uint8 [3, H, W], mask int64 [H, W]) with train ids 0..C-1 and
IGNORE_INDEX for void pixels; transforms and label checks are applied by `SegmentationSet`."""

from __future__ import annotations

IGNORE_INDEX = -1  # the one in-memory ignore label (255 is a valid class id when C > 255)


def _synthetic(cfg, split: str):
    from esskit.data.synthetic import SyntheticSegmentation

    length = cfg.synthetic_train_size if split == "train" else cfg.synthetic_val_size
    return SyntheticSegmentation(cfg.num_classes, length, cfg.synthetic_image_size, split=split)


def _lazy(module: str):
    """`esskit.data.<module>.load`, imported on first use so that `import esskit.data` (and the CLI)
    stays light; `.module` lets `esskit datasets` find the module's LAYOUT and SOURCE."""

    def load(cfg, split: str):
        from importlib import import_module

        return import_module(f"esskit.data.{module}").load(cfg, split)

    load.module = f"esskit.data.{module}"
    return load


# data.name -> function(DataConfig, split) building the raw dataset
DATASETS = {
    "synthetic": _synthetic,
    "cityscapes": _lazy("cityscapes"),
    "voc": _lazy("voc"),
    "ade20k": _lazy("ade20k"),
    "cocostuff10k": _lazy("cocostuff"),
    "coco_lvis": _lazy("coco_lvis"),
    "hf": _lazy("hf"),
}


def build_dataset(cfg, split: str, train: bool, seed: int = 0):
    """The dataset `cfg.name` for `split`, with training or evaluation transforms."""
    from esskit.data.transforms import SegmentationSet, eval_transforms, train_transforms
    from esskit.errors import DataError

    if cfg.name not in DATASETS:
        raise DataError(f"data.name = {cfg.name!r} is not one of {', '.join(map(repr, DATASETS))}")
    raw = DATASETS[cfg.name](cfg, split)
    transform = train_transforms(cfg) if train else eval_transforms(cfg)
    return SegmentationSet(raw, transform, cfg.num_classes, seed, name=f"{cfg.name}/{split}")
