"""COCO+LVIS (1284 classes): LVIS v1 instance masks painted over COCO-Stuff 2017 stuff masks.

`build_masks` (the `esskit build-dataset coco-lvis` command) writes one 16-bit PNG per LVIS image,
value 0 = unlabeled and value v = class v-1, plus classes.json (value -> name); `load` reads them
with the COCO 2017 images. Value rules (DESIGN.md "Datasets"): LVIS category k -> k; the 10 stuff
classes LVIS already has take the LVIS id; the other 81 stuff classes take 1204..1284 in ascending
COCO-Stuff id; "other" (183) is unlabeled; stuff is painted first, LVIS on top, and among LVIS
instances the first annotation in file order wins (the official behaviour).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from esskit.data.images import PairDataset, check_num_classes, require_root, shift_lut, write_mask
from esskit.errors import DataError
from esskit.files import write_atomic

LAYOUT = ("train2017/*.jpg and val2017/*.jpg (COCO 2017 images) and masks/{split}/*.png + "
          "masks/{split}/classes.json (written by `esskit build-dataset coco-lvis`)")
SOURCE = ("COCO 2017 images: https://cocodataset.org/#download; LVIS v1 annotations: "
          "https://www.lvisdataset.org/dataset; COCO-Stuff 2017 JSON: "
          "https://github.com/nightrome/cocostuff (stuff_trainval2017.zip)")
NUM_LVIS = 1203  # LVIS v1 category ids 1..1203 keep their id as mask value
STUFF_IDS = range(92, 183)  # COCO-Stuff stuff classes; 183 "other" is the things' region
OTHER = 183
# Stuff classes that LVIS already has: they take the LVIS id (DESIGN.md); both files' names are checked
# at build time (LVIS v1's, as in its lvis_v1_*.json: banner 50, ..., towel 1108).
SHARED_STUFF = {92: (50, "banner"), 93: (110, "blanket"), 98: (181, "cabinet"), 108: (346, "cupboard"),
                109: (350, "curtain"), 137: (713, "napkin"), 141: (804, "pillow"), 153: (904, "salad"),
                165: (1050, "table"), 168: (1108, "towel")}
NUM_VALUES = NUM_LVIS + len(STUFF_IDS) - len(SHARED_STUFF) + 1  # 0..1284
NUM_CLASSES = NUM_VALUES - 1  # value 0 is unlabeled


def stuff_lut() -> np.ndarray:
    """COCO-Stuff id -> mask value as one uint16 table, applied once per image. The official script
    remapped in place id after id, so cabinet (98 -> 181) was remapped again as window-other
    (181 -> 1283); a table lookup cannot chain, and uint16 holds every value without overflow."""
    lut = np.zeros(OTHER + 1, dtype=np.uint16)  # 0 unlabeled and 183 "other" stay 0
    others = [i for i in STUFF_IDS if i not in SHARED_STUFF]
    lut[others] = np.arange(NUM_LVIS + 1, NUM_LVIS + 1 + len(others), dtype=np.uint16)
    for stuff_id, (lvis_id, _) in SHARED_STUFF.items():
        lut[stuff_id] = lvis_id
    return lut


STUFF_LUT = stuff_lut()


# ---------------------------------------------------------------------------------------------- load


def _class_names(classes_file: Path) -> list[str]:
    """Names in train-id order from `build-dataset`'s classes.json ({"0": "unlabeled", "1": ...}:
    mask value v is class v-1)."""
    try:
        classes = json.loads(classes_file.read_text())
        if not isinstance(classes, dict):
            raise ValueError(f"a {type(classes).__name__}, not a mask value -> name map")
        return [str(classes[str(v)]) for v in range(1, len(classes))]
    except (ValueError, KeyError) as e:
        raise DataError(f"coco_lvis: {classes_file} is not the classes.json `esskit build-dataset coco-lvis` "
                        f"writes ({'no value ' + str(e) if isinstance(e, KeyError) else e}); rebuild it") from None


def load(cfg, split: str) -> PairDataset:
    root = require_root(cfg, "coco_lvis", LAYOUT)
    mask_dir = root / "masks" / split
    classes_file = mask_dir / "classes.json"
    if not classes_file.is_file():
        raise DataError(f"coco_lvis: {classes_file} not found (written last, so the masks were never built "
                        f"or their build did not finish); (re)run `esskit build-dataset coco-lvis --lvis-json "
                        f"lvis_v1_{split}.json --stuff-json stuff_train2017.json --stuff-json "
                        f"stuff_val2017.json --out {mask_dir}`, which keeps finished masks; expected {LAYOUT}")
    names = _class_names(classes_file)
    check_num_classes(cfg, "coco_lvis", names)
    masks = sorted(mask_dir.glob("*.png"))
    if not masks:
        raise DataError(f"coco_lvis: no masks in {mask_dir}; run `esskit build-dataset coco-lvis`")
    # LVIS v1 draws its images from both COCO 2017 splits; list each folder once, not one stat per mask.
    found = {}
    for folder in ("val2017", "train2017"):
        if (root / folder).is_dir():
            found.update({Path(f).stem: root / folder / f for f in os.listdir(root / folder)})
    images = []
    for mask in masks:
        if mask.stem not in found:
            raise DataError(f"coco_lvis: image {mask.stem}.jpg for mask {mask} is in neither "
                            f"{root / 'train2017'} nor {root / 'val2017'}; expected {LAYOUT}")
        images.append(found[mask.stem])
    return PairDataset(images, masks, shift_lut(2**16), names)


# --------------------------------------------------------------------------------------------- build


class CorruptAnnotation(ValueError):
    pass


@dataclass
class BuildReport:
    written: int = 0
    skipped: int = 0  # masks already present (resumed run)
    failed: int = 0  # images not written because one of their annotations is corrupt
    errors: list[str] = field(default_factory=list)  # one line per corrupt annotation
    without_stuff: int = 0  # images absent from every --stuff-json (their stuff stays unlabeled)


def decode(ann: dict, height: int, width: int) -> np.ndarray:
    """Boolean [H, W] mask of a COCO-style polygon or RLE segmentation, validated before pycocotools
    sees it (it would read a 4-number polygon as a box and crash on an odd-length one)."""
    seg = ann.get("segmentation")
    try:
        return _decode(seg, height, width)
    except CorruptAnnotation:
        raise
    except (ValueError, TypeError, IndexError) as e:  # e.g. pycocotools: counts overrun the image
        raise CorruptAnnotation(f"cannot decode: {e}") from None


def _decode(seg, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        if not all(isinstance(p, list) and len(p) % 2 == 0 for p in seg):
            raise CorruptAnnotation("polygons must be lists of (x, y) pairs")
        if not all(isinstance(c, (int, float)) and math.isfinite(c) for p in seg for c in p):
            raise CorruptAnnotation("polygon coordinates must be finite numbers")
        # Parts with < 3 points have no area (COCO and LVIS hold a few); detectron2 drops them too.
        seg = [p for p in seg if len(p) >= 6]
        if not seg:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg, dict) and "counts" in seg:
        if list(seg.get("size", [])) != [height, width]:
            raise CorruptAnnotation(f"RLE size {seg.get('size')} != image size [{height}, {width}]")
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
                raise CorruptAnnotation(f"uncompressed RLE counts must be >= 0 and sum to {height * width}")
            rle = mask_utils.frPyObjects(seg, height, width)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        else:
            raise CorruptAnnotation(f"RLE counts of type {type(counts).__name__}")
    else:
        raise CorruptAnnotation("missing or unknown segmentation")
    return mask_utils.decode(rle).astype(bool)


def paint(image: dict, stuff_anns: list[dict], lvis_anns: list[dict]) -> tuple[np.ndarray, list[str]]:
    """uint16 [H, W] mask of one image and the corrupt annotations found (mask invalid if any)."""
    height, width = image["height"], image["width"]
    errors = []

    def masks_of(anns, valid_ids, what):
        for ann in anns:
            try:
                if ann.get("category_id") not in valid_ids:
                    raise CorruptAnnotation(f"category_id {ann.get('category_id')!r} is not a {what} id")
                yield ann["category_id"], decode(ann, height, width)
            except CorruptAnnotation as e:
                errors.append(f"annotation {ann.get('id')!r} (image {image['id']}): {e}")

    # Stuff regions do not overlap; collect ids first so STUFF_LUT is applied exactly once.
    stuff = np.zeros((height, width), dtype=np.uint8)
    for category, region in masks_of(stuff_anns, range(92, OTHER + 1), "COCO-Stuff stuff"):
        stuff[region] = category
    values = STUFF_LUT[stuff]
    # Among overlapping LVIS instances the first in file order keeps the pixel (official behaviour).
    taken = np.zeros((height, width), dtype=bool)
    for category, region in masks_of(lvis_anns, range(1, NUM_LVIS + 1), "LVIS v1 category"):
        region &= ~taken
        values[region] = category
        taken |= region
    return values, errors


def _build_one(task: tuple) -> tuple[bool, list[str]]:
    image, stuff_anns, lvis_anns, out = task
    try:
        if not isinstance(image.get("id"), int):
            raise CorruptAnnotation("id must be an integer")
        if not all(isinstance(image.get(k), int) and image[k] > 0 for k in ("height", "width")):
            raise CorruptAnnotation("height and width must be positive integers")
        values, errors = paint(image, stuff_anns, lvis_anns)
    except CorruptAnnotation as e:
        return False, [f"image {str(image.get('id', image))[:80]}: {e}"]
    if errors:  # leave no mask, so that a rerun after fixing the file builds this image
        return False, errors
    write_mask(out / f"{image['id']:012d}.png", values, bits=16)
    return True, []


def _read_json(path: Path, what: str) -> dict:
    if not Path(path).is_file():
        raise DataError(f"{what} file {path} not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{what} file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise DataError(f"{what} file {path} lacks the COCO-format lists images/annotations/categories")
    for key, id_key in (("images", "id"), ("annotations", "image_id"), ("categories", "id")):
        for i, entry in enumerate(data[key]):  # ids key dicts below: a list id would be a TypeError there
            if not isinstance(entry, dict) or not isinstance(entry.get(id_key), Hashable):
                raise DataError(f"{what} file {path}: {key}[{i}] is not a COCO-format entry with a scalar "
                                f"{id_key!r} ({str(entry)[:60]})")
    return data


def class_names(lvis: dict, stuff_files: list[dict], lvis_path: Path, stuff_paths: list[Path]) -> dict:
    """value -> name, after checking that the files are LVIS v1 and COCO-Stuff 2017."""
    lvis_names = {c.get("id"): c.get("name") for c in lvis["categories"]}
    if sorted(lvis_names) != list(range(1, NUM_LVIS + 1)):
        raise DataError(f"{lvis_path}: categories are not LVIS v1 ids 1..{NUM_LVIS}")
    for lvis_id, name in SHARED_STUFF.values():  # where the stuff classes merge: LVIS v1's names
        if lvis_names[lvis_id] != name:
            raise DataError(f"{lvis_path}: category {lvis_id} is {lvis_names[lvis_id]!r}, LVIS v1 has {name!r}")
    names = {0: "unlabeled", **lvis_names}
    for stuff, path in zip(stuff_files, stuff_paths):
        stuff_names = {c.get("id"): c.get("name") for c in stuff["categories"]}
        if not set(STUFF_IDS) <= set(stuff_names):
            raise DataError(f"{path}: categories lack COCO-Stuff stuff ids 92..182; is it stuff_*2017.json?")
        for stuff_id, (_, name) in SHARED_STUFF.items():
            if stuff_names[stuff_id] != name:
                raise DataError(f"{path}: category {stuff_id} is {stuff_names[stuff_id]!r}, COCO-Stuff "
                                f"2017 has {name!r}")
        names.update({int(STUFF_LUT[i]): stuff_names[i] for i in STUFF_IDS if i not in SHARED_STUFF})
    assert len(names) == NUM_VALUES
    return {str(v): names[v] for v in sorted(names)}


def _claim_out_dir(out: Path, inputs: dict) -> None:
    """Create `out` and record the input files there (inputs.json): a resumed build keeps the masks
    already written, so it must read the same files (fixed in place is fine: only failed images are
    built again), not another set, e.g. a --stuff-json added after the warning about images in none."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out} cannot be created: {e.strerror}") from None
    record = out / "inputs.json"
    built = record.is_file() and any(out.glob("*.png"))
    try:
        recorded = json.loads(record.read_text()) if built else inputs
    except ValueError as e:
        raise DataError(f"--out {out}: {record} is damaged ({e}); delete it if the masks there were built from "
                        f"these files, or build into a new --out") from None
    if recorded != inputs:
        raise DataError(f"--out {out} holds masks built from other input files ({record}); build into a new "
                        f"--out, or delete it to rebuild")
    write_atomic(record, json.dumps(inputs, indent=1))


def build_masks(lvis_json: Path, stuff_jsons: list[Path], out: Path, workers: int = 0,
                progress=None) -> BuildReport:
    """Write out/<image id:012d>.png for every image of `lvis_json`, then out/classes.json once every
    mask is there: its presence marks a complete build, which the loader requires. Skips masks already
    written. `progress(done, total, errors)` is called after each image."""
    if not stuff_jsons:
        raise DataError("coco-lvis needs at least one --stuff-json (stuff_train2017.json)")
    workers = workers or os.cpu_count() or 1
    # Fork the workers before the multi-GB LVIS JSON is parsed, so they do not inherit it.
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        lvis = _read_json(lvis_json, "LVIS")
        stuff_files = [_read_json(p, "COCO-Stuff") for p in stuff_jsons]
        names = class_names(lvis, stuff_files, lvis_json, list(stuff_jsons))
        _claim_out_dir(out, {"lvis_json": str(Path(lvis_json).resolve()),
                             "stuff_json": sorted(str(Path(p).resolve()) for p in stuff_jsons)})
        (out / "classes.json").unlink(missing_ok=True)  # an earlier build's: this one is not complete yet

        stuff_by_image, lvis_by_image = defaultdict(list), defaultdict(list)
        for stuff in stuff_files:
            for ann in stuff["annotations"]:
                stuff_by_image[ann.get("image_id")].append(ann)
        for ann in lvis["annotations"]:  # keeps file order within each image
            lvis_by_image[ann.get("image_id")].append(ann)
        done = set(os.listdir(out))
        report = BuildReport()
        tasks = []
        for image in lvis["images"]:
            image_id = image.get("id")
            report.without_stuff += image_id not in stuff_by_image
            if isinstance(image_id, int) and f"{image_id:012d}.png" in done:
                report.skipped += 1
            else:
                tasks.append((image, stuff_by_image.get(image_id, []), lvis_by_image.get(image_id, []), out))
        del lvis, stuff_files, stuff_by_image, lvis_by_image  # tasks hold what is still needed
        results = pool.imap_unordered(_build_one, tasks, chunksize=8) if pool else map(_build_one, tasks)
        for count, (ok, errors) in enumerate(results, 1):
            report.written += ok
            report.failed += not ok
            report.errors += errors
            if progress:
                progress(count, len(tasks), errors)
        if pool:
            pool.close()
            pool.join()
        if not report.failed:
            write_atomic(out / "classes.json", json.dumps(names, indent=0))
        return report
    finally:
        if pool:
            pool.terminate()
