"""The chunked exact kNN (`esskit.knn.knn_exact`) against its own code at an earlier commit, side
by side in one process: same inputs, interleaved repeats, fastest of each, and the results compared.

    python profiling/knn_blocks_ab.py --before 0b3680e --out profiling/results/knn-blocks-ab

The earlier `esskit/knn.py` is read with `git show`, so any commit of this repository can be the
reference. Cases: Eq. 7's search (C queries against C keys, k = 2), prediction's nearest class
(k = 1), and Eq. 6's per-pixel search (k + 1 = 9) at the CPU scale run's 8,192 pixels.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from esskit import knn as current
from esskit.profile.measure import cpu_name

CASES = [  # (queries, keys, k): None queries = the keys themselves (Eq. 7)
    (None, 30000, 2), (None, 30000, 1), (8192, 100000, 9), (8192, 10000, 9), (8192, 1284, 9), (8192, 150, 9),
]


def module_at(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:esskit/knn.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parent).stdout
    path = Path(tempfile.mkdtemp()) / "knn_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("knn_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["knn_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="commit holding the reference esskit/knn.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    before = module_at(args.before)
    rows = []
    for queries, num_keys, k in CASES:
        keys = F.normalize(torch.randn(num_keys, 12, generator=torch.Generator().manual_seed(0)), dim=1)
        q = keys if queries is None else F.normalize(torch.randn(queries, 12), dim=1)
        for mib in (8, 64):
            run_before = lambda: before.knn_exact(q, keys, k, mib * 2**20)  # noqa: E731
            run_now = lambda: current.knn_exact(q, keys, k, mib * 2**20)  # noqa: E731
            t_before = t_now = float("inf")
            for _ in range(args.repeats):  # interleaved, so both meet the same machine load
                t_before, t_now = min(t_before, seconds(run_before)), min(t_now, seconds(run_now))
            (d0, i0), (d1, i1) = run_before(), run_now()
            rows.append(dict(queries=q.shape[0], keys=num_keys, k=k, chunk_mib=mib, before_s=round(t_before, 4),
                             now_s=round(t_now, 4), speedup=round(t_before / t_now, 2),
                             same_indices=float((i0 == i1).float().mean()),
                             max_dist_diff=float((d0 - d1).abs().max())))
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(before=args.before, threads=args.threads, cpu=cpu_name(),
                                                           torch=torch.__version__, rows=rows), indent=1))
    lines = [f"`knn_exact` at {args.before} (before) and now, {cpu_name()}, {args.threads} thread(s), "
             f"torch {torch.__version__}, fastest of {args.repeats} interleaved repeats\n",
             "| queries | keys | k | block MiB | before s | now s | speed-up | same indices | max dist diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['queries']} | {r['keys']} | {r['k']} | {r['chunk_mib']} | {r['before_s']} | {r['now_s']} | "
              f"×{r['speedup']} | {r['same_indices']:.6f} | {r['max_dist_diff']:.1e} |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
