"""The figures of `esskit analyze` (paper supp. Figures 13, 15-18), drawn with matplotlib's object API
(no pyplot state, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter
from scipy.cluster.hierarchy import dendrogram as scipy_dendrogram
from scipy.cluster.hierarchy import linkage

from esskit.palette import colorize

NAMED_TICKS = 40  # above this many classes, class-name ticks would overlap: the axis says "rank" instead
DENDRO_LEAVES = 100  # Figure 18 draws COCO+LVIS's 100 most frequent classes; more leaves are unreadable
LABELLED_STARS = 15  # class embeddings named in a projection (the largest classes of the image)
PCA_PIXELS = 4000  # pixels per image in the 2-D projection: enough to see clusters, few enough to see points
_plain = FuncFormatter(lambda v, _: f"{v:g}")
# Minor ticks labelled only at 2 and 5 per decade: enough to read values, too few to overlap.
_plain_minor = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")


def norm_vs_frequency(norms: np.ndarray, pixels: np.ndarray, names: list[str], corr: dict, kind: str,
                      path: Path) -> None:
    """Figure 13: class frequency over the training split (left), the class vector norms in the same
    order (middle) and one against the other with the correlation (right)."""
    order = np.argsort(-pixels, kind="stable")
    freq = pixels / max(1, pixels.sum())
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    left, middle, right = fig.subplots(1, 3)
    x = np.arange(len(order))
    few = len(order) <= NAMED_TICKS
    left.bar(x, 100 * freq[order], width=0.85 if few else 1.0, color="tab:blue")
    left.set(yscale="log", ylabel="pixels (%, log)", title="class frequency, training split")
    unseen = int((pixels == 0).sum())
    if unseen:
        left.text(0.97, 0.97, f"{unseen} classes never seen", transform=left.transAxes, ha="right", va="top")
    if few:
        middle.bar(x, norms[order], width=0.85, color="tab:orange")
    else:  # bars from 0 would hide differences of norms that all sit near 1; dots autoscale
        middle.scatter(x, norms[order], s=3, color="tab:orange")
    middle.set(ylabel="norm (before normalisation)", title=f"{kind}: length")
    for ax in (left, middle):
        _class_axis(ax, [names[i] for i in order])
    seen = pixels > 0
    right.scatter(100 * freq[seen], norms[seen], s=14 if len(names) <= 500 else 3, alpha=0.7, color="tab:purple")
    right.set(xscale="log", xlabel="class frequency (%, log)", ylabel="norm", title="norm vs. frequency")
    r, rho = corr["pearson_r_log_freq"], corr["spearman_rho"]
    text = ("too few classes for a correlation" if r is None
            else f"Pearson r = {r:.3f} (log freq)\nSpearman ρ = {rho:.3f}")
    right.text(0.03, 0.97, text, transform=right.transAxes, va="top",
               bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"})
    for ax in (left, middle, right):
        ax.grid(alpha=0.3)
    plain_log_labels(left.yaxis, freq[seen])
    plain_log_labels(right.xaxis, freq[seen])
    fig.savefig(path, dpi=120)


def plain_log_labels(axis, values: np.ndarray) -> None:
    """Plain numbers on a log axis (matplotlib's 2×10⁰ labels collide on short ranges), with labelled
    minor ticks at 2 and 5 only when the axis spans few decades (more would overlap)."""
    axis.set_major_formatter(_plain)
    span = np.log10(values.max() / values.min()) if len(values) and values.min() > 0 else 0
    axis.set_minor_formatter(_plain_minor if span <= 2 else NullFormatter())


def _class_axis(ax, labels: list[str]) -> None:
    if len(labels) <= NAMED_TICKS:
        ax.set_xticks(np.arange(len(labels)), labels, rotation=70, ha="right", fontsize=8)
    else:
        ax.set_xlabel("classes, most frequent first")
    ax.set_xlim(-0.5, len(labels) - 0.5)


def dendrogram(unit: np.ndarray, pixels: np.ndarray, names: list[str], palette: np.ndarray, kind: str,
               path: Path) -> None:
    """Figures 17-18: agglomerative (Ward) clustering of the normalised class vectors, one named leaf
    per class; beyond DENDRO_LEAVES classes only the most frequent are drawn (dendrogram.csv keeps
    the order of all C)."""
    keep = np.arange(len(names))
    title = f"agglomerative clustering of {kind}\n(Ward, normalised)"
    if len(keep) > DENDRO_LEAVES:
        keep = np.sort(np.argsort(-pixels, kind="stable")[:DENDRO_LEAVES])
        title += f", the {DENDRO_LEAVES} most frequent of {len(names)} classes"
    z = linkage(unit[keep].astype(np.float64), method="ward")
    fig = Figure(figsize=(8, max(4.0, 0.19 * len(keep) + 1.2)), layout="constrained")
    ax = fig.subplots()
    tree = scipy_dendrogram(z, orientation="left", labels=[names[i] for i in keep], ax=ax,
                            leaf_font_size=9, color_threshold=0.7 * z[:, 2].max())
    # A swatch of the class colour next to each name ties the tree to the colour masks.
    for tick, leaf in zip(ax.get_yticklabels(), tree["leaves"]):
        tick.set_bbox({"facecolor": palette[keep[leaf]] / 255, "alpha": 0.35, "edgecolor": "none", "pad": 1})
    ax.set(title=title, xlabel="Ward linkage distance")
    fig.savefig(path, dpi=120)


def pca(points: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, components [dims, D]) of `points`, by SVD (D is small: d = 7-12)."""
    mean = points.mean(0)
    _, _, vt = np.linalg.svd(points - mean, full_matrices=False)
    return mean, vt[:dims]


def _projection_points(sample: dict, rng: np.random.Generator, limit: int) -> tuple[np.ndarray, np.ndarray]:
    target, emb = sample["target"], sample["embeddings"]
    valid = np.flatnonzero(target.reshape(-1) >= 0)
    chosen = rng.choice(valid, min(limit, len(valid)), replace=False) if len(valid) else valid
    return emb.reshape(-1, emb.shape[-1])[chosen], target.reshape(-1)[chosen]


def pixel_pca(samples: list[dict], unit: np.ndarray, names: list[str], palette: np.ndarray, path: Path,
              limit: int = PCA_PIXELS) -> None:
    """Figure 15: per image, the ground truth (left) and its pixel embeddings projected onto their
    first two principal components (right, dots coloured by target class) with the class embeddings
    of the classes present as stars, named for the largest ones."""
    rng = np.random.default_rng(0)
    fig = Figure(figsize=(11, 4.8 * len(samples)), layout="constrained")
    axes = fig.subplots(len(samples), 2, squeeze=False, width_ratios=[1, 1.4])
    for (left, right), sample in zip(axes, samples):
        left.imshow(colorize(sample["target"], palette), interpolation="nearest")
        left.set(title="ground truth (black: ignore)", xticks=[], yticks=[])
        points, classes = _projection_points(sample, rng, limit)
        if len(points) < 2:
            right.set_title("no labelled pixels")
            continue
        mean, comps = pca(points, min(2, points.shape[1]))
        # model.embed_dim = 1 leaves one component: pad a zero axis rather than fail.
        xy, stars = (np.pad(p, ((0, 0), (0, 2 - comps.shape[0]))) for p in ((points - mean) @ comps.T,
                                                                          (unit - mean) @ comps.T))
        right.scatter(*xy.T, c=palette[classes] / 255, s=4, alpha=0.5, linewidths=0)
        present, counts = np.unique(classes, return_counts=True)
        right.scatter(*stars[present].T, c=palette[present] / 255, marker="*", s=260, edgecolors="black")
        for c in present[np.argsort(-counts)][:LABELLED_STARS]:
            right.annotate(names[c], stars[c], xytext=(6, 6), textcoords="offset points", fontsize=8,
                           bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})
        right.margins(0.12)  # room for the names of stars at the edge
        right.set(title="pixel embeddings (dots) and class embeddings (stars), PCA",
                  xlabel="PC 1", ylabel="PC 2")
        right.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def pixel_rgb(samples: list[dict], palette: np.ndarray, path: Path) -> None:
    """Figure 16: image, ground truth, prediction, and the pixel embeddings' first three principal
    components shown as RGB (same colour = nearby embeddings, whatever class they are assigned)."""
    fig = Figure(figsize=(13, 3.4 * len(samples)), layout="constrained")
    axes = fig.subplots(len(samples), 4, squeeze=False)
    for row, sample in zip(axes, samples):
        emb = sample["embeddings"]
        flat = emb.reshape(-1, emb.shape[-1])
        mean, comps = pca(flat, min(3, flat.shape[1]))
        proj = (flat - mean) @ comps.T
        low, high = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
        rgb = np.clip((proj - low) / np.maximum(high - low, 1e-6), 0, 1)
        rgb = np.pad(rgb, ((0, 0), (0, 3 - rgb.shape[1]))).reshape(*emb.shape[:2], 3)
        pictures = [sample["image"], colorize(sample["target"], palette), colorize(sample["pred"], palette), rgb]
        for ax, picture, title in zip(row, pictures, ["image", "ground truth", "prediction",
                                                        "pixel embeddings, PCA → RGB"]):
            ax.imshow(picture, interpolation="nearest")
            ax.set(title=title, xticks=[], yticks=[])
    fig.savefig(path, dpi=110)
