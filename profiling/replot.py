"""Rewrite figure1.png, table6.md and table7.md of result folders from their results.json (after
editing a report layout, without profiling again): python profiling/replot.py profiling/results/*/"""

import json
import sys
from pathlib import Path

from esskit.profile.report import write_results

for folder in map(Path, sys.argv[1:]):
    payload = json.loads((folder / "results.json").read_text())
    for row in payload["rows"]:  # results written before `--batch` existed: taken at the max batch
        row.setdefault("batch", row["max_batch"])
    write_results(payload["rows"], payload["settings"], folder)
    print(f"rewrote {folder}")
