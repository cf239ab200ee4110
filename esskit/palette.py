"""How a label map is shown: one stable colour and one name per class.

Datasets that publish a palette keep it (Pascal VOC's bit-interleaved one, Cityscapes' 19 train-id
colours) so that esskit's colour masks look like everyone else's; any other C gets a generated
palette that is deterministic and distinct for every class, thousands included.
"""

from __future__ import annotations

from importlib import import_module

import numpy as np

# Cityscapes train ids 0..18 (cityscapesscripts `labels.py`), road .. bicycle.
CITYSCAPES_COLORS = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)],
    dtype=np.uint8)

# The first classes (the most frequent, in every dataset sorted by frequency, and all of them below
# a few hundred) get colours picked greedily to be as far as possible, in CIELAB, from black
# (unlabelled), white (legend background) and every earlier class.
_MAXIMIN_CLASSES = 256
# Past those, Roberts' R3 sequence: fractional parts of i·(1/g, 1/g², 1/g³), g the root of x⁴ = x + 1,
# spread evenly over hue, saturation and value for every prefix length, at O(1) per class.
_R3 = 1.0 / 1.2207440846057596 ** np.arange(1, 4)


def voc_palette(n: int) -> np.ndarray:
    """Pascal VOC's palette: bits of the class id interleaved into R, G, B from the top bit down.
    Extended past 256 ids it stays injective up to 2**24."""
    ids = np.arange(n, dtype=np.int64)
    pal = np.zeros((n, 3), dtype=np.int64)
    for j in range(8):
        for c in range(3):
            pal[:, c] |= ((ids >> (3 * j + c)) & 1) << (7 - j)
    return pal.astype(np.uint8)


def generated_palette(n: int) -> np.ndarray:
    """[n, 3] uint8 colours, a function of the class id only (a class keeps its colour whatever C):
    maximin colours for the first 256 classes, then an R3 sequence over hue, saturation and value
    kept away from black and white; a rounding collision moves to the nearest free colour so that no
    two classes share one."""
    first = _maximin_colours()[:n]
    u = (0.5 + np.arange(len(first), n)[:, None] * _R3) % 1.0
    hsv = np.stack([u[:, 0], 0.45 + 0.55 * u[:, 1], 0.5 + 0.45 * u[:, 2]], axis=1)
    rest = np.rint(_hsv_to_rgb(hsv) * 255).astype(np.int64)
    return _make_unique(np.concatenate([first, rest])).astype(np.uint8)


def _maximin_colours() -> np.ndarray:
    levels = np.linspace(0, 255, 16).round().astype(np.int64)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    lab = _rgb_to_lab(grid)
    # Very dark colours read as unlabelled black and hide the image under an overlay.
    grid, lab = grid[lab[:, 0] >= 35], lab[lab[:, 0] >= 35]
    anchors = _rgb_to_lab(np.array([[0, 0, 0], [255, 255, 255]]))
    far = np.linalg.norm(lab[:, None] - anchors[None], axis=-1).min(1)
    picked = []
    for _ in range(_MAXIMIN_CLASSES):
        best = int(np.argmax(far))  # ties: the lowest grid index, so the result is deterministic
        picked.append(best)
        far = np.minimum(far, np.linalg.norm(lab - lab[best], axis=1))
    return grid[picked]


def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0-255) -> CIELAB (D65), where Euclidean distance approximates perceived difference."""
    c = rgb / 255.0
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv.T
    k = (np.array([5.0, 3.0, 1.0])[:, None] + h * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).T


def _make_unique(rgb: np.ndarray) -> np.ndarray:
    keys = rgb @ np.array([1 << 16, 1 << 8, 1])
    if len(np.unique(keys)) == len(keys):
        return rgb
    seen: set[int] = set()
    # Sequential, so a class's colour never depends on classes after it (stable as C grows).
    for i, key in enumerate(keys.tolist()):
        step = 0
        while key in seen:
            step += 1
            r, g, b = (np.clip(rgb[i] + _offset(step), 0, 255)).tolist()
            key = (r << 16) | (g << 8) | b
        seen.add(key)
        rgb[i] = (key >> 16, (key >> 8) & 255, key & 255)
    return rgb


def _offset(step: int) -> np.ndarray:
    # Walks a growing shell of small RGB offsets: 1-3 grey levels, invisible but unique.
    q, r = divmod(step - 1, 6)
    sign = 1 if r % 2 == 0 else -1
    out = np.zeros(3, dtype=np.int64)
    out[r // 2] = sign * (q + 1)
    return out


def palette_for(dataset: str, num_classes: int) -> np.ndarray:
    """The [C, 3] uint8 palette of `dataset` (data.name) at C classes."""
    if dataset == "voc":
        return voc_palette(num_classes)
    if dataset == "cityscapes" and num_classes == len(CITYSCAPES_COLORS):
        return CITYSCAPES_COLORS.copy()
    return generated_palette(num_classes)


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """[H, W] class ids -> [H, W, 3] uint8 colours; ids outside the palette (ignore) are black."""
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels < len(palette))
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    out[valid] = palette[labels[valid]]
    return out


def class_names(data_cfg) -> list[str]:
    """Names in train-id order: the dataset module's CLASS_NAMES, hf's from the recipe, else the
    loaded dataset's `class_names` (synthetic, coco_lvis's classes.json), else "class_N". Predicting
    must not need the training data on disk, so a dataset that cannot be loaded falls back quietly."""
    from esskit.data import DATASETS
    from esskit.errors import EsskitError

    c = data_cfg.num_classes
    load = DATASETS.get(data_cfg.name)
    names = None
    if hasattr(load, "module"):
        names = getattr(import_module(load.module), "CLASS_NAMES", None)
    if data_cfg.name == "hf":  # the recipe's names, as the loader sets them: no dataset or Hub access
        from esskit.data.hf import class_names as recipe_names

        try:
            names = recipe_names(data_cfg)
        except EsskitError:
            names = None
    elif names is None and load is not None:
        try:
            names = getattr(load(data_cfg, data_cfg.val_split), "class_names", None)
        except (EsskitError, OSError, ValueError):
            names = None
    if names is None or len(names) != c:
        return [f"class_{i}" for i in range(c)]
    return [str(n) for n in names]
