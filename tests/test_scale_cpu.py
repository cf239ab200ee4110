"""profiling/scale_cpu.py at C = 19: one CLI training per row, its files and the table's columns."""

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "profiling" / "scale_cpu.py"


def test_scale_cpu_trains_through_the_cli_and_keeps_the_run_files(tmp_path):
    out = tmp_path / "scale"
    subprocess.run([sys.executable, str(SCRIPT), "--classes", "19", "--methods", "ess", "--out", str(out),
                    "--set", "train.steps=2"], check=True, capture_output=True, timeout=300)
    with open(out / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["method"] == "ess" and row["classes"] == "19" and row["steps"] == "2"
    assert int(row["max_rss_mib"]) > 100 and 0 <= float(row["mIoU"]) <= 1
    assert sorted(p.name for p in (out / "ess-c19").iterdir()) == ["config.toml", "metrics.jsonl"]
    assert "| ess | 19 | 2 |" in (out / "results.md").read_text()
