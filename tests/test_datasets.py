"""Dataset loaders on tiny fixtures written in each dataset's official on-disk layout; expected
train ids are written out by hand from the datasets' label definitions and every loaded mask is
compared with them pixel by pixel. The `make_*` writers are shared with test_dataset_smoke.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from typer.testing import CliRunner

from esskit.cli import app
from esskit.config import DataConfig, load_config
from esskit.data import DATASETS, IGNORE_INDEX, build_dataset
from esskit.data.images import read_image, read_mask, write_mask
from esskit.errors import ConfigError, DataError

H, W = 40, 60
IGN = IGNORE_INDEX


def noise(seed: int = 0, size=(H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def rgb(path: Path, seed: int = 0, size=(H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise(seed, size)).save(path)


def bands(values, size=(H, W)) -> np.ndarray:
    """Mask of horizontal bands, one per value, top to bottom, with the right half shifted down by one
    band (the last value wraps to the top), so that a flipped or transposed mask does not pass for
    the original. The same layout filled with the expected train ids is what the loader must return."""
    n = len(values)
    index = (np.arange(size[0])[:, None] * n // size[0] - (np.arange(size[1]) >= size[1] // 2)) % n
    return np.asarray(values, dtype=np.int64)[index]


def assert_labels(mask: torch.Tensor, train_ids) -> None:
    """`mask` equals `bands(train_ids)` pixel by pixel, ignore pixels included."""
    expected = torch.from_numpy(bands(train_ids))
    assert mask.dtype == torch.int64 and mask.shape == expected.shape, (mask.dtype, mask.shape)
    assert torch.equal(mask, expected), f"{(mask != expected).sum()} pixels differ from {train_ids}"


def labelled(train_ids) -> int:
    """Pixels of one `bands(train_ids)` mask that are not ignore: what evaluation counts."""
    return int((bands(train_ids) != IGN).sum())


def grey(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).save(path)


def voc_palette() -> list[int]:
    """The VOC colour map (bit-interleaved class index), as in the devkit's VOClabelcolormap.m."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def data_cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


# ------------------------------------------------------------------------------------ 16-bit masks


def test_16bit_mask_round_trip(tmp_path):
    values = np.array([[0, 1, 255, 256], [1203, 1284, 4000, 65535]])
    write_mask(tmp_path / "m.png", values)
    with Image.open(tmp_path / "m.png") as image:
        assert image.mode == "I;16"
    back = read_mask(tmp_path / "m.png")
    assert back.dtype == np.int64 and np.array_equal(back, values)
    write_mask(tmp_path / "small.png", np.array([[0, 7]]), bits=16)  # forced 16-bit stays 16-bit
    with Image.open(tmp_path / "small.png") as image:
        assert image.mode == "I;16"
    with pytest.raises(ValueError):
        write_mask(tmp_path / "bad.png", np.array([[300]]), bits=8)
    wide = np.array([[0, 65535, 65536, 99999, 2**31 - 1]])  # past PNG's 16 bits: a 32-bit TIFF
    write_mask(tmp_path / "m.tif", wide, bits=32)
    with Image.open(tmp_path / "m.tif") as image:
        assert image.mode == "I" and image.format == "TIFF"
    assert np.array_equal(read_mask(tmp_path / "m.tif"), wide)
    with pytest.raises(ValueError, match="do not fit in 16-bit PNG"):
        write_mask(tmp_path / "bad.png", wide, bits=16)
    assert not list(tmp_path.glob(".*partial"))


def test_read_image_scales_16bit_grey_and_turns_photos_upright(tmp_path):
    # 16-bit greyscale: scaled to 8 bits (PIL's convert("RGB") clips everything above 255 to white)
    Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert read_image(tmp_path / "g16.png").tolist() == [[[0, 1, 128, 255]]] * 3
    # EXIF orientation 6 (stored 2 x 3, shown 3 x 2): as stored by default (dataset images, whose masks
    # match the stored grid), as shown with upright (esskit predict)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3) * 40).convert("RGB").save(
        tmp_path / "photo.png", exif=exif)
    assert read_image(tmp_path / "photo.png").shape == (3, 2, 3)
    upright = read_image(tmp_path / "photo.png", upright=True)
    assert upright.shape == (3, 3, 2) and upright[0].tolist() == [[120, 0], [160, 40], [200, 80]]


def test_rgb_mask_is_refused(tmp_path):
    rgb(tmp_path / "m.png")
    with pytest.raises(DataError, match="m.png.*mode 'RGB'"):
        read_mask(tmp_path / "m.png")


# -------------------------------------------------------------------------------------- cityscapes

CITYSCAPES_IDS = [7, 26, 0, 33, 9, 24, 23]  # road, car, unlabeled, bicycle, parking, person, sky
CITYSCAPES_TRAIN = [0, 13, IGN, 18, IGN, 11, 10]


def make_cityscapes(root: Path) -> None:
    for split, city, frames in (("train", "aachen", 2), ("val", "frankfurt", 1)):
        for f in range(frames):
            stem = f"{city}_{f:06d}_000019"
            rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", f)
            gt = root / "gtFine" / split / city
            grey(gt / f"{stem}_gtFine_labelIds.png", bands(CITYSCAPES_IDS))
            rgb(gt / f"{stem}_gtFine_color.png", f)  # present in the real download, not a mask to read


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    make_cityscapes(tmp_path)
    ds = DATASETS["cityscapes"](data_cfg(name="cityscapes", root=str(tmp_path)), "train")
    assert len(ds) == 2 and len(ds.class_names) == 19 and ds.class_names[13] == "car"
    image, mask = ds[1]
    assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(noise(1).transpose(2, 0, 1)))
    assert_labels(mask, CITYSCAPES_TRAIN)
    assert len(DATASETS["cityscapes"](data_cfg(name="cityscapes", root=str(tmp_path)), "val")) == 1
    # a labelTrainIds mask saved under the labelIds name (void 255) is refused, not read as all void
    mask = tmp_path / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
    grey(mask, bands([0, 13, 255]))
    with pytest.raises(DataError, match=f"mask {mask} holds value 255, outside the dataset's stored range 0..33"):
        ds[1]
    # the train-id masks cityscapesscripts writes (what mmseg reads), where the labelIds are absent
    for labels in (tmp_path / "gtFine").rglob("*_gtFine_labelIds.png"):
        grey(labels.with_name(labels.name.replace("labelIds", "labelTrainIds")), bands([0, 13, 255, 18, 255, 11, 10]))
        labels.unlink()
    train_ids = DATASETS["cityscapes"](data_cfg(name="cityscapes", root=str(tmp_path)), "train")
    assert_labels(train_ids[1][1], CITYSCAPES_TRAIN)
    grey(mask.with_name(mask.name.replace("labelIds", "labelTrainIds")), bands([0, 19]))
    with pytest.raises(DataError, match="holds value 19, which is no class of this dataset"):
        train_ids[1]


def test_cityscapes_errors_name_the_path(tmp_path):
    make_cityscapes(tmp_path)
    cfg = data_cfg(name="cityscapes", root=str(tmp_path))
    with pytest.raises(DataError, match=r"leftImg8bit/test not found; expected leftImg8bit/\{split\}"):
        DATASETS["cityscapes"](cfg, "test")
    with pytest.raises(DataError, match="data.root .*nowhere is not a directory"):
        DATASETS["cityscapes"](data_cfg(name="cityscapes", root=str(tmp_path / "nowhere")), "train")
    with pytest.raises(DataError, match="data.root is not set"):
        DATASETS["cityscapes"](data_cfg(name="cityscapes"), "train")
    with pytest.raises(DataError, match="has 19 classes but data.num_classes = 20"):
        DATASETS["cityscapes"](data_cfg(name="cityscapes", root=str(tmp_path), num_classes=20), "train")
    missing = tmp_path / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
    missing.unlink()
    with pytest.raises(DataError, match="aachen_000001_000019_gtFine_labelIds.png not found"):
        DATASETS["cityscapes"](cfg, "train")
    grey(missing, np.zeros((H, W + 1)))  # one column too many
    with pytest.raises(DataError, match=r"aachen_000001_000019_gtFine_labelIds.png is 40x61 but image"):
        DATASETS["cityscapes"](cfg, "train")[1]


# --------------------------------------------------------------------------------------------- VOC

VOC_MASKS = {"2007_000032": [0, 1, 15, 255], "2007_000033": [20, 255], "2007_000039": [3]}  # 33 is val
SBD_MASK = [0, 7, 12]  # GTcls.Segmentation of every SBD .mat (no void value)


def make_voc(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for i, (name, values) in enumerate(VOC_MASKS.items()):
        rgb(root / "JPEGImages" / f"{name}.jpg", i)
        png = Image.fromarray(bands(values).astype(np.uint8), mode="L")
        png.putpalette(voc_palette())  # palette PNG, as in SegmentationClass
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        png.save(root / "SegmentationClass" / f"{name}.png")
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000032\n2007_000039\n")
    (sets / "val.txt").write_text("2007_000033\n")
    sbd = tmp_path / "VOCdevkit" / "VOCaug" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    for i, name in enumerate(["2008_000002", "2007_000033", "2007_000032"]):  # one in VOC val, one in VOC train
        rgb(root / "JPEGImages" / f"{name}.jpg", 10 + i)
        seg = bands(SBD_MASK).astype(np.uint8)
        savemat(sbd / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros(3),
                                                        "CategoriesPresent": np.array([7, 12])}})
    (sbd / "train.txt").write_text("2008_000002\n2007_000033\n")
    (sbd / "val.txt").write_text("2007_000032\n")
    return root


def test_voc_palette_index_and_void(tmp_path):
    root = make_voc(tmp_path)
    ds = DATASETS["voc"](data_cfg(name="voc", root=str(root), num_classes=21), "train")
    assert len(ds) == 2 and ds.class_names[15] == "person"
    assert_labels(ds[0][1], [0, 1, 15, IGN])
    assert_labels(ds[1][1], [3])
    assert_labels(DATASETS["voc"](data_cfg(name="voc", root=str(root), num_classes=21), "val")[0][1], [20, IGN])


def test_voc_aug_reads_sbd_mat_and_excludes_val(tmp_path):
    root = make_voc(tmp_path)
    ds = DATASETS["voc"](data_cfg(name="voc", root=str(root), num_classes=21), "aug")
    names = [Path(p).stem for p in ds.images]
    assert names == ["2007_000032", "2007_000039", "2008_000002"]  # 2007_000033 is VOC val
    assert ds.masks[0].endswith("SegmentationClass/2007_000032.png")  # VOC's own mask preferred
    assert ds.masks[2].endswith("cls/2008_000002.mat")
    assert_labels(ds[0][1], [0, 1, 15, IGN])  # the PNG's void, not the .mat's background
    assert_labels(ds[2][1], [0, 7, 12])
    with pytest.raises(DataError, match=r"elsewhere/train.txt not found; expected .*data.sbd_root"):
        DATASETS["voc"](data_cfg(name="voc", root=str(root), num_classes=21, sbd_root=str(tmp_path / "elsewhere")), "aug")
    with pytest.raises(DataError, match=r"ImageSets/Segmentation/trainval.txt not found"):
        DATASETS["voc"](data_cfg(name="voc", root=str(root), num_classes=21), "trainval")


# ------------------------------------------------------------------------------------------ ADE20k

ADE20K_VALUES, ADE20K_TRAIN = [0, 1, 150, 13], [IGN, 0, 149, 12]  # other, wall, flag, person


def make_ade20k(root: Path) -> None:
    for folder, prefix, n in (("training", "ADE_train", 3), ("validation", "ADE_val", 2)):
        for i in range(1, n + 1):
            rgb(root / "images" / folder / f"{prefix}_{i:08d}.jpg", i)
            grey(root / "annotations" / folder / f"{prefix}_{i:08d}.png", bands(ADE20K_VALUES))


def test_ade20k_zero_is_ignore_and_shift(tmp_path):
    make_ade20k(tmp_path)
    cfg = data_cfg(name="ade20k", root=str(tmp_path), num_classes=150)
    ds = DATASETS["ade20k"](cfg, "train")
    assert len(ds) == 3 and len(ds.class_names) == 150 and ds.class_names[12] == "person"
    assert_labels(ds[0][1], ADE20K_TRAIN)
    val = DATASETS["ade20k"](cfg, "validation")
    assert len(val) == 2
    assert_labels(val[1][1], ADE20K_TRAIN)
    with pytest.raises(DataError, match="split 'test' is not one of"):
        DATASETS["ade20k"](cfg, "test")


def test_a_stored_value_of_no_class_names_the_mask(tmp_path):
    """ADE20k's C is fixed: value 152 (train id 151) must name the file, not advise data.num_classes."""
    make_ade20k(tmp_path)
    values = bands(ADE20K_VALUES)
    values[0, 0] = 152
    grey(tmp_path / "annotations" / "training" / "ADE_train_00000002.png", values)
    ds = DATASETS["ade20k"](data_cfg(name="ade20k", root=str(tmp_path), num_classes=150), "train")
    ds[0]
    with pytest.raises(DataError, match=r"ADE_train_00000002\.png holds value 152, which is no class of this "
                                        r"dataset's 150"):
        ds[1]


# ----------------------------------------------------------------------------------- COCO-Stuff10k

COCOSTUFF_VALUES, COCOSTUFF_TRAIN = [0, 1, 182, 165], [IGN, 0, 181, 164]  # unlabeled, person, wood, table


def make_cocostuff10k(root: Path) -> None:
    names = [f"COCO_train2014_{i:012d}" for i in (77, 109, 260)]
    for i, name in enumerate(names):
        rgb(root / "images" / f"{name}.jpg", i)
        (root / "annotations").mkdir(exist_ok=True)
        savemat(root / "annotations" / f"{name}.mat",
                {"S": bands(COCOSTUFF_VALUES).astype(np.uint8), "names": np.array(["unlabeled"], dtype=object)})
    (root / "imageLists").mkdir()
    (root / "imageLists" / "train.txt").write_text("\n".join(names[:2]) + "\n")
    (root / "imageLists" / "test.txt").write_text(names[2] + "\n")


def test_cocostuff10k_mat_labels(tmp_path):
    make_cocostuff10k(tmp_path)
    cfg = data_cfg(name="cocostuff10k", root=str(tmp_path), num_classes=182)
    ds = DATASETS["cocostuff10k"](cfg, "train")
    assert len(ds) == 2 and ds.class_names[0] == "person" and ds.class_names[164] == "table"
    assert_labels(ds[1][1], COCOSTUFF_TRAIN)
    val = DATASETS["cocostuff10k"](cfg, "val")  # val reads the 1k test list
    assert len(val) == 1 and val.masks[0].endswith("COCO_train2014_000000000260.mat")
    assert_labels(val[0][1], COCOSTUFF_TRAIN)
    (tmp_path / "images" / "COCO_train2014_000000000260.jpg").unlink()
    with pytest.raises(DataError, match=r"images/COCO_train2014_000000000260.jpg not found; expected images/"):
        DATASETS["cocostuff10k"](cfg, "test")


# ------------------------------------------------------------------------------- Hugging Face (hf)

HF_VALUES, HF_TRAIN = (0, 1, 300), [IGN, 0, 299]  # stored 0 = void, v -> v - 1 (ADE20k-style)
# The data.* keys that read make_hf_disk's dataset (the smoke test passes them as --set).
HF_KEYS = dict(name="hf", num_classes=400, image_column="pixels", mask_column="seg", mask_void_value=0,
               mask_label_offset=1)


def hf_rows(n=3, values=HF_VALUES):
    images = [Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)) for i in range(n)]
    masks = [Image.fromarray(bands(values).astype(np.uint16)) for _ in range(n)]  # 16-bit PNG masks
    return images, masks


def make_hf_disk(path: Path):
    """A save_to_disk DatasetDict: train (3 rows, plus a column the loader must not decode) and
    validation (its first row); returns the train `datasets.Dataset`."""
    import datasets

    images, masks = hf_rows()
    table = datasets.Dataset.from_dict({"pixels": images, "seg": masks, "note": ["a", "b", "c"]},
                                       features=datasets.Features({"pixels": datasets.Image(),
                                                                   "seg": datasets.Image(),
                                                                   "note": datasets.Value("string")}))
    datasets.DatasetDict({"train": table, "validation": table.select([0])}).save_to_disk(path)
    return table


def test_hf_load_from_disk_parquet_and_imagefolder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    images, masks = hf_rows()
    table = make_hf_disk(tmp_path / "disk")
    table.to_parquet(str(tmp_path / "train.parquet"))
    common = HF_KEYS
    ds = build_dataset(data_cfg(root=str(tmp_path / "disk"), val_split="validation", **common), "validation", train=False)
    assert len(ds) == 1
    assert_labels(ds[0][1], HF_TRAIN)  # the evaluation transforms leave the mask as it is
    for root in (tmp_path / "disk", tmp_path / "{split}.parquet"):
        raw = DATASETS["hf"](data_cfg(root=str(root), **common), "train")
        image, mask = raw[2]
        assert len(raw) == 3 and image.shape == (3, H, W) and bool((image == 80).all())
        assert_labels(mask, HF_TRAIN)  # 16-bit value 300 survives, then v - 1
        assert raw.class_names[7] == "class_7"
    folder = tmp_path / "folder" / "train"
    folder.mkdir(parents=True)
    rows = []
    for i, (image, mask) in enumerate(zip(images, masks)):
        image.save(folder / f"img{i}.png")
        mask.save(folder / f"mask{i}.png")
        rows.append(json.dumps({"file_name": f"img{i}.png", "mask_file_name": f"mask{i}.png"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows))
    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing {c}\n" for c in range(400)))
    raw = DATASETS["hf"](data_cfg(root=str(tmp_path / "folder"), **{**common, "image_column": "image",
                                  "mask_column": "mask"}, class_names_file=str(names)), "train")
    assert len(raw) == 3 and raw.class_names[399] == "thing 399"
    assert_labels(raw[0][1], HF_TRAIN)


def test_hf_split_folders_and_exif_tagged_photos(tmp_path, monkeypatch):
    """'{split}' folders of parquet shards each hold their split (`datasets` files them all under
    "train"); a folder with train/ and val/ serves val_split "val" from its "validation"; photos with an
    EXIF orientation tag are read as stored, in line with their untagged masks."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    images, masks = hf_rows()
    table = datasets.Dataset.from_dict({"pixels": images, "seg": masks},
                                       features=datasets.Features({"pixels": datasets.Image(), "seg": datasets.Image()}))
    for split, rows in (("train", 3), ("val", 1)):
        (tmp_path / "shards" / split).mkdir(parents=True)
        table.select(range(rows)).to_parquet(str(tmp_path / "shards" / split / "0000.parquet"))
    for split, rows in (("train", 3), ("val", 1)):
        assert len(DATASETS["hf"](data_cfg(root=str(tmp_path / "shards" / "{split}"), **HF_KEYS), split)) == rows
    # an imagefolder with split folders; the top-left band of each photo is stored bright, its mask 0 (void)
    upright = tmp_path / "folder"
    for split in ("train", "val"):
        (upright / split).mkdir(parents=True)
        stored = np.zeros((H, W, 3), np.uint8)
        stored[: H // 3] = 200
        exif = Image.Exif()
        exif[0x0112] = 3  # Orientation: rotate 180 to show
        Image.fromarray(stored).save(upright / split / "img0.jpg", exif=exif.tobytes(), quality=95)
        masks[0].save(upright / split / "mask0.png")
        (upright / split / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.jpg",
                                                                    "mask_file_name": "mask0.png"}))
    raw = DATASETS["hf"](data_cfg(root=str(upright), **{**HF_KEYS, "image_column": "image", "mask_column": "mask"}),
                         "val")
    image, mask = raw[0]
    assert len(raw) == 1 and image[:, : H // 3].float().mean() > 150 and image[:, -H // 3:].float().mean() < 50
    assert_labels(mask, HF_TRAIN)
    with pytest.raises(DataError, match=r"split 'test' not in .*folder \(splits: train, validation\)"):
        DATASETS["hf"](data_cfg(root=str(upright), **HF_KEYS), "test")


def test_hf_errors_and_hub_routing(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    with pytest.raises(DataError, match=r"missing.parquet not found; expected data.root = a save_to_disk"):
        DATASETS["hf"](data_cfg(name="hf", root=str(tmp_path / "missing.parquet")), "train")
    images, masks = hf_rows(1)
    datasets.Dataset.from_dict({"image": images, "annotation": masks}).save_to_disk(tmp_path / "train")
    with pytest.raises(DataError, match=r"no column 'label' \(columns: image, annotation\)"):
        DATASETS["hf"](data_cfg(name="hf", root=str(tmp_path / "{split}")), "train")
    # one split without '{split}' in data.root: train and val would be the same rows
    datasets.Dataset.from_dict({"image": images, "annotation": masks}).to_parquet(str(tmp_path / "all.parquet"))
    for one in (tmp_path / "train", tmp_path / "all.parquet"):
        with pytest.raises(DataError, match=rf"{one} holds a single split.*put '{{split}}' in data.root"):
            DATASETS["hf"](data_cfg(name="hf", root=str(one)), "val")
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append((a, kw)) or
                        datasets.Dataset.from_dict({"image": images, "label": masks}))
    # 400 classes: the default void value 255 would be class 255, so the recipe must name one (-1 = none)
    raw = DATASETS["hf"](data_cfg(name="hf", root="owner/segments", hf_config="full", num_classes=400,
                                  mask_void_value=-1), "train")
    assert calls == [(("owner/segments", "full"), {"split": "train"})] and len(raw) == 1
    assert_labels(raw[0][1], [0, 1, 300])  # no void value, no offset
    with pytest.raises(ConfigError, match=r"data\.mask_void_value = 255 is the stored value of class 255"):
        data_cfg(name="hf", num_classes=400)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"needs the optional package `datasets`: pip install 'esskit\[hf\]'"):
        DATASETS["hf"](data_cfg(name="hf", root="owner/segments"), "train")
    with pytest.raises(ConfigError, match="class_names has 2 names but data.num_classes = 19"):
        data_cfg(name="hf", class_names=["a", "b"])


# ------------------------------------------------------------------------------ recipes and CLI

TABLE_1 = {  # recipe: (C, crop, ESS batch, d, k, lr, steps = epochs x train images / batch)
    "cityscapes": (19, [400, 800], 10, 7, 6, 0.1, 200 * 2975 // 10),
    "voc": (21, [512, 512], 10, 7, 8, 0.1, 40000 * 16 // 10),
    "ade20k": (150, [512, 512], 10, 12, 7, 0.01, 80 * 20210 // 10),
    "cocostuff10k": (182, [512, 512], 10, 12, 7, 0.01, 40000 * 16 // 10),
    "coco_lvis": (1284, [450, 450], 10, 12, 8, 0.01, 40 * 100170 // 10),
}


@pytest.mark.parametrize("name", TABLE_1)
def test_recipes_carry_table_1(name):
    cfg = load_config(Path("recipes") / f"{name}.toml")
    c, crop, batch, d, k, lr, steps = TABLE_1[name]
    got = (cfg.data.num_classes, cfg.data.crop, cfg.train.batch_size, cfg.model.embed_dim, cfg.method.k,
           cfg.optim.lr, cfg.train.steps)
    assert got == (c, crop, batch, d, k, lr, steps)
    assert cfg.model.backbone == "resnet50" and cfg.model.pretrained and cfg.method.name == "ess"
    assert cfg.data.name in DATASETS and "method.name=baseline" in Path(f"recipes/{name}.toml").read_text()


def test_datasets_command_lists_every_loader():
    result = CliRunner().invoke(app, ["datasets"])
    assert result.exit_code == 0, result.output
    for name in DATASETS:
        assert name in result.output
    assert "gtFine" in result.output and "esskit build-dataset coco-lvis" in result.output



def test_predict_names_hf_classes_from_the_recipe_without_loading_the_dataset(monkeypatch):
    """palette.class_names (predict, analyze) takes the recipe's names for hf; loading the split
    would mean a download, and offline it fell back to class_N."""
    import esskit.data
    from esskit.palette import class_names

    def no_loading(*args, **kwargs):
        raise AssertionError("the dataset was loaded")

    monkeypatch.setitem(esskit.data.DATASETS, "hf", no_loading)
    cfg = data_cfg(name="hf", root="some/hub-id", num_classes=3, class_names=["sky", "road", "car"])
    assert class_names(cfg) == ["sky", "road", "car"]


def test_unreadable_split_lists_and_hf_text_masks_are_one_line_errors(tmp_path, monkeypatch):
    root = make_voc(tmp_path)
    voc = data_cfg(name="voc", root=str(root), num_classes=21)
    split_list = root / "ImageSets" / "Segmentation" / "train.txt"
    split_list.write_bytes(b"2007_000032\n2007_00\xe9039\n")  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=r"cannot read split list .*train\.txt .*utf-8"):
        DATASETS["voc"](voc, "train")
    split_list.unlink()
    split_list.mkdir()  # a directory where the list belongs
    with pytest.raises(DataError, match=r"cannot read split list .*train\.txt .*Is a directory"):
        DATASETS["voc"](voc, "train")

    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    images, _ = hf_rows(2)
    table = datasets.Dataset.from_dict({"pixels": images, "seg": ["mask0.png", "mask1.png"]},
                                       features=datasets.Features({"pixels": datasets.Image(),
                                                                   "seg": datasets.Value("string")}))
    datasets.DatasetDict({"train": table}).save_to_disk(tmp_path / "names")
    raw = DATASETS["hf"](data_cfg(root=str(tmp_path / "names"), **HF_KEYS), "train")
    with pytest.raises(DataError, match=r"row 0: the mask column holds str 'mask0.png', not a mask image"):
        raw[0]


def test_predict_never_loads_an_hf_hub_dataset_for_class_names(monkeypatch):
    import esskit.data
    from esskit.palette import class_names

    monkeypatch.setitem(esskit.data.DATASETS, "hf", lambda *a, **k: pytest.fail("the hub dataset was loaded"))
    assert class_names(data_cfg(name="hf", root="someone/some-seg-dataset", num_classes=3)) == [
        "class_0", "class_1", "class_2"]


def test_empty_mat_masks_are_data_errors(tmp_path):
    """A 0-byte .mat (interrupted download or unzip) makes scipy raise MatReadError, which is not an
    OSError/ValueError: it must still be the loaders' one-line DataError naming the file."""
    root = make_voc(tmp_path)
    (tmp_path / "VOCdevkit/VOCaug/dataset/cls/2008_000002.mat").write_bytes(b"")
    aug = DATASETS["voc"](data_cfg(name="voc", root=str(root), num_classes=21), "aug")
    with pytest.raises(DataError, match=r"cannot read SBD mask .*2008_000002.mat"):
        aug[2]
    coco = tmp_path / "coco"
    make_cocostuff10k(coco)
    (coco / "annotations/COCO_train2014_000000000077.mat").write_bytes(b"")
    ds = DATASETS["cocostuff10k"](data_cfg(name="cocostuff10k", root=str(coco), num_classes=182), "train")
    with pytest.raises(DataError, match=r"cannot read COCO-Stuff10k mask .*000000000077.mat"):
        ds[0]


def test_hf_images_as_uint8_arrays(tmp_path):
    """`datasets` hands uint8 array columns (Array3D) back as nested lists, int64 to numpy."""
    datasets = pytest.importorskip("datasets")
    from esskit.data.hf import HFSegmentation

    pixels = noise(3, (4, 5))
    table = datasets.Dataset.from_dict(
        {"image": [pixels], "label": [np.ones((4, 5), np.uint8)]},
        features=datasets.Features({"image": datasets.Array3D((4, 5, 3), "uint8"),
                                    "label": datasets.Array2D((4, 5), "uint8")}))
    image, mask = HFSegmentation(table, data_cfg(name="hf", root="x", num_classes=3), "train")[0]
    assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(pixels.transpose(2, 0, 1)))
    assert torch.equal(mask, torch.ones(4, 5, dtype=torch.int64))


def test_hf_16bit_grey_images_are_scaled_not_clipped(tmp_path):
    datasets = pytest.importorskip("datasets")
    from esskit.data.hf import HFSegmentation

    grey16 = (np.arange(20).reshape(4, 5) * 3000).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g.png")
    table = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(grey16)], "label": [Image.fromarray(np.ones((4, 5), np.uint8))]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Image()}))
    image, _ = HFSegmentation(table, data_cfg(name="hf", root="x", num_classes=3), "train")[0]
    assert torch.equal(image, read_image(tmp_path / "g.png"))  # as the file loaders read it (/257)


def test_mat_masks_cut_inside_the_header_are_data_errors(tmp_path):
    """A .mat cut short within its 128-byte header makes scipy raise IndexError / TypeError."""
    from scipy.io import savemat

    from esskit.data import cocostuff, voc

    savemat(tmp_path / "full.mat", {"S": np.ones((4, 5), np.uint8)})
    for size in (20, 100, 127):
        (tmp_path / "cut.mat").write_bytes((tmp_path / "full.mat").read_bytes()[:size])
        for read in (cocostuff.read_labels, voc.read_labels):
            with pytest.raises(DataError, match="cut.mat"):
                read(str(tmp_path / "cut.mat"))


def test_hf_8bit_grey_images_held_as_32bit_are_not_darkened():
    """`datasets` stores an integer grey array (int64, numpy's default) as a 32-bit "I" image."""
    datasets = pytest.importorskip("datasets")
    from esskit.data.hf import HFSegmentation

    grey = (np.arange(20).reshape(4, 5) * 12).astype(np.int64)
    table = datasets.Dataset.from_dict(
        {"image": [grey], "label": [Image.fromarray(np.ones((4, 5), np.uint8))]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Image()}))
    assert table[0]["image"].mode == "I"
    image, _ = HFSegmentation(table, data_cfg(name="hf", root="x", num_classes=3), "train")[0]
    assert torch.equal(image, torch.from_numpy(np.repeat(grey[None], 3, axis=0)).to(torch.uint8))
