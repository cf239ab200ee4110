"""The CPU estimate (`esskit profile --device meta`) against GPU measurements, row by row.

For every measured row of the given `esskit profile --device cuda` folders, the current estimator
is run at the measured batch (and, for max-batch runs, its own max-batch search) with the run's
budget as the cap. It writes `estimator_check.md` and `.json`: the measured reserved and
allocated peaks, the estimate and its error against each, the estimate stored in the row when it
was measured (an older estimator, for comparison), and estimated vs measured max batch.

    python profiling/estimator_check.py profiling/results/*-cuda --out profiling/results/estimator-check

`--dense-max-classes` replays the Eq. 6 form the measurement ran (`esskit.losses.DENSE_MAX_CLASSES`:
0 for runs made before the dense form existed), so that the estimate and the GPU ran the same code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from esskit import losses
from esskit.config import build_config
from esskit.profile.estimate import Estimator, estimate_training_peak
from esskit.profile.search import max_batch_size
from esskit.profile.step import cell_config


def _error(estimate: float | None, measured: float | None) -> float | None:
    return None if not estimate or not measured else round(100 * (estimate - measured) / measured, 1)


def check_row(row: dict, settings: dict) -> dict:
    crop = tuple(int(x) for x in row["crop"].split("x"))
    method = {key: settings[key] for key in ("k", "knn_chunk_mib", "loss_chunk_mib", "knn_at", "knn_block")}
    base = build_config({"model": {"embed_dim": settings["embed_dim"]}, "method": method})
    cfg = cell_config(base, method=row["method"], num_classes=row["classes"], backbone=row["backbone"],
                      crop=crop, precision=row["precision"])
    budget = int(row["budget_gib"] * 2**30)
    estimate = estimate_training_peak(cfg, row["batch"], cap_bytes=budget)
    out = {key: row[key] for key in ("method", "classes", "precision", "budget_gib", "batch", "max_batch")}
    out.update(measured_reserved_mib=row["peak_mib"], measured_allocated_mib=row["peak_allocated_mib"],
               estimate_mib=round(estimate.peak_mib, 1), estimate_fits=estimate.fits,
               error_vs_reserved=_error(estimate.peak_mib, row["peak_mib"]),
               error_vs_allocated=_error(estimate.peak_allocated_mib, row["peak_allocated_mib"]),
               stored_estimate_mib=row.get("estimated_peak_mib"),
               stored_error_vs_reserved=_error(row.get("estimated_peak_mib"), row["peak_mib"]))
    if row["max_batch"] is not None:  # a max-batch run: the estimator's own search
        estimator = Estimator(budget)
        out["estimated_max_batch"] = max_batch_size(lambda b: estimator.try_batch(cfg, b),
                                                    settings.get("max_batch_limit", 256))[0]
    print(json.dumps(out), flush=True)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| run | method | C | batch | measured reserved / allocated (MiB) | estimate (MiB) | error vs "
             "reserved / allocated | stored estimate, error vs reserved | max batch measured / estimated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        run = f"{r['precision']}, {r['budget_gib']:g} GiB"
        stored = ("-" if r["stored_estimate_mib"] is None
                  else f"{r['stored_estimate_mib']:.0f}, {r['stored_error_vs_reserved']:+.1f} %")
        batches = f"{r['max_batch']} / {r['estimated_max_batch']}" if "estimated_max_batch" in r else "-"
        lines.append(f"| {run} | {r['method']} | {r['classes']} | {r['batch']} | {r['measured_reserved_mib']:.0f} / "
                     f"{r['measured_allocated_mib']:.0f} | {r['estimate_mib']:.0f} | {r['error_vs_reserved']:+.1f} % / "
                     f"{r['error_vs_allocated']:+.1f} % | {stored} | {batches} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="esskit profile --device cuda output folders")
    parser.add_argument("--out", type=Path, default=Path("profiling/results/estimator-check"))
    parser.add_argument("--dense-max-classes", type=int, help="the runs' esskit.losses.DENSE_MAX_CLASSES")
    args = parser.parse_args()
    if args.dense_max_classes is not None:
        losses.DENSE_MAX_CLASSES = args.dense_max_classes
    rows = []
    for folder in args.folders:
        payload = json.loads((folder / "results.json").read_text())
        rows += [check_row(row, payload["settings"]) for row in payload["rows"]
                 if row["source"] == "measured" and row["batch"] and row["peak_mib"]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "estimator_check.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "estimator_check.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
