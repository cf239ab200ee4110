"""Rewrite figure1.png, table6.md and table7.md of result folders from their results.json (after
editing a report layout, without profiling again): python profiling/replot.py profiling/results/*/
Folders that `esskit profile` did not write are skipped with a note."""

import json
import sys
from pathlib import Path

from esskit.files import write_atomic
from esskit.profile.report import write_results

for folder in map(Path, sys.argv[1:]):
    path = folder / "results.json"
    payload = json.loads(path.read_text()) if path.is_file() else {}
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if not rows or not all(isinstance(row, dict) and "max_batch" in row for row in rows):
        print(f"skipped {folder}: not an `esskit profile` results folder")
        continue
    for row in rows:  # results written before `--batch` existed: taken at the max batch
        row.setdefault("batch", row["max_batch"])
    # Measured rows from before estimated_peak_allocated_mib: their table6.md's "error vs allocated"
    # was computed from an estimate the rows no longer say apart; keep that table as written.
    table6 = folder / "table6.md"
    old = any(r.get("source") == "measured" and "estimated_peak_allocated_mib" not in r for r in rows)
    kept = table6.read_text() if old and table6.is_file() else None
    write_results(rows, payload["settings"], folder)
    if kept is not None:
        write_atomic(table6, kept)
    print(f"rewrote {folder}" + (" (table6.md kept: its rows predate estimated_peak_allocated_mib)" if kept else ""))
