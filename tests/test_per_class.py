"""esskit.per_class: the per-class table and CSV of `esskit evaluate --per-class`, from a result dict."""

import csv
import math

import esskit.files
import esskit.per_class
from esskit.per_class import write_per_class


def test_per_class_csv_is_written_atomically(tmp_path, monkeypatch):
    atomic = []  # per_class.csv is replaced whole, never left half-written
    monkeypatch.setattr(esskit.per_class, "write_atomic",
                        lambda path, text: (atomic.append(path), esskit.files.write_atomic(path, text)))
    result = {"class_pixels": [10, 30, 0], "IoU": [0.5, 0.25, None]}
    rows = write_per_class(result, ["a", "b", "c"], tmp_path, "test")
    assert atomic == [tmp_path / "per_class.csv"]
    assert [r["name"] for r in rows] == ["b", "a", "c"]
    with open(tmp_path / "per_class.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["name"], r["IoU"], r["mIoU_top_n"]) for r in table] == [
        ("b", "0.250000", "0.250000"), ("a", "0.500000", "0.375000"), ("c", "", "0.375000")]
    assert math.isclose(float(table[0]["frequency"]), 0.75)
    assert (tmp_path / "per_class_miou.png").is_file()
