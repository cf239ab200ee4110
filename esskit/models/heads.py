"""Output heads: the baseline's C-way classifier and ESS's d-dimensional embedding head.

Each head returns a dict; the loss (`esskit.losses.segmentation_loss`) and `predict_labels`
read it, so the trainer never branches on the method.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from esskit.knn import DEFAULT_CHUNK_BYTES, bounded_neighbours, knn_backend, knn_exact
from esskit.losses import pixels_last, upsample


class ClassifierHead(nn.Module):
    """Baseline: 1x1 conv (with bias) to C logits."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.classifier(x)}


class EmbeddingHead(nn.Module):
    """ESS: 1x1 conv to d channels plus the learnable class embeddings [C, d] (paper Fig. 2).
    `normalize` (method.normalize) tells `predict_labels` the distance the loss trained: between
    unit vectors, or between the raw ones (Table 3's ablation). `unit_at_stride` (method.variant
    "essnet", the official code) normalises here, before any upsampling, as its loss trains."""

    def __init__(self, in_channels: int, num_classes: int, embed_dim: int, normalize: bool = True,
                 unit_at_stride: bool = False):
        super().__init__()
        self.normalize, self.unit_at_stride = normalize, unit_at_stride
        self.proj = nn.Conv2d(in_channels, embed_dim, 1)
        # Unit vectors spread uniformly on the sphere: no class starts close to another.
        self.class_embeddings = nn.Parameter(F.normalize(torch.randn(num_classes, embed_dim), dim=1))

    def forward(self, x: torch.Tensor) -> dict:
        emb = self.proj(x)
        raw_norm = emb.detach().float().norm(dim=1).mean()  # the trainer's emb_norm diagnostic
        if self.unit_at_stride:
            emb = F.normalize(emb, dim=1)
        # Passing the class embeddings through forward lets DDP see them as used parameters.
        return {"embeddings": emb, "class_embeddings": self.class_embeddings, "normalize": self.normalize,
                "unit_at_stride": self.unit_at_stride, "raw_norm": raw_norm}


@torch.no_grad()
def predict_labels(output: dict, size, chunk_bytes: int = DEFAULT_CHUNK_BYTES, bounded: int = 0) -> torch.Tensor:
    """Per-pixel class ids [B, H, W] at `size`: argmax for the baseline, nearest class embedding
    for ESS (exact search in distance blocks of `chunk_bytes`, method.knn_chunk_mib; no [pixels, C]
    tensor), in the distance its loss trained. `bounded` (method.knn_at = "feature_exact": its
    knn_bound_keys, `MethodConfig.bounded_search`) searches at the embeddings' own resolution for that
    many classes per pixel and proves each pixel's nearest class (`bounded_neighbours`; exact, as the
    search per pixel); 0 searches every pixel."""
    if "logits" in output:
        return upsample(output["logits"].float(), size).argmax(1)
    coarse = output["embeddings"].float()
    emb = upsample(coarse, size)
    b, _, h, w = emb.shape
    x, mu = pixels_last(emb), output["class_embeddings"].float()
    unit_pixels = output.get("normalize", True) and not output.get("unit_at_stride", False)
    if output.get("normalize", True) or output.get("unit_at_stride", False):
        mu = F.normalize(mu, dim=1)  # essnet_loss: upsampled unit vectors, not renormalised
    shared = (bounded_neighbours(coarse, (h, w), mu, 1, knn_backend("auto", chunk_bytes), unit_pixels, chunk_bytes,
                                 bounded)
              if bounded and coarse.shape[-2:] != emb.shape[-2:] else None)
    if shared is not None:
        return shared.lookup(0, len(x), x).view(b, h, w)
    _, idx = knn_exact(F.normalize(x, dim=1) if unit_pixels else x, mu, 1, chunk_bytes)
    return idx.view(b, h, w)
