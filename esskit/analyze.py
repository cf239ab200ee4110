"""`esskit analyze`: what the class embeddings learned (paper supp. §C, Figures 13 and 15-18).

For ESS the class vectors are the class embeddings [C, d]; for the baseline, the rows of the final
1x1 classifier [C, 256], compared by direction like ESS's normalised embeddings. Numbers go to CSV
and summary.json, pictures to PNG (esskit.analyze_plots).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.cluster.vq import kmeans2
from scipy.stats import pearsonr, spearmanr
from torch.utils.data import DataLoader, Subset

from esskit import analyze_plots as plots
from esskit.data import IGNORE_INDEX, build_dataset
from esskit.errors import ConfigError
from esskit.files import make_out_dir, write_atomic
from esskit.knn import knn_exact
from esskit.losses import upsample
from esskit.predict import Run, load_run
from esskit.report import console

NEIGHBOURS = 5  # nearest other classes listed per class
LINKAGE_CLASSES = 8192  # largest C clustered in full: scipy's linkage needs 4·C² bytes (268 MB here)


def class_vectors(run: Run) -> tuple[torch.Tensor, str]:
    """The raw (unnormalised) [C, D] class vectors and what they are."""
    head = run.model.head
    if run.cfg.method.name != "baseline":  # ess and ess_full share the embedding head
        return head.class_embeddings.detach().float().cpu(), "class embeddings"
    return head.classifier.weight.detach().float().cpu()[:, :, 0, 0], "classifier weight rows"


def train_class_pixels(run: Run, max_images: int) -> tuple[np.ndarray, int]:
    """Pixels of each class over the training split (Figure 13's frequency), without augmentation."""
    cfg = run.cfg
    dataset = build_dataset(cfg.data, cfg.data.train_split, train=False)
    n = len(dataset) if not max_images else min(max_images, len(dataset))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=1, num_workers=cfg.data.num_workers)
    counts = torch.zeros(cfg.data.num_classes, dtype=torch.int64)
    for _, target in _track(loader, "class frequency"):
        t = target[target != IGNORE_INDEX]
        counts += torch.bincount(t, minlength=cfg.data.num_classes)
    return counts.numpy(), n


def _track(iterable, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        yield from progress.track(iterable, total=len(iterable))


def nearest_classes(unit: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each class's k nearest other classes: (plain L2 distance [C, k], index [C, k]), ascending.
    Searches k+1 and drops the class itself by id, not by position: two identical embeddings tie
    at distance 0 and either may come first."""
    c = unit.shape[0]
    k = min(k, c - 1)
    dist2, idx = knn_exact(unit, unit, k + 1)
    not_self = idx != torch.arange(c)[:, None]
    order = torch.argsort((~not_self).int(), dim=1, stable=True)[:, :k]
    dist = dist2.gather(1, order).clamp_min(0).sqrt()
    return dist.numpy(), idx.gather(1, order).numpy()


def kmeans_groups(unit: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """k-means on the normalised class vectors (supp. §C lists 70 clusters), k capped at C; seeded
    so that two runs list the same groups."""
    k = min(k, len(unit))
    _, assignment = kmeans2(unit.astype(np.float64), k, minit="++", seed=0, missing="warn")
    return assignment, k


def dendrogram_order(unit: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Class ids in the leaf order of Ward clustering of the normalised class vectors (Ward on unit
    vectors merges the groups whose angular spread grows least). scipy's linkage holds all C²/2
    distances, so above LINKAGE_CLASSES only the most frequent classes are clustered."""
    keep = np.arange(len(unit))
    if len(keep) > LINKAGE_CLASSES:
        keep = np.sort(np.argsort(-pixels, kind="stable")[:LINKAGE_CLASSES])
    return keep[leaves_list(linkage(unit[keep].astype(np.float64), method="ward"))]


def norm_frequency_correlation(norms: np.ndarray, pixels: np.ndarray) -> dict:
    """Pearson r of norm vs. log10 frequency and Spearman rho, over classes seen in training
    (Figure 13: without normalisation, frequent classes get longer embeddings)."""
    seen = pixels > 0
    # norms equal up to float32 rounding (unit embeddings barely trained) would correlate noise
    if seen.sum() < 3 or np.ptp(norms[seen]) <= 1e-6 * np.abs(norms[seen]).max():
        return {"pearson_r_log_freq": None, "spearman_rho": None, "classes_used": int(seen.sum())}
    log_freq = np.log10(pixels[seen] / pixels.sum())
    return {"pearson_r_log_freq": float(pearsonr(norms[seen], log_freq)[0]),
            "spearman_rho": float(spearmanr(norms[seen], pixels[seen])[0]), "classes_used": int(seen.sum())}


@torch.no_grad()
def pixel_embedding_samples(run: Run, num_images: int) -> list[dict]:
    """Normalised pixel embeddings (as predicted: through `infer` with the recipe's eval.mode and
    eval.scale, then normalised), target and prediction of the first `num_images` validation images,
    with the denormalised image for display."""
    from esskit.inference import infer
    from esskit.models import predict_labels

    cfg = run.cfg
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    samples = []
    mean, std = torch.tensor(cfg.data.mean)[:, None, None], torch.tensor(cfg.data.std)[:, None, None]
    for i in range(min(num_images, len(dataset))):
        image, target = dataset[i]
        with run.accelerator.autocast():
            output = infer(run.model, image[None].to(run.accelerator.device), cfg.eval)
        emb = F.normalize(upsample(output["embeddings"].float(), target.shape), dim=1)[0]
        samples.append({"image": (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy(),
                        "target": target.numpy(),
                        "pred": predict_labels(output, target.shape, cfg.method.knn_chunk_bytes)[0].cpu().numpy(),
                        "embeddings": emb.permute(1, 2, 0).cpu().numpy()})
    return samples


def pixel_distances(samples: list[dict], unit: torch.Tensor) -> dict:
    """Medians over the labelled pixels of the samples: distance of a pixel embedding to its own
    class embedding and to the nearest other one (prediction needs only the first to be smaller;
    Eq. 6 with a small tau does not pull pixels onto their class embedding)."""
    own, other = [], []
    for sample in samples:
        emb = torch.from_numpy(sample["embeddings"]).reshape(-1, unit.shape[1])
        target = torch.from_numpy(sample["target"]).reshape(-1)
        emb, target = emb[target != IGNORE_INDEX], target[target != IGNORE_INDEX]
        dist2, idx = knn_exact(emb, unit, min(2, len(unit)))
        first_other = torch.where(idx[:, 0] == target, 1, 0)[:, None]
        own.append((emb - unit[target]).norm(dim=1))
        other.append(dist2.gather(1, first_other)[:, 0].clamp_min(0).sqrt())
    own, other = torch.cat(own), torch.cat(other)
    if not len(own):
        return {"pixels": 0}
    return {"pixels": len(own), "median_distance_to_own_class": float(own.median()),
            "median_distance_to_nearest_other_class": float(other.median())}


def run_analysis(checkpoint: Path, out: Path | None = None, kmeans: int = 70, images: int = 2,
                 train_images: int = 0) -> dict:
    """`esskit analyze`: every table and figure into `out` (None: the run directory's analysis/);
    returns summary.json's content."""
    for option, value, low in (("--kmeans", kmeans, 1), ("--images", images, 0), ("--train-images", train_images, 0)):
        if value < low:
            raise ConfigError(f"{option} {value} must be >= {low}")
    run = load_run(checkpoint)
    out = run.checkpoint.parent / "analysis" if out is None else out
    make_out_dir(out)
    ess = run.cfg.method.name != "baseline"
    raw, kind = class_vectors(run)
    unit = F.normalize(raw, dim=1)
    norms = raw.norm(dim=1).numpy()
    pixels, counted = train_class_pixels(run, train_images)
    dist, idx = nearest_classes(unit, NEIGHBOURS)
    assignment, k = kmeans_groups(unit.numpy(), kmeans)
    leaves = dendrogram_order(unit.numpy(), pixels)
    write_tables(out, run.names, pixels, norms, dist, idx, assignment, leaves)
    corr = norm_frequency_correlation(norms, pixels)
    plots.norm_vs_frequency(norms, pixels, run.names, corr, kind, out / "norm_vs_frequency.png")
    plots.dendrogram(unit.numpy(), pixels, run.names, run.palette, kind, out / "dendrogram.png")
    summary = make_summary(run, kind, raw.shape[1], counted, corr, dist, idx, k, assignment, ess, images)
    if ess and images:
        samples = pixel_embedding_samples(run, images)
        plots.pixel_pca(samples, unit.numpy(), run.names, run.palette, out / "pixel_embeddings_pca.png")
        plots.pixel_rgb(samples, run.palette, out / "pixel_embeddings_rgb.png")
        summary["pixel_embeddings"] = {"images": len(samples), **pixel_distances(samples, unit)}
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))  # last: its presence marks a whole analysis
    print_summary(summary, out)
    return summary


def make_summary(run: Run, kind: str, dim: int, counted: int, corr: dict, dist: np.ndarray, idx: np.ndarray,
                 k: int, assignment: np.ndarray, ess: bool, images: int) -> dict:
    cfg = run.cfg
    nearest = dist[:, 0] if dist.size else np.zeros(0)
    closest = int(np.argmin(nearest)) if nearest.size else 0
    summary = {"checkpoint": str(run.checkpoint), "method": cfg.method.name, "num_classes": cfg.data.num_classes,
               "vectors": kind, "dim": dim, "train_images_counted": counted, "norm_vs_frequency": corr,
               "min_interclass_distance": float(nearest.min()) if nearest.size else None,
               "closest_pair": [run.names[closest], run.names[int(idx[closest, 0])]] if nearest.size else None,
               "mean_nearest_distance": float(nearest.mean()) if nearest.size else None,
               "kmeans_k": k, "kmeans_nonempty": int(len(np.unique(assignment))), "notes": []}
    if cfg.data.num_classes > LINKAGE_CLASSES:
        summary["notes"].append(f"dendrogram.csv: the {LINKAGE_CLASSES} most frequent classes only (a full "
                                f"linkage of {cfg.data.num_classes} classes would not fit in memory)")
    if ess:
        # Eq. 7 pushes every class at least `margin` (plain L2, unit vectors) from its nearest class.
        summary.update(margin=cfg.method.margin, classes_within_margin=int((nearest < cfg.method.margin).sum()))
        if cfg.method.normalize:
            summary["notes"].append("method.normalize = true: the loss sees only directions, so norms need "
                                    "not follow frequency (Figure 13's model was trained without normalisation)")
        if not images:
            summary["notes"].append("--images 0: pixel-embedding figures skipped")
    else:
        summary.update(margin=None, classes_within_margin=None)
        summary["notes"] += [
            "baseline: vectors are the 1x1 classifier's weight rows, compared by direction (normalised)",
            "margin: not applicable, the baseline has no max-margin term (Eq. 7)",
            "pixel-embedding figures (15-16): not applicable, the baseline scores pixels with logits and "
            "has no embedding space shared by pixels and classes"]
    return summary


def write_tables(out: Path, names: list[str], pixels: np.ndarray, norms: np.ndarray, dist: np.ndarray,
                 idx: np.ndarray, assignment: np.ndarray, leaves: np.ndarray) -> None:
    """class_stats.csv (one row per class), neighbours.csv, kmeans.csv and dendrogram.csv (leaf order)."""
    total = max(1, int(pixels.sum()))
    with open(out / "class_stats.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class_id", "name", "train_pixels", "frequency", "norm", "nearest_class", "nearest_distance",
                    "kmeans_cluster"])
        for c, name in enumerate(names):
            near = (names[idx[c, 0]], f"{dist[c, 0]:.6f}") if idx.shape[1] else ("", "")
            w.writerow([c, name, int(pixels[c]), f"{pixels[c] / total:.6g}", f"{norms[c]:.6f}", *near,
                        int(assignment[c])])
    with open(out / "neighbours.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class_id", "name", "rank", "neighbour_id", "neighbour", "distance"])
        for c, name in enumerate(names):
            for r in range(idx.shape[1]):
                w.writerow([c, name, r + 1, int(idx[c, r]), names[idx[c, r]], f"{dist[c, r]:.6f}"])
    with open(out / "kmeans.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cluster", "size", "train_pixels", "classes", "class_ids"])
        clusters = sorted(set(assignment.tolist()), key=lambda g: (-int((assignment == g).sum()), g))
        for g in clusters:
            members = np.flatnonzero(assignment == g)
            members = members[np.argsort(-pixels[members], kind="stable")]  # most frequent first
            w.writerow([g, len(members), int(pixels[members].sum()), "; ".join(names[m] for m in members),
                        " ".join(map(str, members))])
    with open(out / "dendrogram.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["leaf", "class_id", "name"])
        w.writerows([pos, int(c), names[c]] for pos, c in enumerate(leaves))


def print_summary(summary: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"analyze · {summary['method']} · C={summary['num_classes']} · {summary['vectors']}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    corr = summary["norm_vs_frequency"]
    rows = [("norm vs log-frequency, Pearson r", corr["pearson_r_log_freq"]),
            ("norm vs frequency, Spearman rho", corr["spearman_rho"]),
            ("min inter-class distance", summary["min_interclass_distance"]),
            ("mean nearest-class distance", summary["mean_nearest_distance"]),
            ("margin (method.margin)", summary["margin"]),
            ("classes within the margin", summary["classes_within_margin"]),
            ("k-means clusters (non-empty)", f"{summary['kmeans_k']} ({summary['kmeans_nonempty']})")]
    pixels = summary.get("pixel_embeddings", {})
    rows += [("pixel to own class, median", pixels.get("median_distance_to_own_class")),
             ("pixel to nearest other class, median", pixels.get("median_distance_to_nearest_other_class"))]
    for name, value in rows:
        if isinstance(value, float) and math.isfinite(value):
            value = f"{value:.4f}"
        table.add_row(name, "n/a" if value is None else str(value))
    console.print(table)
    for note in summary["notes"]:
        console.print(f"note: {note}")
    console.print(f"analysis written to {out}")
