"""profiling/bench_loss.py end to end at a toy size: every (variant, C) gets a row, the ratios are
taken against ESS at the same C, and the files exist (the GPU script runs this unattended)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

from esskit.lean_loss import has_builtin_linear_cross_entropy

SCRIPT = Path(__file__).resolve().parents[1] / "profiling" / "bench_loss.py"


def test_bench_loss_writes_one_row_per_variant_and_class_count(tmp_path):
    out = tmp_path / "bench"
    subprocess.run([sys.executable, str(SCRIPT), "--classes", "19,40", "--variants", "baseline,ess,ess_block2,ess_full",
                    "--batch", "1", "--size", "16", "--reps", "1", "--threads", "1", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    with open(out / "results.csv") as f:
        rows = {(r["variant"], int(r["classes"])): r for r in csv.DictReader(f)}
    assert set(rows) == {(v, c) for v in ("baseline", "ess", "ess_block2", "ess_full") for c in (19, 40)}
    for c in (19, 40):
        assert float(rows["ess", c]["ratio_to_ess"]) == 1.0 and float(rows["ess", c]["knn_share"]) > 0
        assert float(rows["baseline", c]["knn_share"]) == 0
        if has_builtin_linear_cross_entropy():
            assert float(rows["ess_full", c]["knn_share"]) == 0 and float(rows["ess_full", c]["time_s"]) > 0
        else:  # an older torch (the GPU image has 2.11): a note, not a crash
            assert rows["ess_full", c]["note"].startswith("not run: torch") and rows["ess_full", c]["time_s"] == ""
        assert 0 <= float(rows["ess_block2", c]["neg_diff_frac"]) <= 1  # shared neighbours are inexact
    assert {p.name for p in out.iterdir()} == {"results.csv", "results.json", "results.md", "bench_loss.png"}


def test_bench_loss_runs_the_fused_variants_with_block_labels(tmp_path):
    # Triton's interpreter stands in for the GPU: the variants that only a GPU times here run end to end
    out = tmp_path / "bench"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    variants = ("ess", "ess_fused", "ess_fused_chunked", "ess_fused_atomic", "ess_fused_r16", "ess_fused_b16",
                "ess_full_fused")
    subprocess.run([sys.executable, str(SCRIPT), "--classes", "19", "--variants", ",".join(variants), "--labels", "blocks",
                    "--batch", "1", "--size", "16", "--reps", "1", "--threads", "1", "--out", str(out)],
                   check=True, capture_output=True, timeout=300, env=env)
    with open(out / "results.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(variants) and all(float(r["time_s"]) > 0 for r in rows.values()), rows


def test_bench_loss_refuses_an_unknown_variant_before_running(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--variants", "ess,ess_fusd", "--out", str(tmp_path / "b")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--variants: unknown ess_fusd; known: baseline" in result.stderr
    assert not (tmp_path / "b").exists()


def test_bench_loss_keeps_each_finished_cell_when_stopped(tmp_path, monkeypatch):
    """A GPU lease's time box may stop the bench mid-C: the cells finished before it are on disk."""
    import pytest
    import torch

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_loss

    real, done = bench_loss.bench_cell, []

    def cell(name, classes, args):
        if done:
            raise KeyboardInterrupt  # the time box, during the second cell
        done.append(name)
        return real(name, classes, args)

    out = tmp_path / "bench"
    monkeypatch.setattr(bench_loss, "bench_cell", cell)
    monkeypatch.setattr(sys, "argv", ["bench_loss.py", "--classes", "19", "--variants", "baseline,ess", "--batch", "1",
                                      "--size", "16", "--reps", "1", "--threads", str(torch.get_num_threads()),
                                      "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        bench_loss.main()
    with open(out / "results.csv") as f:
        assert [r["variant"] for r in csv.DictReader(f)] == ["baseline"]


def test_a_gpus_first_call_is_never_a_timed_repetition(monkeypatch):
    """On a GPU the first call compiles (Triton: seconds): it was kept as a repetition when slow, and the
    next, warm call dropped as the warm-up in its place."""
    import time

    import torch

    from esskit.config import MethodConfig

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_loss

    calls = []

    def loss(emb, class_emb, target, cfg, knn):
        calls.append(torch.is_grad_enabled())
        time.sleep(2.2 if len(calls) == 1 else 0.01)  # the first: a compile
        return emb.sum()

    monkeypatch.setattr(bench_loss, "_sync", lambda device: lambda: None)  # as on a GPU
    inputs = (torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long))
    times, _ = bench_loss.time_step(loss, MethodConfig(), inputs, reps=2, budget_s=60)
    assert len(times) == 2 and max(times) < 1.0
