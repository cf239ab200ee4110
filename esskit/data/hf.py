"""Hugging Face `datasets` (optional extra `esskit[hf]`): a `save_to_disk` folder, parquet files, an
imagefolder (metadata.jsonl with file_name + mask_file_name), or a hub name where the hub is
reachable. The image and mask columns, the class names and the mask encoding come from the recipe."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from esskit.data import IGNORE_INDEX
from esskit.data.images import labels_from_pil, rgb_from_pil
from esskit.errors import DataError

LAYOUT = ("data.root = a save_to_disk folder, a .parquet file or folder of parquet files, an "
          "imagefolder (metadata.jsonl: file_name, mask_file_name) or a hub name 'owner/name'; "
          "'{split}' in data.root is replaced by the split; columns data.image_column, data.mask_column")
SOURCE = "https://huggingface.co/datasets?task_categories=task_categories:image-segmentation"


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("data.name = 'hf' needs the optional package `datasets`: "
                        "pip install 'esskit[hf]'") from None
    return datasets


def open_split(cfg, split: str):
    """The `datasets.Dataset` for `split` of data.root (see LAYOUT for what data.root may be)."""
    datasets = _import_datasets()
    if not cfg.root:
        raise DataError(f"hf: data.root is not set; expected {LAYOUT}")
    source = cfg.root.replace("{split}", split)
    path = Path(source).expanduser()
    looks_local = source.startswith(("/", ".", "~")) or path.suffix == ".parquet"
    if looks_local and not path.exists():
        raise DataError(f"hf: {path} not found; expected {LAYOUT}")
    # One split's file or folder named without '{split}' would serve train and val alike
    one_split = (f"hf: {path} holds a single split, so data.train_split and data.val_split would read the same "
                 f"rows; put '{{split}}' in data.root (one file or folder per split) or save a DatasetDict")
    per_split = "{split}" in cfg.root
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                return _pick_split(data, split, path)
            if not per_split:
                raise DataError(one_split)
            return data
        if path.is_file():  # one parquet file is the split itself
            if not per_split:
                raise DataError(one_split)
            return datasets.load_dataset("parquet", data_files={split: str(path)}, split=split)
        if path.is_dir():  # parquet shards or an imagefolder: splits from file or folder names
            data = datasets.load_dataset(str(path))
            if per_split:  # the folder is this split, whatever `datasets` names it ("train" without split words)
                if len(data) != 1:
                    raise DataError(f"hf: {path} holds the splits {', '.join(data)}; with '{{split}}' in data.root "
                                    f"each folder must hold one split")
                return next(iter(data.values()))
            return _pick_split(data, split, path)
        return datasets.load_dataset(source, cfg.hf_config or None, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, hub/connection errors...
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"hf: cannot load {source!r} split {split!r}: {type(e).__name__}: {message}") from None


def _pick_split(data, split: str, where: Path):
    """`split` of a DatasetDict; "val" and "validation" stand for each other (folders named val/ load as
    "validation")."""
    for name in (split, {"val": "validation", "validation": "val"}.get(split)):
        if name in data:
            return data[name]
    raise DataError(f"hf: split {split!r} not in {where} (splits: {', '.join(data)}); set data.train_split / "
                    f"data.val_split")


def class_names(cfg) -> list[str]:
    if cfg.class_names_file:
        path = Path(cfg.class_names_file).expanduser()
        if not path.is_file():
            raise DataError(f"hf: data.class_names_file {path} not found (one class name per line)")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = list(cfg.class_names) or [f"class_{c}" for c in range(cfg.num_classes)]
    if len(names) != cfg.num_classes:
        raise DataError(f"hf: {len(names)} class names but data.num_classes = {cfg.num_classes}")
    return names


def _image_array(value, where: str) -> np.ndarray:
    if isinstance(value, Image.Image):
        return rgb_from_pil(value)
    array = np.asarray(value)
    # `datasets` returns uint8 array columns (Array3D, nested lists) as Python lists, read as int64
    if array.dtype.kind in "iu" and array.size and 0 <= array.min() and array.max() <= 255:
        array = array.astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise DataError(f"{where}: image must be a PIL image or uint8 [H, W, 3], got {array.dtype} {array.shape}")
    return array


class HFSegmentation(torch.utils.data.Dataset):
    """(image uint8 [3,H,W], mask int64 [H,W]) rows of a `datasets.Dataset`; the stored value
    `mask_void_value` becomes IGNORE_INDEX and the others are shifted down by `mask_label_offset`."""

    def __init__(self, data, cfg, split: str):
        missing = [c for c in (cfg.image_column, cfg.mask_column) if c not in data.column_names]
        if missing:
            raise DataError(f"hf: {cfg.root} split {split!r} has no column {', '.join(map(repr, missing))} "
                            f"(columns: {', '.join(data.column_names)}); set data.image_column / "
                            f"data.mask_column")
        # Only the two columns are decoded per row, whatever else the dataset carries. Image columns
        # are opened here, as stored: `datasets` would turn photos upright by their EXIF tag and leave
        # the untagged masks as they are, out of line (the file loaders read both as stored too)
        datasets = _import_datasets()
        data = data.select_columns([cfg.image_column, cfg.mask_column])
        for column, feature in data.features.items():
            if isinstance(feature, datasets.Image):
                data = data.cast_column(column, datasets.Image(decode=False))
        self.data = data
        self.image_column, self.mask_column = cfg.image_column, cfg.mask_column
        self.void, self.offset = cfg.mask_void_value, cfg.mask_label_offset
        self.name, self.class_names = f"hf {cfg.root} [{split}]", class_names(cfg)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row, where = self.data[index], f"{self.name} row {index}"
        image = _image_array(_open_stored(row[self.image_column], where), where)
        mask = _open_stored(row[self.mask_column], where)
        raw = labels_from_pil(mask, where) if isinstance(mask, Image.Image) else _integer_mask(mask, where)
        if raw.shape != image.shape[:2]:
            raise DataError(f"{where}: mask is {'x'.join(map(str, raw.shape))} but image is "
                            f"{image.shape[0]}x{image.shape[1]}")
        labels = np.where(raw == self.void, IGNORE_INDEX, raw - self.offset)
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy(labels.astype(np.int64)))


def _open_stored(value, where: str):
    """An undecoded image cell ({"bytes", "path"}) as a PIL image, without EXIF transposition; other
    cells as they are."""
    if not (isinstance(value, dict) and ("bytes" in value or "path" in value)):
        return value
    try:
        image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        image.load()
    except (OSError, TypeError, ValueError) as e:
        raise DataError(f"{where}: cannot read the image ({e})") from None
    return image


def _integer_mask(mask, where: str) -> np.ndarray:
    """A mask column that is not an image: a 2-D integer array (nested lists)."""
    try:
        raw = np.asarray(mask, np.int64)
    except (ValueError, TypeError):  # file names, ragged lists
        raw = None
    if raw is None or raw.ndim != 2:
        raise DataError(f"{where}: the mask column holds {type(mask).__name__} "
                        f"{str(mask)[:40]!r}, not a mask image or a 2-D integer array; set data.mask_column")
    return raw


def load(cfg, split: str) -> HFSegmentation:
    return HFSegmentation(open_split(cfg, split), cfg, split)
