"""Issue 8's GPU targets and the kernel choices they wait on, read from one GPU run's results folder
(what `PARTS="smoke fused steps maxb bench" profiling/gpu_lease.sh` leaves; run_cuda.sh names the
folders), as markdown. Every ratio is taken inside that run; a cell it did not reach reads "not run".

    python profiling/issue8_targets.py RESULTS_DIR [--out RESULTS_DIR/issue8.md]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

R = "resnet50-512-fp32"
# the fused kernels' variants in bench_loss.py, each against ess_fused (the defaults)
BENCH_VARIANTS = ("ess_fused_chunked", "ess_fused_atomic", "ess_fused_r16", "ess_fused_b32", "ess_fused_b16")


def profile_rows(folder: Path) -> dict[tuple[str, int], dict]:
    """(method, C) -> the row of an `esskit profile` results.json, {} when the folder is missing."""
    path = folder / "results.json"
    if not path.is_file():
        return {}
    return {(r["method"], r["classes"]): r for r in json.loads(path.read_text())["rows"]}


def _value(rows: dict, method: str, classes: int, key: str) -> float | None:
    value = rows.get((method, classes), {}).get(key)
    return None if value is None else float(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


# the kNN options of run_cuda.sh's fused part: name -> the folder's suffix. "synthetic inputs": timed
# on the synthetic dataset's images and labels (esskit profile --inputs synthetic), where the other
# rows see noise; the baseline's time does not depend on the inputs (its ratio rows use the noise run)
SEARCHES = {"exact": "", "knn_at = feature_exact": "-knn_at-feature_exact", "knn_at = feature": "-knn_at-feature",
            "exact, synthetic inputs": "-synthetic",
            "knn_at = feature_exact, synthetic inputs": "-knn_at-feature_exact-synthetic"}
# run for the kNN share only (batch 8, C = 1284)
SHARE_ONLY = {"knn_at = feature_exact, knn_bound_keys = 3": "-knn_at-feature_exact-keys3"}
MAXB_METHODS, MAXB_CLASSES = ("ess", "ess_full"), (19, 1284, 100000)  # run_cuda.sh's maxb part


def _spreads(*cells: tuple[dict, str, int]) -> str:
    """" (step spreads a / b %)" of the cells a ratio divides, where their rows record train_spread."""
    spreads = [_value(rows, method, classes, "train_spread") for rows, method, classes in cells]
    if any(v is None for v in spreads):
        return ""
    return f" (step spreads {' / '.join(f'{100 * v:.0f}' for v in spreads)} %)"


def _row(target: str, value: float | None, text: str, met: bool | None) -> tuple[str, str, str]:
    if value is None:
        return target, "not run", "–"
    return target, text, "yes" if met else "no"


def targets(results: Path) -> list[tuple[str, str, str]]:
    """(target, measured, met) for each of issue 8's GPU targets: the search per label pixel ("exact"),
    at the decoder's stride made exact by the bound (knn_at = feature_exact) and shared (knn_at = feature)."""
    b8_base = profile_rows(results / f"{R}-b8-fused-baseline-cuda")
    b8, b4 = ({name: profile_rows(results / f"{R}-{batch}-fused{suffix}-cuda") for name, suffix in SEARCHES.items()}
              for batch in ("b8", "b4"))
    maxb = profile_rows(results / f"{R}-12gib-auto-cuda")
    out = []
    shares = {**b8, **{name: profile_rows(results / f"{R}-b8-fused{suffix}-cuda")
                       for name, suffix in SHARE_ONLY.items()}}
    for name, rows in shares.items():
        share = _value(rows, "ess", 1284, "knn_share")
        out.append(_row(f"kNN ≤ 5 % of the ESS step (C = 1284, batch 8; {name})", share,
                        f"{100 * share:.1f} %" if share is not None else "", share is not None and share <= 0.05))
    for name, rows in b8.items():
        r = _ratio(_value(rows, "ess", 150, "train_s_per_iter"), _value(b8_base, "baseline", 150, "train_s_per_iter"))
        spread = _spreads((rows, "ess", 150), (b8_base, "baseline", 150))
        out.append(_row(f"ESS ≤ 1.05× baseline (C = 150, batch 8; {name})", r, f"{r:.2f}×{spread}" if r else "",
                        r is not None and r <= 1.05))
    for name, rows in b4.items():
        base = _value(b4["exact"], "baseline", 1284, "train_s_per_iter")
        r = _ratio(_value(rows, "ess", 1284, "train_s_per_iter"), base)
        spread = _spreads((rows, "ess", 1284), (b4["exact"], "baseline", 1284))
        out.append(_row(f"ESS ≤ 0.5× baseline (C = 1284, batch 4; {name})", r, f"{r:.2f}×{spread}" if r else "",
                        r is not None and r <= 0.5))
    exact = b8["exact"]
    time = _ratio(_value(exact, "ess_full", 1284, "train_s_per_iter"), _value(exact, "ess", 1284, "train_s_per_iter"))
    peak = _ratio(_value(exact, "ess_full", 1284, "peak_mib"), _value(exact, "ess", 1284, "peak_mib"))
    out.append(_row("ess_full ≤ 1.2× ESS step, memory within 5 % (C = 1284, batch 8)", time,
                    f"{time:.2f}×, memory {100 * (peak - 1):+.1f} %" if time and peak else "",
                    time is not None and peak is not None and time <= 1.2 and abs(peak - 1) <= 0.05))
    batches = {f"{m} {c}": r.get("max_batch") for (m, c), r in sorted(maxb.items())}
    low = min((b for b in batches.values() if b is not None), default=None)
    # met only over every cell of the part (a time box may stop it before ess_full at C = 100,000)
    cells = len(MAXB_METHODS) * len(MAXB_CLASSES)
    missing = "" if len(batches) == cells else f" (incomplete: {len(batches)} of {cells} cells)"
    out.append(_row("max batch ≥ 16 at 12 GiB (ESS and ess_full, C = 19 … 100,000)", low,
                    ", ".join(f"{k}: {v}" for k, v in batches.items()) + missing,
                    low is not None and low >= 16 and not missing))
    return out


def tile_choice(results: Path) -> list[str]:
    """Per C: knn_triton's tile variants from fastest, as a ratio to knn_exact's time."""
    path = results / "knn_compare-tiles-cuda" / "selection.json"
    if not path.is_file():
        return ["kNN tiles: not run"]
    lines = []
    for row in json.loads(path.read_text())["knn"]:
        tiles = sorted((v, k[len("triton_"):-len("_ms")] or "default") for k, v in row.items()
                       if k.startswith("triton_") and k.endswith("_ms"))  # triton_ms: the default tile
        ranked = ", ".join(f"{tile} {ms:g} ms (×{ms / row['exact_ms']:.2f})" for ms, tile in tiles)
        lines.append(f"kNN tiles, C = {row['classes']} (knn_exact {row['exact_ms']:g} ms): {ranked}")
    return lines


def bench_choice(results: Path) -> list[str]:
    """Per label kind and C: each fused variant's loss-step time as a ratio to ess_fused's."""
    lines = []
    for folder, labels in (("bench_loss-cuda", "i.i.d. labels"), ("bench_loss-blocks-cuda", "block labels")):
        path = results / folder / "results.csv"
        if not path.is_file():
            lines.append(f"bench ({labels}): not run")
            continue
        with open(path) as f:
            times = {(r["variant"], r["classes"]): r["time_s"] for r in csv.DictReader(f) if r["time_s"]}
        for c in sorted({int(c) for _, c in times}):
            base = times.get(("ess_fused", str(c)))
            if not base:
                continue
            cells = [f"{v} ×{float(times[v, str(c)]) / float(base):.2f}" for v in BENCH_VARIANTS
                     if (v, str(c)) in times]
            lines.append(f"bench ({labels}), C = {c}: ess_fused {float(base):g} s; " + ", ".join(cells))
    return lines


def report(results: Path) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {ok} |" for t, m, ok in targets(results)]
    return "\n".join(lines + [""] + [f"- {line}" for line in tile_choice(results) + bench_choice(results)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the folder run_cuda.sh wrote (gpu_lease.sh's results.tgz, "
                        "unpacked)")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args()
    if not args.results.is_dir():
        raise SystemExit(f"{args.results}: no such folder; unpack the GPU run's results.tgz there first")
    text = report(args.results)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
