"""Could a search at the decoder's stride be made exact? How often a triangle-inequality check
proves a pixel's k+1 nearest classes from its stride-4 neighbour list.

The idea (not built): search once per stride-4 decoder pixel y_p (as `method.knn_at = "feature"`),
but keep K' >= k+1 candidates S_p and the distance b_p to the (K'+1)-th nearest class. A label
pixel x with eps = |x - y_p| and r = its (k+1)-th smallest distance within S_p has its exact k+1
nearest classes in S_p whenever r + eps < b_p: every class outside S_p is at least b_p - eps away
(|x - mu| >= |y_p - mu| - eps). Pixels that fail would get the full search. Pays only if most pass.

Measured on (a) the profiler's cell (random-init model, noise images: what `esskit profile` times)
and (b) trained runs' validation images, for several K'. Every passing pixel is checked against
a float64 search (`wrong` must be 0; fp32 ties are counted apart).

    esskit train recipes/synthetic.toml --out runs/verify-1284 --set data.num_classes=1284 \
        --set model.embed_dim=12 --set method.k=8            # ~9 min on 2 CPU cores
    python profiling/knn_verify_study.py --init 1284 --runs runs/knn/label runs/verify-1284 \
        --out profiling/results/knn_verify-synthetic      # runs/knn/label: run_knn_sharing.sh
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from esskit.checkpoint import find_checkpoint, load_weights
from esskit.config import build_config, load_config
from esskit.data import IGNORE_INDEX, build_dataset
from esskit.engine import model_from_config
from esskit.knn import covering_cells, knn_exact
from esskit.losses import pixels_last, upsample
from esskit.profile.step import build_training, cell_config, synthetic_batch

SLACK = 1e-4  # fp32 distances: a pass needs r + eps below the bound by this much
TIE = 1e-6  # float64 distance gaps below this are fp32 ties (as the tests separate them)


@torch.no_grad()
def pass_rates(emb: torch.Tensor, size, mu: torch.Tensor, keep: torch.Tensor, kk: int, candidates: list[int]) -> dict:
    """emb [B, d, h, w] decoder output, mu [C, d] unit class embeddings, keep [N] label pixels to count."""
    x = F.normalize(pixels_last(upsample(emb, size)), dim=1)
    y = F.normalize(pixels_last(emb), dim=1)
    (b, _, h, w), (height, width) = emb.shape, size
    # the stride-4 pixel covering each label pixel, as knn_at = "feature" shares it (any choice
    # keeps the check exact)
    p = ((torch.arange(b)[:, None, None] * h + covering_cells(height, h)[:, None]) * w
         + covering_cells(width, w)).reshape(-1)
    x, p = x[keep], p[keep]
    eps = (x - y[p]).norm(dim=1)
    # the reference in float64; where its (k+1)-th and (k+2)-th distances are within TIE, fp32
    # cannot order them and either set is right
    ref = torch.cdist(x.double(), mu.double()).topk(min(kk + 1, len(mu)), dim=1, largest=False)
    exact = ref.indices[:, :kk].sort(1).values
    tie = (ref.values[:, -1] - ref.values[:, kk - 1] < TIE) if len(mu) > kk else torch.zeros(len(x), dtype=torch.bool)
    out = {"pixels": len(x), "eps_median": round(float(eps.median()), 4), "eps_p90": round(float(eps.quantile(0.9)), 4)}
    for kp in candidates:
        if kp + 1 > len(mu):
            continue
        dist_c, idx_c = knn_exact(y, mu, kp + 1)
        bound = dist_c[:, kp].clamp_min(0).sqrt()[p]
        cand = idx_c[p, :kp]
        dist = (x[:, None, :] - mu[cand]).pow(2).sum(-1)
        top = dist.topk(kk, dim=1, largest=False)
        passed = top.values[:, -1].clamp_min(0).sqrt() + eps < bound - SLACK
        found = cand.gather(1, top.indices).sort(1).values
        out[f"pass_K{kp}"] = round(float(passed.float().mean()), 4)
        differ = passed & (found != exact).any(1)
        out[f"wrong_K{kp}"] = int((differ & ~tie).sum())
        out[f"fp32_ties_K{kp}"] = int((differ & tie).sum())
    return out


@torch.no_grad()
def profiler_cell(classes: int, crop: int, backbone: str, kk: int,
                  inputs: str = "noise") -> tuple[dict, torch.Tensor]:
    """The output and target of `esskit profile`'s cell: a random-init model (train mode), one image
    (`esskit profile --inputs`: noise, or the synthetic dataset's), d = 12, k = kk - 1."""
    cfg = cell_config(build_config({"model": {"embed_dim": 12}, "method": {"k": kk - 1}}), method="ess",
                      num_classes=classes, backbone=backbone, crop=(crop, crop), precision="no")
    model, _ = build_training(cfg, "cpu")
    images, target = synthetic_batch(cfg, 1, "cpu", inputs)
    return model(images), target


def init_cell(classes: int, crop: int, backbone: str, kk: int, candidates: list[int]) -> dict:
    out, target = profiler_cell(classes, crop, backbone, kk)
    mu = F.normalize(out["class_embeddings"].float(), dim=1)
    keep = target.reshape(-1) != IGNORE_INDEX
    return {"source": f"esskit profile's cell: {backbone} random init, noise image {crop}², C = {classes}, d = 12",
            "k+1": kk, **pass_rates(out["embeddings"].float(), target.shape[-2:], mu, keep, kk, candidates)}


def trained_run(run: Path, images: int, candidates: list[int]) -> dict:
    cfg = load_config(run / "config.toml")
    model = model_from_config(cfg).eval()
    load_weights(model, find_checkpoint(run))
    data = build_dataset(cfg.data, cfg.data.val_split, train=False)
    mu = F.normalize(model.head.class_embeddings.detach().float(), dim=1)
    kk = cfg.method.k + 1
    batch = [data[i] for i in range(min(images, len(data)))]
    image, target = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
    with torch.no_grad():
        emb = model(image)["embeddings"].float()
    step = json.loads((run / "eval.json").read_text())
    return {"source": f"{run}: {cfg.model.backbone} trained {step['step']} steps (val mIoU {step['mIoU']:.3f}), "
                      f"{len(batch)} val images, C = {cfg.data.num_classes}, d = {cfg.model.embed_dim}",
            "k+1": kk, **pass_rates(emb, target.shape[-2:], mu, target.reshape(-1) != IGNORE_INDEX, kk, candidates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="1284", help="C of the profiler's random-init cell ('' skips it)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--runs", type=Path, nargs="*", default=[])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--candidates", default="9,12,16,32,64", help="K' values")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    candidates = [int(v) for v in args.candidates.split(",")]
    torch.manual_seed(0)  # the random-init cell's weights and noise image
    rows = [init_cell(int(args.init), args.crop, args.backbone, 9, candidates)] if args.init else []
    rows += [trained_run(run, args.images, candidates) for run in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = ["| model | k+1 | eps median / p90 | " + " | ".join(f"pass, K' = {c}" for c in candidates) + " |",
             "|---|---|---|" + "---|" * len(candidates)]
    for r in rows:
        cells = [f"{100 * r[f'pass_K{c}']:.1f} %" if f"pass_K{c}" in r else "–" for c in candidates]
        lines.append(f"| {r['source']} | {r['k+1']} | {r['eps_median']} / {r['eps_p90']} | " + " | ".join(cells) + " |")
    wrong = sum(v for r in rows for key, v in r.items() if key.startswith("wrong_"))
    ties = sum(v for r in rows for key, v in r.items() if key.startswith("fp32_ties_"))
    lines.append(f"\nPassing pixels whose k+1 nearest differ from the float64 search: {wrong}, and {ties} more "
                 f"where its (k+1)-th and (k+2)-th distances are within {TIE} (fp32 ties).")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
