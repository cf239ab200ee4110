"""`esskit evaluate --per-class`: per-class IoU sorted by class frequency, and mIoU as the classes are
added from the most to the least frequent (paper Figure 6: with a long tail, the rare classes pull
the mean down)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.table import Table

from esskit.analyze_plots import plain_log_labels
from esskit.files import write_atomic
from esskit.report import console

TABLE_HEAD, TABLE_TAIL = 20, 10  # rows printed for many classes (the CSV has them all)


def per_class_rows(result: dict, names: list[str]) -> list[dict]:
    """One row per class, most frequent first (frequency = the class's share of the evaluated target
    pixels; ties keep class-id order)."""
    counts, iou = result["class_pixels"], result["IoU"]
    total = max(1, sum(counts))
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    return [{"rank": rank + 1, "class_id": c, "name": names[c], "pixels": counts[c],
             "frequency": counts[c] / total, "IoU": _nan(iou[c])} for rank, c in enumerate(order)]


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def miou_of_top_classes(rows: list[dict]) -> np.ndarray:
    """mIoU over the n most frequent classes for n = 1..C; NaN IoUs (class neither in the target nor
    predicted) are skipped as in SegMetrics, so the last value is the reported mIoU."""
    iou = np.array([r["IoU"] for r in rows], dtype=np.float64)
    seen = np.cumsum(~np.isnan(iou))
    total = np.cumsum(np.nan_to_num(iou, nan=0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(seen > 0, total / np.maximum(seen, 1), np.nan)


def write_per_class(result: dict, names: list[str], out_dir: Path, title: str) -> list[dict]:
    """per_class.csv and per_class_miou.png in `out_dir`, and the table on the console."""
    rows = per_class_rows(result, names)
    curve = miou_of_top_classes(rows)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, ["rank", "class_id", "name", "pixels", "frequency", "IoU", "mIoU_top_n"])
    writer.writeheader()
    for row, m in zip(rows, curve):
        writer.writerow({**row, "frequency": f"{row['frequency']:.6g}", "IoU": _fmt(row["IoU"]),
                         "mIoU_top_n": _fmt(m)})
    write_atomic(out_dir / "per_class.csv", text.getvalue())
    plot_per_class(rows, curve, out_dir / "per_class_miou.png", title)
    print_table(rows, title, out_dir)
    return rows


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def print_table(rows: list[dict], title: str, out_dir: Path) -> None:
    table = Table(title=f"per-class IoU · {title}")
    for name, justify in (("#", "right"), ("id", "right"), ("class", "left"), ("pixels", "right"),
                          ("freq %", "right"), ("IoU", "right")):
        table.add_column(name, justify=justify)
    many = len(rows) > TABLE_HEAD + TABLE_TAIL
    shown = rows[:TABLE_HEAD] + rows[-TABLE_TAIL:] if many else rows
    for i, r in enumerate(shown):
        if many and i == TABLE_HEAD:
            table.add_row("…", "", f"{len(rows) - len(shown)} classes in per_class.csv", "", "", "")
        iou = "–" if math.isnan(r["IoU"]) else f"{100 * r['IoU']:.2f}"
        table.add_row(str(r["rank"]), str(r["class_id"]), r["name"], f"{r['pixels']:,}",
                      f"{100 * r['frequency']:.2f}", iou)
    console.print(table)
    console.print(f"per-class IoU: {out_dir / 'per_class.csv'}, {out_dir / 'per_class_miou.png'}")


def plot_per_class(rows: list[dict], curve: np.ndarray, path: Path, title: str) -> None:
    """Left: mIoU of the n most frequent classes (Figure 6). Right: each class's IoU against its
    pixel frequency, which shows where the drop comes from."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    n = np.arange(1, len(rows) + 1)
    left.plot(n, 100 * curve, color="tab:blue")
    left.set(xlabel="number of classes kept (most frequent first)", ylabel="mIoU (%)",
             title="mIoU vs. classes kept (Fig. 6)")
    if len(rows) > 50:
        left.set_xscale("log")
    else:
        left.xaxis.set_major_locator(MaxNLocator(integer=True))  # a count of classes: no 2.5 ticks
    left.grid(alpha=0.3)
    freq = np.array([r["frequency"] for r in rows])
    iou = np.array([r["IoU"] for r in rows])
    seen = (freq > 0) & ~np.isnan(iou)
    right.scatter(100 * freq[seen], 100 * iou[seen], s=12 if len(rows) <= 500 else 3, alpha=0.7)
    right.set_xscale("log")
    plain_log_labels(right.xaxis, freq[seen])
    right.set(xlabel="class pixel frequency (%, log)", ylabel="IoU (%)", title="per-class IoU vs. frequency")
    right.grid(alpha=0.3)
    absent = int((freq == 0).sum())
    if absent:
        right.text(0.02, 0.98, f"{absent} classes absent from the targets (not shown)",
                   transform=right.transAxes, va="top", fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
