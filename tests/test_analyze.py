"""`esskit analyze` and `esskit evaluate --per-class` on tiny trained synthetic checkpoints, checked
against brute-force references computed here from the checkpoint's weights and the dataset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from esskit.cli import app
from esskit.data import IGNORE_INDEX
from esskit.data.synthetic import SyntheticSegmentation
from test_predict import RECIPE, TINY, baseline_run, ess_run, trained_run  # noqa: F401  (session fixtures)

runner = CliRunner()


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def checkpoint_weights(run: Path) -> dict:
    return load_file(sorted(run.glob("checkpoint-*"))[-1] / "model.safetensors")


def class_pixels(split: str, length: int) -> np.ndarray:
    data = SyntheticSegmentation(19, length, 64, split=split)
    counts = np.zeros(19, dtype=np.int64)
    for i in range(length):
        mask = data[i][1].numpy()
        counts += np.bincount(mask[mask != IGNORE_INDEX], minlength=19)
    return counts


def test_analyze_ess_against_brute_force(ess_run, tmp_path):
    out = tmp_path / "analysis"
    result = runner.invoke(app, ["analyze", "--checkpoint", str(ess_run), "--out", str(out), "--kmeans", "5",
                                 "--images", "1"])
    assert result.exit_code == 0, result.output
    for name in ("norm_vs_frequency.png", "dendrogram.png", "pixel_embeddings_pca.png", "pixel_embeddings_rgb.png",
                 "class_stats.csv", "neighbours.csv", "kmeans.csv", "dendrogram.csv", "summary.json"):
        assert (out / name).is_file(), name
    raw = checkpoint_weights(ess_run)["head.class_embeddings"].double()
    unit = raw / raw.norm(dim=1, keepdim=True)
    full = torch.cdist(unit, unit).fill_diagonal_(float("inf")).numpy()  # every pair, self excluded
    neighbours = rows(out / "neighbours.csv")
    assert len(neighbours) == 19 * 5
    for r in neighbours:
        c, rank = int(r["class_id"]), int(r["rank"])
        expected = np.argsort(full[c], kind="stable")[rank - 1]
        assert float(r["distance"]) == pytest.approx(full[c, expected], abs=1e-5)
        assert full[c, int(r["neighbour_id"])] == pytest.approx(full[c, expected], abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["min_interclass_distance"] == pytest.approx(full.min(), abs=1e-5)
    assert summary["classes_within_margin"] == int((full.min(1) < 0.2).sum())
    # The dendrogram covers every class once; k-means partitions them into at most k groups.
    assert sorted(int(r["class_id"]) for r in rows(out / "dendrogram.csv")) == list(range(19))
    groups = rows(out / "kmeans.csv")
    assert len(groups) <= 5 and sum(int(g["size"]) for g in groups) == 19
    assert sorted(int(i) for g in groups for i in g["class_ids"].split()) == list(range(19))
    stats = rows(out / "class_stats.csv")
    np.testing.assert_array_equal([int(r["train_pixels"]) for r in stats], class_pixels("train", 4))
    np.testing.assert_allclose([float(r["norm"]) for r in stats], raw.norm(dim=1).numpy(), atol=1e-5)


def test_analyze_caps_kmeans_at_c(ess_run, tmp_path):
    result = runner.invoke(app, ["analyze", "--checkpoint", str(ess_run), "--out", str(tmp_path), "--images", "0"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kmeans_k"] == 19 and not (tmp_path / "pixel_embeddings_pca.png").exists()


def test_analyze_baseline_says_what_does_not_apply(baseline_run, tmp_path):
    result = runner.invoke(app, ["analyze", "--checkpoint", str(baseline_run), "--out", str(tmp_path),
                                 "--kmeans", "4"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["vectors"] == "classifier weight rows" and summary["dim"] == 256
    assert summary["margin"] is None and any("not applicable" in n for n in summary["notes"])
    assert not (tmp_path / "pixel_embeddings_pca.png").exists()
    w = checkpoint_weights(baseline_run)["head.classifier.weight"][:, :, 0, 0].double()
    unit = w / w.norm(dim=1, keepdim=True)
    full = torch.cdist(unit, unit).fill_diagonal_(float("inf"))
    assert summary["min_interclass_distance"] == pytest.approx(float(full.min()), abs=1e-5)
    assert len(rows(tmp_path / "dendrogram.csv")) == 19


def test_analyze_ess_full_uses_the_class_embeddings(tmp_path_factory, tmp_path):
    run = trained_run(tmp_path_factory, "ess_full", "method.name=ess_full")
    result = runner.invoke(app, ["analyze", "--checkpoint", str(run), "--images", "0"])  # into RUN_DIR/analysis
    assert result.exit_code == 0, result.output
    assert len(rows(run / "analysis" / "neighbours.csv")) == 19 * 5


def test_analyze_without_checkpoint_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["analyze", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no complete checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_evaluate_per_class(ess_run):
    sets = [a for o in TINY for a in ("--set", o)]
    result = runner.invoke(app, ["evaluate", str(RECIPE), "--checkpoint", str(ess_run), "--per-class", *sets])
    assert result.exit_code == 0, result.output
    table = rows(ess_run / "per_class.csv")
    assert len(table) == 19 and (ess_run / "per_class_miou.png").is_file()
    pixels = class_pixels("val", 2)
    assert [int(r["pixels"]) for r in table] == sorted(pixels, reverse=True)
    assert all(int(r["pixels"]) == pixels[int(r["class_id"])] for r in table)
    evaluation = json.loads((ess_run / "eval.json").read_text())
    assert float(table[-1]["mIoU_top_n"]) == pytest.approx(evaluation["mIoU"], abs=1e-6)
    iou = [float(r["IoU"]) if r["IoU"] else np.nan for r in table]
    assert float(table[2]["mIoU_top_n"]) == pytest.approx(np.nanmean(iou[:3]), abs=1e-6)


def test_pixel_distances_against_brute_force():
    from esskit.analyze import pixel_distances

    g = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize(torch.randn(7, 4, generator=g), dim=1)
    emb = torch.nn.functional.normalize(torch.randn(5, 6, 4, generator=g), dim=-1)
    target = torch.randint(0, 7, (5, 6), generator=g)
    target[0, :3] = IGNORE_INDEX
    got = pixel_distances([{"embeddings": emb.numpy(), "target": target.numpy()}], unit)
    valid = target.reshape(-1) != IGNORE_INDEX
    e, t = emb.reshape(-1, 4)[valid], target.reshape(-1)[valid]
    full = torch.cdist(e.double(), unit.double())
    own = full[torch.arange(len(t)), t]
    other = full.scatter(1, t[:, None], float("inf")).min(1).values
    assert got["pixels"] == 27
    assert got["median_distance_to_own_class"] == pytest.approx(float(own.median()), abs=1e-5)
    assert got["median_distance_to_nearest_other_class"] == pytest.approx(float(other.median()), abs=1e-5)


def test_analyze_predicts_as_evaluate_does(ess_run):
    """The prediction and pixel-embedding pictures go through infer with the recipe's eval.scale /
    eval.mode, as evaluate and predict do (they took the raw image before)."""
    from esskit.analyze import pixel_embedding_samples
    from esskit.inference import infer
    from esskit.models import predict_labels
    from esskit.predict import load_run

    run = load_run(ess_run)
    run.cfg.eval.scale = [96, 96]  # the 64 px validation images are scored at 96 px
    seen = []
    run.model.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[-2:])))
    sample = pixel_embedding_samples(run, 1)[0]
    assert seen == [(96, 96)]
    image = torch.from_numpy(sample["image"]).permute(2, 0, 1)
    mean, std = torch.tensor(run.cfg.data.mean)[:, None, None], torch.tensor(run.cfg.data.std)[:, None, None]
    output = infer(run.model, ((image - mean) / std)[None].float(), run.cfg.eval)
    np.testing.assert_array_equal(sample["pred"], predict_labels(output, sample["target"].shape)[0].numpy())


def test_norms_equal_up_to_rounding_have_no_correlation():
    """Unit class embeddings barely trained: float32 rounding is not a norm-frequency trend."""
    from esskit.analyze import norm_frequency_correlation

    pixels = np.array([5, 50, 500, 5000, 50000])
    unit = np.float32(1) + np.array([0, 1, -1, 2, 1], np.float32) * np.finfo(np.float32).eps
    assert norm_frequency_correlation(unit, pixels)["pearson_r_log_freq"] is None
    grown = np.array([0.9, 1.0, 1.1, 1.3, 1.6])  # trained without normalisation: frequent classes longer
    assert norm_frequency_correlation(grown, pixels)["spearman_rho"] == pytest.approx(1.0)
