"""`method.knn_at = "feature_exact"` against the search per label pixel: time, how many label pixels
the bound leaves to the full search, and agreement, on the embeddings the loss sees (train mode).

Sources: (a) the profiler's cell (random-init model, noise images: what `esskit profile` times),
(b) trained runs, on training images, and their prediction (the nearest class, eval mode, on
validation images: `esskit evaluate` with the same key). For each multiple of k+1 kept per decoder pixel, one thread,
the faster of 2 repeats, the search per label pixel (`knn_exact`) timed in the same process.

    esskit train recipes/synthetic.toml --out runs/bounded-1284 --set data.num_classes=1284 \
        --set model.embed_dim=12 --set method.k=8 --set train.steps=150     # ~4 min on 2 CPU cores
    python profiling/knn_bounded.py --runs runs/bounded-1284 --out profiling/results/knn_bounded-cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from esskit.config import PROFILE_INPUTS
from esskit.data import build_dataset
from esskit.knn import bounded_neighbours, drop_target, knn_exact
from esskit.losses import pixels_last, upsample
from esskit.predict import load_run
from esskit.profile.measure import cpu_name
from knn_verify_study import profiler_cell  # profiling/, this script's folder


TIE = 1e-5  # float64 distance gaps below this are fp32 near-ties (as tests/test_knn.py separates them)


class CountingKnn:
    """knn_exact, counting the queries of every call after the first (the label pixels' full searches)."""

    def __init__(self):
        self.calls = []

    def __call__(self, queries, keys, k):
        self.calls.append(len(queries))
        return knn_exact(queries, keys, k)


def _best_of(repeats: int, fn):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


@torch.no_grad()
def compare(emb: torch.Tensor, class_emb: torch.Tensor, size, kk: int, multiples: list[int],
            target: torch.Tensor | None = None) -> dict:
    """emb [B, d, h, w] decoder output; kk = k+1 nearest classes per label pixel. With `target`
    [pixels] (the loss's rows) also Eq. 6's negatives: the k nearest other than the target, whose
    lookup leaves the target out of each union before the proof."""
    mu = F.normalize(class_emb.float(), dim=1)
    x = pixels_last(upsample(emb.float(), size))
    exact_s, (_, exact) = _best_of(2, lambda: knn_exact(F.normalize(x, dim=1), mu, kk))
    row = {"pixels": len(x), "exact_s": round(exact_s, 4)}
    for multiple in multiples:
        row[f"m{multiple}"] = _bounded(emb, size, mu, kk, x, exact, exact_s, multiple)
        if target is not None:
            row[f"m{multiple}"]["negatives"] = _negatives(emb, size, mu, kk, x, exact, exact_s, multiple, target)
    return row


def _negatives(emb, size, mu, kk, x, exact, exact_s, multiple, target) -> dict:
    counting = CountingKnn()

    def negatives():
        counting.calls.clear()
        return bounded_neighbours(emb, size, mu, kk, counting, per_k=multiple).lookup(0, len(x), x, target)

    seconds, found = _best_of(2, negatives)
    differ = (found.sort(1).values != drop_target(exact, target, kk - 1).sort(1).values).any(1).nonzero()[:, 0]
    # in float64, without the target: is the k-th nearest separated from the (k+1)-th?
    dist = torch.cdist(F.normalize(x[differ].double(), dim=1), mu.double()).pow(2)
    dist[torch.arange(len(differ)), target[differ]] = float("inf")
    dist = dist.sort(1).values
    return {"seconds": round(seconds, 4), "speedup": round(exact_s / seconds, 2),
            "full_search_share": round(sum(counting.calls[1:]) / len(x), 4), "differ_from_knn_exact": len(differ),
            "differ_and_separated": int((dist[:, kk - 1] - dist[:, kk - 2] > TIE).sum())}


def _bounded(emb, size, mu, kk, x, exact, exact_s, multiple) -> dict:
    counting = CountingKnn()

    def bounded():
        counting.calls.clear()
        shared = bounded_neighbours(emb, size, mu, kk, counting, per_k=multiple)
        return shared, shared.lookup(0, len(x), x)

    seconds, (shared, found) = _best_of(2, bounded)
    differ = (found.sort(1).values != exact.sort(1).values).any(1).nonzero()[:, 0]
    # in float64, is the (k+1)-th nearest of a differing pixel separated from the next? Else fp32 can't order them
    dist = torch.cdist(F.normalize(x[differ].double(), dim=1), mu.double()).pow(2).sort(1).values
    separated = int((dist[:, kk] - dist[:, kk - 1] > TIE).sum())
    return {"m": multiple * kk, "union_slots": shared.ids.shape[1], "seconds": round(seconds, 4),
            "speedup": round(exact_s / seconds, 2), "full_search_share": round(sum(counting.calls[1:]) / len(x), 4),
            "differ_from_knn_exact": len(differ), "differ_and_separated": separated}


def init_cell(classes: int, crop: int, backbone: str, kk: int, multiples: list[int],
              inputs: str = "noise") -> dict:
    out, target = profiler_cell(classes, crop, backbone, kk, inputs)
    image = "noise image" if inputs == "noise" else "synthetic dataset image"
    return {"source": f"esskit profile's cell: {backbone} random init, {image} {crop}², C = {classes}, d = 12",
            "k+1": kk, **compare(out["embeddings"], out["class_embeddings"], target.shape[-2:], kk, multiples,
                                 target.reshape(-1).clamp_min(0))}


def trained_run(run_dir: Path, images: int, multiples: list[int]) -> list[dict]:
    """Two rows: the loss's search (k+1 nearest, train mode, training images) and prediction's
    (the nearest class, eval mode, validation images, as `esskit evaluate` runs it)."""
    run = load_run(run_dir)
    cfg, rows = run.cfg, []
    for split, train, kk in ((cfg.data.train_split, True, cfg.method.k + 1), (cfg.data.val_split, False, 1)):
        data = build_dataset(cfg.data, split, train=False)
        samples = [data[i] for i in range(min(images, len(data)))]
        batch = torch.stack([image for image, _ in samples])
        target = torch.stack([label for _, label in samples]).reshape(-1).clamp_min(0) if train else None
        with torch.no_grad():
            out = run.model.train(train)(batch)  # train: batch statistics, as the loss sees the embeddings
        what = "the loss's search" if train else "prediction (eval mode)"
        rows.append({"source": f"{run_dir}, {what}: {cfg.model.backbone} trained {run.checkpoint.name}, "
                               f"{len(batch)} {split} images {batch.shape[-1]}², C = {cfg.data.num_classes}, "
                               f"d = {cfg.model.embed_dim}",
                     "k+1": kk, **compare(out["embeddings"], out["class_embeddings"], batch.shape[-2:], kk, multiples,
                                          target)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="150,1284", help="C of the profiler's random-init cells ('' skips them)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--inputs", choices=PROFILE_INPUTS, default="noise",
                        help="the random-init cells' image (esskit profile --inputs)")
    parser.add_argument("--runs", type=Path, nargs="*", default=[])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--multiples", default="2,3,4", help="keys kept per decoder pixel, in units of k+1")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    multiples = [int(v) for v in args.multiples.split(",")]
    rows = []
    for c in filter(None, args.init.split(",")):
        torch.manual_seed(0)  # each cell's weights (and noise image) the same draw whatever --inputs and --init
        rows.append(init_cell(int(c), args.crop, args.backbone, 9, multiples, args.inputs))
    rows += [row for run in args.runs for row in trained_run(run, args.images, multiples)]
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"device": f"{cpu_name()}, 1 torch thread", "torch": torch.__version__}
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    lines = ["| source | k+1 | knn_exact s | " + " | ".join(f"m = {m}(k+1): s (×), full search, union slots; "
                                                        "Eq. 6's negatives: s (×), full search"
                                                        for m in multiples) + " |",
             "|---|---|---|" + "---|" * len(multiples)]
    for r in rows:
        cells = [f"{c['seconds']} (×{c['speedup']}), {100 * c['full_search_share']:.1f} %, {c['union_slots']}"
                 + (f"; {n['seconds']} (×{n['speedup']}), {100 * n['full_search_share']:.1f} %"
                    if (n := c.get("negatives")) else "")
                 for c in (r[f"m{m}"] for m in multiples)]
        lines.append(f"| {r['source']} | {r['k+1']} | {r['exact_s']} | " + " | ".join(cells) + " |")
    differ = sum(r[f"m{m}"]["differ_from_knn_exact"] for r in rows for m in multiples)
    separated = sum(r[f"m{m}"]["differ_and_separated"] for r in rows for m in multiples)
    negatives = [r[f"m{m}"]["negatives"] for r in rows for m in multiples if "negatives" in r[f"m{m}"]]
    lines.append(f"\nLabel pixels whose k+1 nearest differ from knn_exact's: {differ} in all; {separated} of them "
                 f"with the (k+1)-th and (k+2)-th float64 distances more than {TIE} apart "
                 f"(the rest are fp32 near-ties). Whose negatives differ from drop_target of knn_exact's: "
                 f"{sum(n['differ_from_knn_exact'] for n in negatives)}; "
                 f"{sum(n['differ_and_separated'] for n in negatives)} of them separated so.")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
