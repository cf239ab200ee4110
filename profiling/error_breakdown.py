"""Where a trained run's errors are: near label boundaries or inside regions, at the decoder's
stride or after upsampling, and (ESS) whether normalising the embeddings before the bilinear
upsampling instead of after it changes the prediction.

    python profiling/error_breakdown.py RUN_DIR [RUN_DIR ...] [--band 2] [--out FILE.json]

A pixel is "near" a boundary when a different label lies within `--band` pixels (a square
window), "interior" otherwise. The stride rows compare the prediction at the output's own
resolution with the nearest-downsampled labels. Runs are evaluated on their validation split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from esskit.data import IGNORE_INDEX, build_dataset
from esskit.metrics import SegMetrics
from esskit.models.heads import predict_labels
from esskit.predict import load_run


def near_boundary(target: torch.Tensor, band: int) -> torch.Tensor:
    """[B, H, W] bool: a different label (ignore included) within `band` pixels."""
    t = target.float().unsqueeze(1)
    high = F.max_pool2d(t, 2 * band + 1, 1, band)
    low = -F.max_pool2d(-t, 2 * band + 1, 1, band)
    return (high != low).squeeze(1)


def masked(target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, target, torch.full_like(target, IGNORE_INDEX))


@torch.no_grad()
def breakdown(run_dir: Path, band: int) -> dict:
    run = load_run(run_dir)
    cfg = run.cfg
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    names = ["all", "near", "interior", "stride"]
    if cfg.method.name != "baseline":
        names += ["all_normalised_first", "near_normalised_first", "interior_normalised_first"]
    metrics = {name: SegMetrics(cfg.data.num_classes) for name in names}
    for images, target in DataLoader(dataset, cfg.eval.batch_size):
        output = run.model(images)
        near = near_boundary(target, band)
        key = "logits" if "logits" in output else "embeddings"
        predictions = {"": predict_labels(output, target.shape[-2:])}
        if key == "embeddings":
            predictions["_normalised_first"] = predict_labels(
                {**output, "embeddings": F.normalize(output["embeddings"].float(), dim=1)}, target.shape[-2:])
        for suffix, pred in predictions.items():
            metrics["all" + suffix].update(pred, target)
            metrics["near" + suffix].update(pred, masked(target, near))
            metrics["interior" + suffix].update(pred, masked(target, ~near))
        stride_size = output[key].shape[-2:]
        small = F.interpolate(target[:, None].float(), size=stride_size, mode="nearest")[:, 0].long()
        metrics["stride"].update(predict_labels(output, stride_size), small)
    results = {name: m.compute() for name, m in metrics.items()}
    rows = {name: {"mIoU": round(100 * r["mIoU"], 2), "pAcc": round(100 * r["pAcc"], 2),
                   "pixels": metrics[name].num_pixels} for name, r in results.items()}
    return {"run": str(run_dir), "method": cfg.method.name, "embed_dim": cfg.model.embed_dim, "band": band,
            "IoU": [round(100 * x, 1) for x in results["all"]["IoU"]], **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--band", type=int, default=2, help="pixels around a label change that count as near")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    results = []
    for run_dir in args.runs:
        results.append(breakdown(run_dir, args.band))
        r = results[-1]
        print(f"{run_dir}: " + ", ".join(f"{k} {r[k]['mIoU']:.1f} mIoU / {100 - r[k]['pAcc']:.2f}% wrong"
                                         for k in r if isinstance(r[k], dict)))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
