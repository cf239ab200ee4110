"""Issue 8's scale check on the CPU: ESS and ess_full train and evaluate on the synthetic dataset at
C = 19, 10,000 and 100,000 through the CLI, with the same model, crop and batch (ResNet18, 64 px,
batch 2, 3 steps, d = 12, one thread). Each run is its own `esskit train` process, so its max RSS
(os.wait4) is that run's alone.

    python profiling/scale_cpu.py                       # about 20 minutes on one CPU core
    python profiling/scale_cpu.py --out profiling/results/scale-cpu-chunk8 \
        --set method.knn_chunk_mib=8 --set method.loss_chunk_mib=8   # block budgets scaled to this batch

Writes, into --out, each run's config.toml and metrics.jsonl (no checkpoints, no eval.json: its
per-class lists run to megabytes at C = 100,000), and results.csv / results.md (loss at the first
and last step, s/step, wall time with evaluation, max RSS, val mIoU). RSS is the whole process
(Python, libraries, allocator caches): a sign that nothing grows with C, not a GPU-memory
measurement; `esskit profile --device meta` is that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from esskit.files import write_atomic, write_csv_atomic

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["model.backbone=resnet18", "model.embed_dim=12", "data.crop=[64,64]", "data.base_size=[64,64]",
            "data.synthetic_image_size=64", "data.synthetic_train_size=8", "data.synthetic_val_size=4",
            "train.batch_size=2", "train.steps=3", "train.log_every=1", "eval.batch_size=4"]
COLUMNS = ("method", "classes", "steps", "loss_first", "loss_last", "s_per_step_last", "wall_s", "max_rss_mib", "mIoU")


def run(method: str, classes: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{method}-c{classes}"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "esskit", "train", str(ROOT / "recipes" / "synthetic.toml"), "--out", str(run_dir)]
    for key in SETTINGS + [f"method.name={method}", f"data.num_classes={classes}"] + extra:
        command += ["--set", key]
    start = time.time()
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed with status {status}")
    wall = time.time() - start
    for checkpoint in run_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    miou = json.loads((run_dir / "eval.json").read_text())["mIoU"]
    (run_dir / "eval.json").unlink()
    losses = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return {"method": method, "classes": classes, "steps": losses[-1]["step"],
            "loss_first": round(losses[0]["loss"], 2), "loss_last": round(losses[-1]["loss"], 2),
            "s_per_step_last": round(losses[-1]["s_per_step"], 2), "wall_s": round(wall),
            "max_rss_mib": round(usage.ru_maxrss / 1024), "mIoU": round(miou, 4)}  # ru_maxrss: KiB on Linux


def table_md(rows: list[dict]) -> str:
    lines = ["| method | C | steps | loss at step 1 → last | s/step (last) | wall s (incl. eval) | max RSS MiB "
             "| val mIoU |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['classes']:,} | {r['steps']} | {r['loss_first']:.2f} → {r['loss_last']:.2f} | "
              f"{r['s_per_step_last']} | {r['wall_s']} | {r['max_rss_mib']} | {r['mIoU']:.4f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="19,10000,100000")
    parser.add_argument("--methods", default="ess,ess_full")
    parser.add_argument("--out", type=Path, default=ROOT / "profiling" / "results" / "scale-cpu")
    parser.add_argument("--set", action="append", default=[], dest="extra", help="extra override for every run")
    args = parser.parse_args()
    rows = []
    for classes in map(int, args.classes.split(",")):
        for method in args.methods.split(","):
            rows.append(run(method, classes, args.out, args.extra))
            print(json.dumps(rows[-1]), flush=True)
            write_csv_atomic(args.out / "results.csv", COLUMNS, rows)
            write_atomic(args.out / "results.md", table_md(rows))


if __name__ == "__main__":
    main()
