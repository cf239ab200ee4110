"""profiling/error_breakdown.py: the boundary band against a brute-force search, and the split of a
trained run's validation pixels (tiny synthetic runs of test_predict.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from esskit.data import IGNORE_INDEX
from test_predict import baseline_run, ess_run, trained_run  # noqa: F401  (session fixtures)

SCRIPT = Path(__file__).resolve().parents[1] / "profiling" / "error_breakdown.py"
spec = importlib.util.spec_from_file_location("error_breakdown", SCRIPT)
error_breakdown = importlib.util.module_from_spec(spec)
spec.loader.exec_module(error_breakdown)


@pytest.mark.parametrize("band", [1, 2])
def test_near_boundary_matches_brute_force(band):
    g = torch.Generator().manual_seed(band)
    target = torch.randint(0, 3, (2, 9, 11), generator=g)
    target[0, :4, :5] = IGNORE_INDEX
    got = error_breakdown.near_boundary(target, band)
    b, h, w = target.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                window = target[i, max(0, y - band):y + band + 1, max(0, x - band):x + band + 1]
                assert bool(got[i, y, x]) == bool((window != target[i, y, x]).any()), (i, y, x)


@pytest.mark.parametrize("method", ["ess", "baseline"])
def test_breakdown_partitions_the_pixels_and_matches_the_trainers_eval(method, request):
    run = request.getfixturevalue(f"{method}_run")
    row = error_breakdown.breakdown(run, band=2)
    assert row["near"]["pixels"] + row["interior"]["pixels"] == row["all"]["pixels"] > 0
    assert 0 < row["stride"]["pixels"] <= 2 * 16 * 16  # 2 labels of 64 px at the decoder's stride 4
    trainer = json.loads((run / "eval.json").read_text())
    assert row["all"]["mIoU"] == round(100 * trainer["mIoU"], 2)
    assert ("all_normalised_first" in row) == (method == "ess")
