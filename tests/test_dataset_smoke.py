"""One `esskit train` + `esskit evaluate` per dataset loader, through the CLI with the dataset's own
recipe, on the on-disk fixtures of test_datasets.py and test_coco_lvis.py (1 step of a ResNet-18 on
64x64 crops). The evaluated pixel count must be the number of non-ignore pixels that the fixture's
validation split encodes, computed from the fixture's hand-written train ids, not by the loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esskit.cli import app
from esskit.config import load_config
from test_coco_lvis import SIZES, build, expected_mask, write_fixture, write_images
from test_datasets import (ADE20K_TRAIN, CITYSCAPES_TRAIN, COCOSTUFF_TRAIN, HF_KEYS, HF_TRAIN, IGN, VOC_MASKS,
                           labelled, make_ade20k, make_cityscapes, make_cocostuff10k, make_hf_disk, make_voc)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = ["model.pretrained=false", "model.backbone=resnet18", "train.steps=1", "train.batch_size=2",
        "data.crop=[64,64]", "data.base_size=[64,64]", "eval.batch_size=1", "eval.mode=whole",
        "train.log_every=1", "data.num_workers=0"]
# Extra `esskit evaluate` runs per dataset: Cityscapes' recipe evaluates with sliding windows.
SLIDE = ["eval.mode=slide", "eval.crop=[32,32]", "eval.stride=[16,16]"]


# Each writer returns (recipe name, data.root, further --set overrides, labelled pixels of the val split).

def cityscapes(tmp_path: Path) -> tuple[str, Path, list[str], int]:
    make_cityscapes(tmp_path / "cityscapes")
    return "cityscapes", tmp_path / "cityscapes", [], labelled(CITYSCAPES_TRAIN)  # one val frame


def voc(tmp_path: Path):
    root = make_voc(tmp_path)
    val = [IGN if v == 255 else v for v in VOC_MASKS["2007_000033"]]  # the one val image
    return "voc", root, [], labelled(val)


def ade20k(tmp_path: Path):
    make_ade20k(tmp_path / "ADEChallengeData2016")
    return "ade20k", tmp_path / "ADEChallengeData2016", [], 2 * labelled(ADE20K_TRAIN)  # two val images


def cocostuff10k(tmp_path: Path):
    make_cocostuff10k(tmp_path / "cocostuff-10k")
    return "cocostuff10k", tmp_path / "cocostuff-10k", [], labelled(COCOSTUFF_TRAIN)  # one test-list image


def coco_lvis(tmp_path: Path):
    write_fixture(tmp_path, corrupt=False)
    root = tmp_path / "coco"
    for split in ("train", "val"):  # the same 4 images in both: the fixture has no second LVIS file
        result = build(tmp_path, root / "masks" / split)
        assert result.exit_code == 0, result.output
    write_images(root, SIZES)
    return "coco_lvis", root, [], sum(int((expected_mask(i) != 0).sum()) for i in SIZES)


def hf(tmp_path: Path):
    pytest.importorskip("datasets")
    make_hf_disk(tmp_path / "hf")
    # There is no hf recipe (columns and encoding are per dataset): the generic synthetic one, pointed at it.
    keys = [f"data.{key}={value}" for key, value in HF_KEYS.items()] + ["data.val_split=validation"]
    return "synthetic", tmp_path / "hf", keys, labelled(HF_TRAIN)  # validation = the first row


CASES = {  # test id: (data.name, writer, extra --set for training, extra `esskit evaluate` runs)
    "cityscapes": ("cityscapes", cityscapes, [], [SLIDE]),
    # The recipe's split: VOC train PNGs + SBD .mat masks - VOC val; batch 3 reads all three, the .mat too.
    "voc-aug": ("voc", voc, ["train.batch_size=3"], []),
    "voc-train": ("voc", voc, ["data.train_split=train"], []),
    "ade20k": ("ade20k", ade20k, ["data.cat_max_ratio=0.75", "data.photometric=true"], []),  # mmseg's ADE20k crop
    "cocostuff10k": ("cocostuff10k", cocostuff10k, [], []),
    "coco_lvis": ("coco_lvis", coco_lvis, [], []),
    "hf": ("hf", hf, [], []),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def esskit(command: str, recipe: Path, run: Path, overrides: list[str]) -> dict:
    where = ["--out", str(run)] if command == "train" else ["--checkpoint", str(run)]
    result = CliRunner().invoke(app, [command, str(recipe), *where, *(a for o in overrides for a in ("--set", o))])
    assert result.exit_code == 0, result.output
    return json.loads((run / "eval.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_train_and_evaluate_on_fixture(tmp_path, case):
    name, make, train_keys, extra_evaluations = CASES[case]
    recipe, root, keys, pixels = make(tmp_path)
    recipe = RECIPES / f"{recipe}.toml"
    overrides = [f"data.root={root}", *keys, *TINY]
    run = tmp_path / "run"
    trained = esskit("train", recipe, run, overrides + train_keys)
    cfg = load_config(run / "config.toml")  # the resolved recipe
    assert cfg.data.name == name and cfg.train.steps == 1 and cfg.model.backbone == "resnet18"
    assert trained["step"] == 1 and trained["pixels"] == pixels and len(trained["IoU"]) == cfg.data.num_classes
    evaluated = esskit("evaluate", recipe, run, overrides)
    assert evaluated["pixels"] == pixels and evaluated["mIoU"] == pytest.approx(trained["mIoU"], nan_ok=True)
    for extra in extra_evaluations:
        assert esskit("evaluate", recipe, run, overrides + extra)["pixels"] == pixels
