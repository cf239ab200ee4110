"""How often shared neighbour lists (method.knn_at = "feature", method.knn_block = 2 | 4) change a
pixel's k negatives, on a trained model's validation embeddings, next to the mIoU of runs trained
with each option (run_knn_sharing.sh trains them).

    python profiling/knn_sharing.py --runs runs/knn/label runs/knn/feature runs/knn/block2 runs/knn/block4 \
        --out profiling/results/knn_sharing-synthetic

The fraction is measured with the first run's model (trained with the exact per-pixel kNN): for
each validation pixel (not ignore) it compares the set of k negatives from the exact search with
the set from each shared option. Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from esskit.checkpoint import find_checkpoint, load_weights
from esskit.config import load_config
from esskit.data import IGNORE_INDEX, build_dataset
from esskit.engine import model_from_config
from esskit.losses import negatives_differ, pixels_last, shared_neighbours, upsample

OPTIONS = {"knn_at=feature": ("feature", 1), "knn_block=2": ("label", 2), "knn_block=4": ("label", 4)}


@torch.no_grad()
def differing_fraction(run_dir: Path, max_images: int) -> dict:
    cfg = load_config(run_dir / "config.toml")
    model = model_from_config(cfg).eval()
    load_weights(model, find_checkpoint(run_dir))
    data = build_dataset(cfg.data, cfg.data.val_split, train=False)
    mu = F.normalize(model.head.class_embeddings.float(), dim=1)
    k, counts, total = cfg.method.k, dict.fromkeys(OPTIONS, 0), 0
    for i in range(min(max_images, len(data))):
        image, target = data[i]
        emb = model(image[None])["embeddings"].float()
        up = upsample(emb, target.shape[-2:])
        x, t = pixels_last(up), target.reshape(-1)
        for name, (at, block) in OPTIONS.items():
            shared = shared_neighbours(emb, up, model.head.class_embeddings, k, knn_at=at, knn_block=block)
            counts[name] += int(negatives_differ(x, mu, t, k, shared, rows=2**16).sum())
        total += int((t != IGNORE_INDEX).sum())
    return {name: round(n / total, 4) for name, n in counts.items()} | {"pixels": total, "k": k,
                                                                       "classes": cfg.data.num_classes}


def run_summary(run_dir: Path) -> dict:
    cfg = load_config(run_dir / "config.toml")
    result = json.loads((run_dir / "eval.json").read_text())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [x["s_per_step"] for x in lines if "s_per_step" in x]
    return {"run": str(run_dir), "knn_at": cfg.method.knn_at, "knn_block": cfg.method.knn_block,
            "mIoU": round(result["mIoU"], 4), "pAcc": round(result["pAcc"], 4),
            "s_per_step": round(times[-1], 3) if times else None, "steps": result["step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run dirs; the first: exact kNN")
    parser.add_argument("--images", type=int, default=16, help="validation images for the fraction")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fraction = differing_fraction(args.runs[0], args.images)
    runs = [run_summary(r) for r in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"differing_fraction": fraction, "runs": runs}, indent=1))
    # s/step stays in results.json only: on a shared machine the load differs between runs.
    lines = ["| run | knn_at | knn_block | val mIoU | val pAcc | pixels whose k negatives differ |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        option = ("knn_at=feature" if r["knn_at"] == "feature"
                  else f"knn_block={r['knn_block']}" if r["knn_block"] > 1 else None)
        frac = f"{100 * fraction[option]:.1f} %" if option else "0 (exact)"
        lines.append(f"| {r['run']} | {r['knn_at']} | {r['knn_block']} | {r['mIoU']:.4f} | {r['pAcc']:.4f} | "
                     f"{frac} |")
    (args.out / "results.md").write_text("\n".join(lines) + f"\n\nFraction over {fraction['pixels']} validation "
                                         f"pixels of the exact-kNN run's model, k = {fraction['k']}.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
