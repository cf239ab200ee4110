"""Procedural long-tailed segmentation data: any number of classes, no files.

The embedded default for the README, the tests and the memory profiler. Each image is a Voronoi
partition into 4-12 regions; each region takes a class drawn from a Zipf law p(c) ∝ 1/(c+1)^s, the
long tail that the paper targets (COCO+LVIS). A class looks the same in every image (a base colour
plus a striped or checkered texture derived from its id by an integer hash), so a small CNN can
learn it; per-pixel noise and thin ignore borders keep it from being trivial.
"""

from functools import cached_property

import numpy as np
import torch

from esskit.config import SYNTHETIC_MIN_IMAGE_SIZE
from esskit.data import IGNORE_INDEX

SPLITS = ("train", "val")
ZIPF_EXPONENT = 1.0  # s in p(c) ∝ 1/(c+1)^s; class 0 gets ≈ 28% of regions at C = 19, 8% at 100k
BORDER_WIDTH = 1.5  # px, total width of the ignore band on each cell edge, like void borders
NOISE_STD = 8.0  # grey levels of per-pixel Gaussian noise
_APPEARANCE_SALT = 0x5E55  # appearance depends on the class id only, never on seed or split


def _hash64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: neighbouring ids map to unrelated 64-bit values, vectorised."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def class_appearance(class_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class rendering parameters, computed only for the ids asked for (O(K), not O(C))."""
    ids = np.asarray(class_ids, dtype=np.uint64)
    # 9 independent uniforms per class: hash (salt, id, slot) so slots do not correlate.
    keys = (_hash64(ids ^ np.uint64(_APPEARANCE_SALT))[:, None] + np.arange(9, dtype=np.uint64))
    u = (_hash64(keys) >> np.uint64(11)).astype(np.float64) / 2.0**53  # [K, 9] in [0, 1)
    tint = u[:, 3:6] * 2 - 1
    return {
        "base": 30 + 195 * u[:, 0:3],  # RGB, leaves headroom for the texture amplitude
        "tint": tint / np.maximum(np.linalg.norm(tint, axis=1, keepdims=True), 1e-6),
        "period": 4 + 14 * u[:, 6],  # px; above the 2-px Nyquist limit, below a small region
        "angle": np.pi * u[:, 7],
        "checker": u[:, 8] < 0.5,  # half the classes are stripes, half checkerboards
    }


class SyntheticSegmentation(torch.utils.data.Dataset):
    """Voronoi images with Zipf-distributed classes, deterministic from (seed, split, index)."""

    def __init__(self, num_classes: int, length: int, image_size: int = 128, split: str = "train",
                 seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if image_size < SYNTHETIC_MIN_IMAGE_SIZE:  # checked by DataConfig too, before a run starts
            raise ValueError(f"image_size must be >= {SYNTHETIC_MIN_IMAGE_SIZE}, got {image_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy SeedSequence), got {seed}")
        self.num_classes, self.length, self.image_size = num_classes, length, image_size
        self.split, self.seed = split, seed
        # Inverse-CDF sampling of the Zipf law: one O(C) numpy pass, ~1 ms at C = 100k.
        weights = 1.0 / np.arange(1, num_classes + 1, dtype=np.float64) ** ZIPF_EXPONENT
        self._cdf = np.cumsum(weights) / weights.sum()

    @cached_property
    def class_names(self) -> list[str]:
        # Lazy: a 100k-entry list is only built if someone asks for it.
        width = max(4, len(str(self.num_classes - 1)))
        return [f"class_{c:0{width}d}" for c in range(self.num_classes)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        # Split id in the seed sequence: train and val draw from disjoint random streams.
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        size = self.image_size
        num_regions = int(rng.integers(4, 13))
        centres = rng.uniform(0, size, (num_regions, 2)).astype(np.float32)
        classes = np.minimum(np.searchsorted(self._cdf, rng.random(num_regions), side="right"),
                             self.num_classes - 1)
        phases = rng.uniform(0, 2 * np.pi, (num_regions, 2))  # texture is not tied to position

        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        sq_dist = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
        region = sq_dist.argmin(-1)  # [H, W]
        own = np.take_along_axis(sq_dist, region[..., None], -1)
        gap = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        np.fill_diagonal(gap, 1.0)  # own centre is masked out below; avoids 0/0
        # (d_j² - d_own²) / 2|p_own - p_j| is the exact distance to the bisector with centre j; a
        # cell is convex, so the smallest one is the distance to its edge: a uniform-width band
        # (d_2 - d_1 would widen along the edge, and swallow cells whose centres nearly touch).
        edge_dist = np.min((sq_dist - own) / (2 * gap[region]), axis=-1, initial=np.inf,
                           where=np.arange(num_regions) != region[..., None])
        border = edge_dist < BORDER_WIDTH / 2

        look = {k: v[region] for k, v in class_appearance(classes).items()}  # per-pixel params
        cos, sin = np.cos(look["angle"]), np.sin(look["angle"])
        freq = 2 * np.pi / look["period"]
        wave = np.sin(freq * (xx * cos + yy * sin) + phases[region, 0])
        across = np.sin(freq * (yy * cos - xx * sin) + phases[region, 1])
        texture = np.where(look["checker"], wave * across, wave)
        pixels = look["base"] + 45 * texture[..., None] * look["tint"]
        pixels += rng.normal(0, NOISE_STD, pixels.shape)
        image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(2, 0, 1)

        mask = np.where(border, IGNORE_INDEX, classes[region]).astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(mask)
