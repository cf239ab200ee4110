"""`esskit build-dataset coco-lvis` and the coco_lvis loader on tiny LVIS / COCO-Stuff JSON files
(polygons and RLE made with pycocotools), checked against the id rules of DESIGN.md written out by
hand."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from esskit.cli import app
from esskit.config import DataConfig
from esskit.data import DATASETS, IGNORE_INDEX
from esskit.data.coco_lvis import STUFF_LUT, build_masks
from esskit.data.cocostuff import STUFF_NAMES
from esskit.data.images import read_mask
from esskit.errors import DataError

LVIS_NAMES = {50: "banner", 110: "blanket", 181: "cabinet", 346: "cupboard", 350: "curtain", 713: "napkin",
              804: "pillow", 904: "salad", 1050: "table", 1108: "towel", 500: "lvis 500", 7: "lvis 7"}


def rle(region: np.ndarray, compressed: bool = True) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
    if compressed:  # as in stuff_train2017.json: counts as a str
        return {"size": encoded["size"], "counts": encoded["counts"].decode()}
    flat = region.astype(np.uint8).flatten(order="F")  # uncompressed COCO RLE: run lengths from 0
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"size": list(region.shape), "counts": ([0] if flat[0] else []) + runs}


SIZES = {1: (40, 60), 2: (30, 50), 3: (40, 60), 4: (20, 20)}  # image id -> (height, width); 4 has no stuff
# COCO-Stuff id -> mask value, written out from DESIGN.md's rules for the ids the fixture uses.
STUFF_VALUE = {
    92: 50,  # banner: one of the 10 stuff classes LVIS has, takes the LVIS id
    93: 110,  # blanket -> LVIS 110, which is desk-stuff's COCO-Stuff id: not chained on to 1217
    94: 1204,  # branch: the first of the 81 stuff-only classes
    98: 181,  # cabinet -> LVIS 181, which is window-other's COCO-Stuff id: not chained on to 1283
    110: 1217,  # desk-stuff: the 14th stuff-only class
    165: 1050,  # table -> LVIS 1050
    181: 1283,  # window-other
    182: 1284,  # wood: the last stuff id
    183: 0,  # "other" (the things' region of COCO-Stuff 2017) is unlabeled
}


def box(h, w, rows, cols) -> np.ndarray:
    region = np.zeros((h, w), bool)
    region[rows, cols] = True
    return region


def rows_of(image_id: int, rows: slice, cols: slice = slice(None)) -> np.ndarray:
    return box(*SIZES[image_id], rows, cols)


def polygon_region(polygon: list, image_id: int) -> np.ndarray:
    """What the COCO API rasterises a polygon to; parts with < 3 points have no area (DESIGN.md)."""
    if len(polygon) < 6:
        return np.zeros(SIZES[image_id], bool)
    return mask_utils.decode(mask_utils.frPyObjects([polygon], *SIZES[image_id]))[..., 0].astype(bool)


STUFF = [  # (image, COCO-Stuff category, region, RLE compressed); regions of an image do not overlap
    (1, 165, rows_of(1, slice(0, 20)), True),  # table (shared with LVIS 1050)
    (1, 182, rows_of(1, slice(20, 40), slice(0, 30)), True),  # wood: last stuff id -> 1284
    (1, 183, rows_of(1, slice(20, 40), slice(30, 60)), True),  # "other" -> unlabeled
    (2, 98, rows_of(2, slice(0, 10)), True),  # cabinet -> LVIS 181, not 1283
    (2, 181, rows_of(2, slice(10, 20)), False),  # window-other -> 1283
    (2, 94, rows_of(2, slice(20, 30)), True),  # branch: first non-shared -> 1204
    (3, 92, rows_of(3, slice(0, 14)), True),  # banner -> LVIS 50
    (3, 93, rows_of(3, slice(14, 27)), True),  # blanket -> LVIS 110, not 1217
    (3, 110, rows_of(3, slice(27, 40)), False),  # desk-stuff -> 1217
]
TRIANGLE, BOX = [1, 1, 10, 1, 10, 10], [1, 1, 5, 1, 5, 5, 1, 5]
LVIS = [  # (annotation id, image, LVIS category, region or polygon); the first in file order wins overlaps
    (10, 1, 500, rows_of(1, slice(5, 25), slice(10, 30))),
    (11, 1, 7, [20, 15, 40, 15, 40, 35, 20, 35]),
    (12, 2, 1203, rows_of(2, slice(2, 6), slice(2, 6))),
    (13, 3, 1, TRIANGLE),
    (99, 3, 2, BOX),  # written with an odd number of coordinates by write_fixture(corrupt=True)
    (16, 3, 110, rows_of(3, slice(30, 36), slice(40, 55))),  # LVIS 110 = a stuff id: stays 110, not 1217
    (15, 1, 9, [0, 0, 59, 39]),  # 2 points: no area
    (14, 4, 5, rows_of(4, slice(0, 5), slice(0, 5))),
]


def expected_mask(image_id: int) -> np.ndarray:
    """The mask DESIGN.md's rules make of a fixture image: stuff values from STUFF_VALUE, then the LVIS
    instances on top, painted last to first so that the first in file order wins."""
    mask = np.zeros(SIZES[image_id], np.int64)
    for image, category, region, _ in STUFF:
        if image == image_id:
            mask[region] = STUFF_VALUE[category]
    for _, image, category, region in reversed(LVIS):
        if image == image_id:
            mask[region if isinstance(region, np.ndarray) else polygon_region(region, image)] = category
    return mask


def expected_labels(image_id: int) -> torch.Tensor:
    """What the coco_lvis loader returns for a fixture image: value v -> class v - 1, 0 -> ignore."""
    values = expected_mask(image_id)
    return torch.from_numpy(np.where(values == 0, IGNORE_INDEX, values - 1))


def write_fixture(tmp_path: Path, corrupt: bool = True) -> tuple[Path, Path]:
    images = [{"id": i, "height": h, "width": w} for i, (h, w) in SIZES.items()]
    images[0]["coco_url"] = "http://x/train2017/000000000001.jpg"
    stuff_json = {"images": [dict(im) for im in images[:3]],
                  "categories": [{"id": i, "name": n} for i, n in enumerate(STUFF_NAMES + ["other"], 92)],
                  "annotations": [{"id": 100 + n, "image_id": im, "category_id": c, "segmentation": rle(r, z)}
                                  for n, (im, c, r, z) in enumerate(STUFF)]}
    lvis = []
    for ann_id, image, category, region in LVIS:
        if isinstance(region, np.ndarray):
            segmentation = rle(region)
        else:  # corrupt: annotation 99 with an odd number of coordinates, not (x, y) pairs
            segmentation = [region[:-3] if corrupt and ann_id == 99 else region]
        lvis.append({"id": ann_id, "image_id": image, "category_id": category, "segmentation": segmentation})
    lvis_json = {"images": images, "annotations": lvis,
                 "categories": [{"id": k, "name": LVIS_NAMES.get(k, f"lvis_{k}")} for k in range(1, 1204)]}
    (tmp_path / "lvis.json").write_text(json.dumps(lvis_json))
    (tmp_path / "stuff.json").write_text(json.dumps(stuff_json))
    return tmp_path / "lvis.json", tmp_path / "stuff.json"


def write_images(root: Path, image_ids) -> None:
    """COCO 2017 JPEGs for the fixture images, odd ids in train2017/ and even ones in val2017/."""
    for image_id in image_ids:
        folder = root / ("train2017" if image_id % 2 else "val2017")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((*SIZES[image_id], 3), image_id, np.uint8)).save(folder / f"{image_id:012d}.jpg")


def build(tmp_path, out, workers=1):
    args = ["build-dataset", "coco-lvis", "--lvis-json", str(tmp_path / "lvis.json"),
            "--stuff-json", str(tmp_path / "stuff.json"), "--out", str(out), "--workers", str(workers)]
    return CliRunner().invoke(app, args)


def test_stuff_lut_follows_design_ids():
    shared = {"banner": 50, "blanket": 110, "cabinet": 181, "cupboard": 346, "curtain": 350,
              "napkin": 713, "pillow": 804, "salad": 904, "table": 1050, "towel": 1108}
    by_name = {name: int(STUFF_LUT[i]) for i, name in enumerate(STUFF_NAMES, 92)}
    assert {n: by_name[n] for n in shared} == shared
    others = [by_name[n] for n in STUFF_NAMES if n not in shared]
    assert others == list(range(1204, 1285))  # 81 classes, ascending COCO-Stuff id
    assert by_name["branch"] == 1204 and by_name["window-other"] == 1283 and by_name["wood"] == 1284
    assert STUFF_LUT[183] == 0 and STUFF_LUT.dtype == np.uint16


def test_build_rules_resume_and_corrupt_annotation(tmp_path):
    write_fixture(tmp_path)
    out = tmp_path / "coco" / "masks" / "train"
    result = build(tmp_path, out, workers=2)
    assert result.exit_code == 1, result.output
    assert "annotation 99 (image 3): polygons must be lists of (x, y) pairs" in result.output and "1 images not written" in result.output
    assert "1 images are in no --stuff-json file" in result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["000000000001.png", "000000000002.png", "000000000004.png"]

    for image_id in (1, 2, 4):
        with Image.open(out / f"{image_id:012d}.png") as image:
            assert image.mode == "I;16"  # 16-bit even where every value is < 256 (image 4)
        assert np.array_equal(read_mask(out / f"{image_id:012d}.png"), expected_mask(image_id)), image_id
    one = read_mask(out / "000000000001.png")
    assert one[0, 0] == 1050 and one[30, 5] == 1284 and one[30, 50] == 0  # table, wood, other
    assert one[20, 25] == 500  # inside both instances: the first annotation (10) wins
    assert one[30, 35] == 7 and one[10, 15] == 500  # each instance alone, painted over stuff
    assert not (one == 9).any()  # a 2-point polygon is empty, not a box (pycocotools would make one)
    two = read_mask(out / "000000000002.png")
    expected = np.zeros((30, 50), np.int64)
    expected[0:10], expected[10:20], expected[20:30] = 181, 1283, 1204  # cabinet not chained to 1283
    expected[2:6, 2:6] = 1203
    assert np.array_equal(two, expected)
    four = read_mask(out / "000000000004.png")
    assert four[0, 0] == 5 and four[10, 10] == 0
    assert not (out / "classes.json").exists()  # image 3 is missing: not a complete build

    Image.fromarray(np.zeros((40, 60), np.uint16)).save(out / "000000000001.png")  # mark as done
    again = build(tmp_path, out)
    assert again.exit_code == 1 and "3 already present" in again.output
    assert read_mask(out / "000000000001.png").max() == 0  # skipped, not rebuilt
    write_fixture(tmp_path, corrupt=False)
    (out / ".000000000003.png.partial").write_bytes(b"\x89PNG")  # left by an interrupted run: not done
    fixed = build(tmp_path, out)
    assert fixed.exit_code == 0, fixed.output
    assert "1 masks written, 3 already present" in fixed.output
    three = read_mask(out / "000000000003.png")
    assert np.array_equal(three, expected_mask(3))
    assert three[12, 30] == 50 and three[2, 6] == 1 and three[4, 2] == 2  # banner; triangle; box outside it
    assert three[20, 30] == 110 and three[38, 30] == 1217  # blanket -> 110, not chained on to desk-stuff's 1217
    assert three[33, 45] == 110  # LVIS 110 over desk-stuff: an LVIS value is never remapped as a stuff id
    # another set of inputs into the same --out would keep masks built without them: refused
    (tmp_path / "stuff_val.json").write_text((tmp_path / "stuff.json").read_text())
    other = CliRunner().invoke(app, ["build-dataset", "coco-lvis", "--lvis-json", str(tmp_path / "lvis.json"),
                                     "--stuff-json", str(tmp_path / "stuff.json"),
                                     "--stuff-json", str(tmp_path / "stuff_val.json"), "--out", str(out)])
    assert other.exit_code == 2 and "holds masks built from other input files" in other.output
    (tmp_path / "a_file").write_text("")
    blocked = build(tmp_path, tmp_path / "a_file")
    assert blocked.exit_code == 2 and "a_file cannot be created" in blocked.output
    assert not list(out.glob(".*partial"))
    classes = json.loads((out / "classes.json").read_text())
    assert len(classes) == 1285 and classes["0"] == "unlabeled" and classes["1050"] == "table"
    assert classes["1204"] == "branch" and classes["1284"] == "wood" and classes["7"] == "lvis 7"


def test_loader_reads_built_masks_and_reports_missing_parts(tmp_path):
    write_fixture(tmp_path, corrupt=False)
    root = tmp_path / "coco"
    cfg = DataConfig(name="coco_lvis", root=str(root), num_classes=1284)
    root.mkdir()
    with pytest.raises(DataError, match=r"masks/train/classes.json not found .*; \(re\)run `esskit "
                                        r"build-dataset coco-lvis"):
        DATASETS["coco_lvis"](cfg, "train")
    assert build(tmp_path, root / "masks" / "train").exit_code == 0
    write_images(root, [1, 2, 3])
    with pytest.raises(DataError, match=r"image 000000000004.jpg for mask .* is in neither"):
        DATASETS["coco_lvis"](cfg, "train")
    (root / "masks" / "train" / "000000000004.png").unlink()
    ds = DATASETS["coco_lvis"](cfg, "train")
    assert len(ds) == 3 and len(ds.class_names) == 1284
    assert ds.class_names[1049] == "table" and ds.class_names[1203] == "branch"
    image, mask = ds[0]
    assert image.shape == (3, 40, 60) and mask.dtype == torch.int64
    assert mask[0, 0] == 1049 and mask[30, 5] == 1283 and mask[30, 50] == IGNORE_INDEX  # v -> v-1, 0 -> ignore
    assert ds.images[1].endswith("val2017/000000000002.jpg")
    for index, image_id in enumerate((1, 2, 3)):
        assert torch.equal(ds[index][1], expected_labels(image_id)), image_id
    with pytest.raises(DataError, match="has 1284 classes but data.num_classes = 1283"):
        DATASETS["coco_lvis"](DataConfig(name="coco_lvis", root=str(root), num_classes=1283), "train")


def test_wrong_annotation_files_are_refused(tmp_path):
    lvis_json, stuff_json = write_fixture(tmp_path)
    stuff = json.loads(stuff_json.read_text())
    stuff["categories"][165 - 92]["name"] = "dining table"  # e.g. COCO instances instead of stuff
    stuff_json.write_text(json.dumps(stuff))
    result = build(tmp_path, tmp_path / "out")
    assert result.exit_code == 2 and "category 165 is 'dining table', COCO-Stuff 2017 has 'table'" in result.output
    lvis = json.loads(lvis_json.read_text())
    lvis["categories"][804 - 1]["name"] = "pin_(non_jewelry)"  # ids of another LVIS release
    lvis_json.write_text(json.dumps(lvis))
    result = build(tmp_path, tmp_path / "out")
    assert result.exit_code == 2 and "category 804 is 'pin_(non_jewelry)', LVIS v1 has 'pillow'" in result.output
    missing = CliRunner().invoke(app, ["build-dataset", "coco-lvis", "--lvis-json", str(tmp_path / "nope.json"),
                                       "--stuff-json", str(stuff_json), "--out", str(tmp_path / "out")])
    assert missing.exit_code == 2 and "nope.json not found" in missing.output


def test_interrupted_build_is_refused_until_rerun(tmp_path):
    """classes.json is written after the last mask: a half-built folder, or one whose rebuild was
    interrupted, is refused by the loader instead of training on the masks it happens to hold."""
    lvis_json, stuff_json = write_fixture(tmp_path, corrupt=False)
    root = tmp_path / "coco"
    out = root / "masks" / "train"
    write_images(root, [1, 2, 3, 4])
    cfg = DataConfig(name="coco_lvis", root=str(root), num_classes=1284)

    def interrupt(done, total, errors):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # stopped after its first mask
        build_masks(lvis_json, [stuff_json], out, workers=1, progress=interrupt)
    assert len(list(out.glob("*.png"))) == 1 and not (out / "classes.json").exists()
    with pytest.raises(DataError, match=r"classes.json not found .*build did not finish.*\(re\)run"):
        DATASETS["coco_lvis"](cfg, "train")
    assert build(tmp_path, out).exit_code == 0  # the rerun keeps that mask and completes the folder
    assert len(DATASETS["coco_lvis"](cfg, "train")) == 4
    (out / "000000000001.png").unlink()
    with pytest.raises(KeyboardInterrupt):  # a rebuild over a complete folder, interrupted
        build_masks(lvis_json, [stuff_json], out, workers=1, progress=interrupt)
    with pytest.raises(DataError, match="classes.json not found"):
        DATASETS["coco_lvis"](cfg, "train")


def test_classes_json_is_written_atomically(tmp_path, monkeypatch):
    import esskit.data.coco_lvis
    import esskit.files

    atomic = []
    monkeypatch.setattr(esskit.data.coco_lvis, "write_atomic",
                        lambda path, text: (atomic.append(path), esskit.files.write_atomic(path, text)))
    lvis_json, stuff_json = write_fixture(tmp_path, corrupt=False)
    build_masks(lvis_json, [stuff_json], tmp_path / "out", workers=1)
    assert atomic == [tmp_path / "out" / "inputs.json", tmp_path / "out" / "classes.json"]


def test_malformed_files_are_one_line_errors(tmp_path):
    """JSON of the wrong shape (build-dataset's inputs, its inputs.json, the loader's classes.json)
    is refused naming the file, not a TypeError traceback."""
    lvis_json, stuff_json = write_fixture(tmp_path, corrupt=False)
    root = tmp_path / "coco"
    out = root / "masks" / "train"
    assert build(tmp_path, out).exit_code == 0
    (out / "inputs.json").write_text("{")
    result = build(tmp_path, out)
    assert result.exit_code == 2 and "inputs.json is damaged" in result.output, result.output
    cfg = DataConfig(name="coco_lvis", root=str(root), num_classes=1284)
    write_images(root, [1, 2, 3, 4])
    for text, why in (("[1, 2]", "a list, not a mask value -> name map"),
                      ('{"0": "unlabeled", "2": "a"}', "no value '1'")):
        (out / "classes.json").write_text(text)
        with pytest.raises(DataError, match=rf"classes.json is not the classes.json .*\({why}"):
            DATASETS["coco_lvis"](cfg, "train")
    lvis = json.loads(lvis_json.read_text())
    for bad, where in (("a string", "images[1]"), ({"id": [2]}, "images[1]")):
        lvis["images"][1] = bad
        lvis_json.write_text(json.dumps(lvis))
        result = build(tmp_path, tmp_path / "other")
        assert result.exit_code == 2 and f"{where} is not a COCO-format entry" in result.output, result.output
