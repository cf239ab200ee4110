"""`esskit predict` and esskit.palette, on tiny trained synthetic checkpoints (through the CLI)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from esskit.cli import app
from esskit.config import load_config
from esskit.data.images import read_mask
from esskit.data.synthetic import SyntheticSegmentation
from esskit.engine import model_from_config
from esskit.palette import CITYSCAPES_COLORS, generated_palette, palette_for, voc_palette

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "synthetic.toml"
TINY = ["train.steps=2", "data.crop=[64,64]", "data.base_size=[64,64]", "data.synthetic_image_size=64",
        "data.synthetic_train_size=4", "data.synthetic_val_size=2", "train.batch_size=2", "eval.batch_size=2"]
runner = CliRunner()


def trained_run(tmp_path_factory, name: str, *overrides: str) -> Path:
    """A 2-step synthetic run, trained once per test session (test_analyze.py reuses it: the base
    temp directory is shared by every module of the session)."""
    run = tmp_path_factory.getbasetemp() / "runs" / name
    if not (run / "eval.json").is_file():
        sets = [a for o in TINY + list(overrides) for a in ("--set", o)]
        result = runner.invoke(app, ["train", str(RECIPE), "--out", str(run), *sets])
        assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="session")
def ess_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "ess")


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "baseline", "method.name=baseline")


def save_images(folder: Path) -> list[Path]:
    """Two synthetic validation images (64x64) and one of another size, in a nested folder."""
    (folder / "sub").mkdir(parents=True)
    data = SyntheticSegmentation(19, 2, 64, split="val")
    paths = [folder / "a.png", folder / "sub" / "b.jpg", folder / "z.png"]
    Image.fromarray(data[0][0].permute(1, 2, 0).numpy()).save(paths[0])
    Image.fromarray(data[1][0].permute(1, 2, 0).numpy()).save(paths[1], quality=95)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(paths[2])
    return paths


@functools.cache
def trained_model(run: Path) -> tuple:
    cfg = load_config(run / "config.toml")
    model = model_from_config(cfg)
    model.load_state_dict(load_file(sorted(run.glob("checkpoint-*"))[-1] / "model.safetensors"))
    return cfg, model.eval()


@torch.no_grad()
def reference_cost(run: Path, image: Path) -> np.ndarray:
    """Brute force [H, W, C] cost, lower = better: the distance of every pixel to every class
    embedding (full matrix, no esskit kNN), or the negated baseline logits."""
    cfg, model = trained_model(run)
    rgb = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1).float() / 255
    x = (rgb - torch.tensor(cfg.data.mean)[:, None, None]) / torch.tensor(cfg.data.std)[:, None, None]
    out = model(x[None])
    size = rgb.shape[-2:]
    if "logits" in out:
        return -F.interpolate(out["logits"], size=size, mode="bilinear")[0].permute(1, 2, 0).numpy()
    emb = F.normalize(F.interpolate(out["embeddings"], size=size, mode="bilinear")[0].flatten(1).T, dim=1)
    mu = F.normalize(out["class_embeddings"], dim=1)
    return torch.cdist(emb, mu).view(*size, -1).numpy()


def assert_best(labels: np.ndarray, cost: np.ndarray) -> None:
    """Each label is a best class of its pixel; float rounding may pick either of two near-ties."""
    chosen = np.take_along_axis(cost, labels[..., None].astype(np.int64), -1)[..., 0]
    assert np.all(chosen <= cost.min(-1) + 1e-4)
    assert (labels == cost.argmin(-1)).mean() > 0.99


@pytest.mark.parametrize("method", ["ess", "baseline"])
def test_predict_writes_masks_matching_brute_force(tmp_path, method, request, monkeypatch):
    import esskit.files
    import esskit.predict

    run = request.getfixturevalue(f"{method}_run")
    images = save_images(tmp_path / "images")
    out = tmp_path / "out"
    atomic = []  # predictions.json is replaced whole, never left half-written
    monkeypatch.setattr(esskit.predict, "write_atomic",
                        lambda path, text: (atomic.append(Path(path)), esskit.files.write_atomic(path, text)))
    result = runner.invoke(app, ["predict", "--checkpoint", str(run), str(tmp_path / "images"), "--out", str(out),
                                 "--overlay", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    palette = palette_for("synthetic", 19)
    for image, name in zip(images, ["a", "sub/b", "z"]):
        labels_png = Image.open(out / f"{name}_labels.png")
        assert labels_png.mode == "L"
        labels = np.asarray(labels_png)
        assert labels.shape == np.asarray(Image.open(image)).shape[:2]  # full resolution
        assert_best(labels, reference_cost(run, image))
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{name}_color.png")), palette[labels])
        overlay = Image.open(out / f"{name}_overlay.png")
        assert overlay.width > labels.shape[1] and overlay.height >= labels.shape[0]  # legend on the right
    summary = json.loads((out / "predictions.json").read_text())
    assert atomic == [out / "predictions.json"]
    assert [r["image"] for r in summary["images"]] == ["a", "sub/b", "z"]
    fractions = [c["fraction"] for c in summary["images"][0]["classes"]]
    assert fractions == sorted(fractions, reverse=True) and sum(fractions) == pytest.approx(1, abs=1e-4)
    assert summary["images"][0]["classes"][0]["name"].startswith("class_")


@torch.no_grad()
def test_predict_slides_windows_as_evaluate_does(tmp_path, ess_run):
    # a run whose recipe evaluates in 32 x 32 windows (stride 16): predict must average the same windows.
    # Random weights, whose labels vary from pixel to pixel (2 steps of training leave one class everywhere).
    import shutil

    from safetensors.torch import save_file

    from esskit.config import save_config

    run = tmp_path / "run"
    shutil.copytree(ess_run, run)
    config = load_config(run / "config.toml", ["eval.mode=slide", "eval.crop=[32,32]", "eval.stride=[16,16]"])
    save_config(config, run / "config.toml")
    torch.manual_seed(0)
    model = model_from_config(config).eval()
    save_file(model.state_dict(), sorted(run.glob("checkpoint-*"))[-1] / "model.safetensors")
    image = save_images(tmp_path / "images")[0]
    result = runner.invoke(app, ["predict", "--checkpoint", str(run), str(image), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rgb = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1).float() / 255
    x = ((rgb - torch.tensor(config.data.mean)[:, None, None]) / torch.tensor(config.data.std)[:, None, None])[None]
    total, count = 0, torch.zeros(64, 64)
    for top in (0, 16, 32):
        for left in (0, 16, 32):
            out = model(x[..., top:top + 32, left:left + 32])
            window = torch.zeros(1, out["embeddings"].shape[1], 64, 64)
            window[..., top:top + 32, left:left + 32] = F.interpolate(out["embeddings"], size=(32, 32), mode="bilinear")
            total, count[top:top + 32, left:left + 32] = total + window, count[top:top + 32, left:left + 32] + 1
    emb = F.normalize((total / count)[0].flatten(1).T, dim=1)
    cost = torch.cdist(emb, F.normalize(out["class_embeddings"], dim=1)).view(64, 64, -1).numpy()
    labels = np.asarray(Image.open(tmp_path / "out" / "a_labels.png"))
    assert_best(labels, cost)
    whole = F.interpolate(model(x)["embeddings"], size=(64, 64), mode="bilinear")[0].flatten(1).T
    whole = torch.cdist(F.normalize(whole, dim=1), F.normalize(out["class_embeddings"], dim=1)).argmin(1).view(64, 64)
    assert (labels != whole.numpy()).any()  # the whole-image prediction would not pass


def test_predict_16bit_labels_above_255_classes(tmp_path_factory, tmp_path):
    run = trained_run(tmp_path_factory, "c300", "data.num_classes=300", "method.k=4")
    image = save_images(tmp_path / "images")[0]
    result = runner.invoke(app, ["predict", "--checkpoint", str(run), str(image), "--out", str(tmp_path / "out"),
                                 "--overlay"])
    assert result.exit_code == 0, result.output
    labels_png = Image.open(tmp_path / "out" / "a_labels.png")
    assert labels_png.mode == "I;16"
    labels = np.asarray(labels_png)
    assert_best(labels, reference_cost(run, image))
    assert labels.max() < 300


def test_predict_32bit_tiff_labels_above_65536_classes(tmp_path_factory, tmp_path):
    """PNG's 16 bits hold 65,536 class ids; above that NAME_labels.tif, a 32-bit TIFF (read_mask reads it)."""
    run = trained_run(tmp_path_factory, "c70k", "data.num_classes=70000", "method.k=4", "model.embed_dim=8",
                      "method.margin_weight=0")  # Eq. 7 searches C x C: seconds here, and not what is tested
    image = save_images(tmp_path / "images")[0]
    result = runner.invoke(app, ["predict", "--checkpoint", str(run), str(image), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out" / "a_labels.png").exists()
    with Image.open(tmp_path / "out" / "a_labels.tif") as tif:
        assert tif.mode == "I"
    labels = read_mask(tmp_path / "out" / "a_labels.tif")
    cfg, model = trained_model(run)  # brute force nearest class, in row chunks ([4096, 70000] is 1 GiB)
    rgb = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        out = model(((rgb - torch.tensor(cfg.data.mean)[:, None, None]) / torch.tensor(cfg.data.std)[:, None, None])[None])
    emb = F.normalize(F.interpolate(out["embeddings"], size=rgb.shape[-2:], mode="bilinear")[0].flatten(1).T, dim=1)
    mu = F.normalize(out["class_embeddings"], dim=1)
    chosen = (emb - mu[torch.from_numpy(labels.ravel())]).norm(dim=1)
    best = torch.cat([torch.cdist(rows, mu).min(1).values for rows in emb.split(512)])
    assert (chosen <= best + 1e-4).all()
    assert labels.max() >= 256 and labels.max() < 70000  # ids past 8 bits, none past C


def test_palettes_are_stable_and_distinct():
    # Values pinned: a colour that changed between releases would silently repaint saved masks.
    np.testing.assert_array_equal(voc_palette(21)[[0, 1, 2, 15, 20]],
                                  [[0, 0, 0], [128, 0, 0], [0, 128, 0], [192, 128, 128], [0, 64, 128]])
    np.testing.assert_array_equal(palette_for("cityscapes", 19), CITYSCAPES_COLORS)
    assert tuple(CITYSCAPES_COLORS[0]) == (128, 64, 128) and tuple(CITYSCAPES_COLORS[13]) == (0, 0, 142)
    big = generated_palette(5000)
    np.testing.assert_array_equal(big, generated_palette(5000))
    np.testing.assert_array_equal(big[:19], generated_palette(19))  # a class's colour ignores C
    np.testing.assert_array_equal(big[:3], [[85, 0, 255], [0, 255, 0], [255, 0, 0]])
    keys = big.astype(np.int64) @ [1 << 16, 1 << 8, 1]
    assert len(np.unique(keys)) == 5000
    for n in (19, 150):  # the first classes are far apart, not merely different
        d = np.linalg.norm(big[:n, None].astype(float) - big[None, :n].astype(float), axis=-1)
        assert d[~np.eye(n, dtype=bool)].min() > (50 if n == 19 else 15)
    assert len(np.unique(voc_palette(2000).astype(np.int64) @ [1 << 16, 1 << 8, 1])) == 2000


def test_predict_bad_input_is_one_line_error(tmp_path, ess_run):
    (tmp_path / "broken.png").write_text("not a png")
    (tmp_path / "empty").mkdir()
    cases = [([str(tmp_path / "nope.png")], "nope.png not found"),
             ([str(tmp_path / "broken.png")], "cannot read image"),
             ([str(tmp_path / "empty")], "no images"),
             (["--batch-size", "0", str(tmp_path / "broken.png")], "--batch-size 0")]
    for args, message in cases:
        result = runner.invoke(app, ["predict", "--checkpoint", str(ess_run), "--out", str(tmp_path / "o"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    image = save_images(tmp_path / "images")[0]
    result = runner.invoke(app, ["predict", "--checkpoint", str(tmp_path / "empty"), str(image),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no complete checkpoint" in result.output
    result = runner.invoke(app, ["predict", "--checkpoint", str(ess_run), str(image), "--out", str(image)])
    assert result.exit_code == 2 and result.output.strip() == f"error: --out {image} is a file; name a folder"


def test_predict_keeps_what_came_before_an_unreadable_image_and_skips_its_own_outputs(tmp_path, ess_run):
    folder = tmp_path / "photos"
    save_images(folder)
    (folder / "m_broken.png").write_text("not a png")  # sorted after a.png, before sub/b.jpg
    result = runner.invoke(app, ["predict", "--checkpoint", str(ess_run), str(folder), "--out", str(tmp_path / "o"),
                                 "--batch-size", "4"])
    assert result.exit_code == 2 and "m_broken.png" in result.output
    assert (tmp_path / "o" / "a_labels.png").is_file()  # written before the error, not dropped with the batch
    (folder / "m_broken.png").unlink()
    for _ in range(2):  # --out inside the input folder: the second run does not predict the first's masks
        result = runner.invoke(app, ["predict", "--checkpoint", str(ess_run), str(folder), "--out", str(folder / "masks")])
        assert result.exit_code == 0, result.output
    assert not (folder / "masks" / "masks").exists()
    assert len(json.loads((folder / "masks" / "predictions.json").read_text())["images"]) == 3
