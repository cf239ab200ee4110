"""profiling/issue8_targets.py: issue 8's target table from a GPU run's folder (the committed H100
run, whose numbers profiling/README.md quotes) and the kernel choices from the sweep and the bench."""

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "profiling"))
from issue8_targets import bench_choice, targets, tile_choice  # noqa: E402

H100 = ROOT / "profiling" / "results" / "h100-2026-11-27" / "call2"


def test_targets_of_the_committed_h100_run():
    rows = {target: (measured, met) for target, measured, met in targets(H100)}
    assert rows["kNN ≤ 5 % of the ESS step (C = 1284, batch 8; exact)"] == ("29.1 %", "no")
    assert rows["ESS ≤ 1.05× baseline (C = 150, batch 8; exact)"] == ("1.18×", "no")  # 0.0652 / 0.0552
    assert rows["ESS ≤ 0.5× baseline (C = 1284, batch 4; exact)"] == ("0.58×", "no")  # 0.0474 / 0.082
    assert rows["ESS ≤ 0.5× baseline (C = 1284, batch 4; knn_at = feature)"] == ("not run", "–")
    assert rows["kNN ≤ 5 % of the ESS step (C = 1284, batch 8; knn_at = feature_exact)"] == ("not run", "–")
    # the longer lists are run for the kNN share alone: no ratio rows that no run could fill
    keys3 = [target for target in rows if "knn_bound_keys = 3" in target]
    assert keys3 == ["kNN ≤ 5 % of the ESS step (C = 1284, batch 8; knn_at = feature_exact, knn_bound_keys = 3)"]


def test_tile_and_bench_choices_rank_against_their_references(tmp_path):
    (tmp_path / "knn_compare-tiles-cuda").mkdir()
    knn = [{"classes": 1284, "exact_ms": 100.0, "triton_ms": 24.0, "triton_32x32x4_ms": 20.0,
            "triton_32x16x1_ms": 10.0}]
    (tmp_path / "knn_compare-tiles-cuda" / "selection.json").write_text(json.dumps({"device": "x", "knn": knn}))
    assert tile_choice(tmp_path) == ["kNN tiles, C = 1284 (knn_exact 100 ms): 32x16x1 10 ms (×0.10), "
                                     "32x32x4 20 ms (×0.20), default 24 ms (×0.24)"]
    (tmp_path / "bench_loss-cuda").mkdir()
    with open(tmp_path / "bench_loss-cuda" / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["variant", "classes", "time_s"])
        writer.writeheader()
        writer.writerows([{"variant": "ess_fused", "classes": 19, "time_s": 0.02},
                          {"variant": "ess_fused_atomic", "classes": 19, "time_s": 0.03},
                          {"variant": "ess_fused_chunked", "classes": 19, "time_s": ""}])  # not run
    assert bench_choice(tmp_path) == ["bench (i.i.d. labels), C = 19: ess_fused 0.02 s; ess_fused_atomic ×1.50",
                                      "bench (block labels): not run"]


def test_a_missing_folder_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "profiling" / "issue8_targets.py"), str(tmp_path / "no")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "unpack the GPU run's results.tgz" in result.stderr


def test_max_batch_target_needs_every_cell_of_the_part(tmp_path):
    folder = tmp_path / "resnet50-512-fp32-12gib-auto-cuda"
    folder.mkdir()
    rows = [{"method": "ess", "classes": c, "max_batch": 17} for c in (19, 1284)]  # a time box stopped it
    (folder / "results.json").write_text(json.dumps({"rows": rows}))
    target = "max batch ≥ 16 at 12 GiB (ESS and ess_full, C = 19 … 100,000)"
    assert {t: (m, met) for t, m, met in targets(tmp_path)}[target] == (
        "ess 19: 17, ess 1284: 17 (incomplete: 2 of 6 cells)", "no")
    rows += [{"method": m, "classes": c, "max_batch": 18} for m in ("ess", "ess_full") for c in (19, 1284, 100000)
             if m == "ess_full" or c == 100000]
    (folder / "results.json").write_text(json.dumps({"rows": rows}))
    assert {t: met for t, _, met in targets(tmp_path)}[target] == "yes"


def test_time_ratios_carry_the_cells_step_spreads(tmp_path):
    """A ratio next to its target means little without the timed steps' own spread (train_spread)."""
    for folder, rows in (("resnet50-512-fp32-b8-fused-baseline-cuda",
                          [{"method": "baseline", "classes": 150, "train_s_per_iter": 0.055, "train_spread": 0.03}]),
                         ("resnet50-512-fp32-b8-fused-cuda",
                          [{"method": "ess", "classes": 150, "train_s_per_iter": 0.0572, "train_spread": 0.08}])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps({"rows": rows}))
    rows = {target: (measured, met) for target, measured, met in targets(tmp_path)}
    assert rows["ESS ≤ 1.05× baseline (C = 150, batch 8; exact)"] == ("1.04× (step spreads 8 / 3 %)", "yes")
