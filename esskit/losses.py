"""Losses: baseline cross-entropy, ESS kNN softmax (Eq. 6) and max-margin regulariser (Eq. 7).

All losses run in fp32, also under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from esskit.config import MethodConfig
from esskit.data import IGNORE_INDEX
from esskit.knn import knn_backend, knn_exact

ESSNET_SCALE = 20.0  # the official code's logits: -20 * |x - mu| (not squared)


def _zero_with_graph(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero loss still connected to the inputs, so backward and DDP see every parameter."""
    return sum(t.sum() * 0.0 for t in tensors)


def nearest_negatives(x: torch.Tensor, mu: torch.Tensor, target: torch.Tensor, k: int,
                      knn=knn_exact) -> torch.Tensor:
    """The k nearest classes of each pixel other than its target [N, k], nearest first.

    Searches k+1 and drops the target where it appears (else the farthest): negatives stay strict.
    """
    _, idx = knn(x.detach(), mu.detach(), k + 1)
    is_target = idx == target[:, None]
    # Sort key pushes the target to the end; positions keep the kNN order otherwise.
    key = torch.arange(k + 1, device=idx.device).expand_as(idx).masked_fill(is_target, k + 1)
    return idx.gather(1, key.argsort(dim=1)[:, :k])


def random_negatives(target: torch.Tensor, num_classes: int, k: int) -> torch.Tensor:
    """k classes drawn uniformly from the C-1 non-target classes (Table 2 ablation)."""
    r = torch.randint(0, num_classes - 1, (target.shape[0], k), device=target.device)
    return r + (r >= target[:, None]).long()


def ess_loss(pixel_emb: torch.Tensor, class_emb: torch.Tensor, target: torch.Tensor, k: int,
             tau: float = 0.05, *, negatives: str = "nearest", normalize: bool = True,
             knn=knn_exact) -> torch.Tensor:
    """Eq. 6: softmax over the target and its k nearest negative classes, logits -|x - mu|^2 / tau.

    pixel_emb [N, d], class_emb [C, d], target [N] (IGNORE_INDEX pixels dropped). With
    k = C - 1 this is exactly the full softmax cross-entropy of Eq. 5.
    """
    keep = target != IGNORE_INDEX
    x, t, mu = pixel_emb[keep].float(), target[keep], class_emb.float()
    if x.shape[0] == 0:
        return _zero_with_graph(pixel_emb, class_emb)
    if normalize:
        x, mu = F.normalize(x, dim=1), F.normalize(mu, dim=1)
    if negatives == "random":
        neg = random_negatives(t, mu.shape[0], k)
    else:
        neg = nearest_negatives(x, mu, t, k, knn)
    candidates = torch.cat([t[:, None], neg], dim=1)  # target first: label 0 below
    logits = -(x[:, None, :] - mu[candidates]).pow(2).sum(-1) / tau
    return F.cross_entropy(logits, torch.zeros_like(t))


def essnet_loss(pixel_emb: torch.Tensor, class_emb: torch.Tensor, target: torch.Tensor, k: int,
                knn=knn_exact) -> torch.Tensor:
    """The official code's form of Algorithm 1: the target concatenated with a plain kNN result
    (which may contain the target again), logits -20 * |x - mu| on normalised class embeddings.
    The pixel embeddings arrive normalised at stride 4 and upsampled (not renormalised)."""
    keep = target != IGNORE_INDEX
    x, t = pixel_emb[keep].float(), target[keep]
    mu = F.normalize(class_emb.float(), dim=1)
    if x.shape[0] == 0:
        return _zero_with_graph(pixel_emb, class_emb)
    _, neg = knn(x.detach(), mu.detach(), k)
    candidates = torch.cat([t[:, None], neg], dim=1)
    dist = (x[:, None, :] - mu[candidates]).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    return F.cross_entropy(-ESSNET_SCALE * dist, torch.zeros_like(t))


def max_margin_loss(class_emb: torch.Tensor, margin: float = 0.2, knn=knn_exact) -> torch.Tensor:
    """Eq. 7: (1/C) sum_i max(0, m - min_{j != i} |mu_i - mu_j|) on normalised class embeddings.

    Each class's nearest other class comes from the kNN (O(C k) memory, never C x C).
    """
    mu = F.normalize(class_emb.float(), dim=1)
    nearest = nearest_negatives(mu, mu, torch.arange(mu.shape[0], device=mu.device), 1, knn)[:, 0]
    dist = (mu - mu[nearest]).pow(2).sum(1).clamp_min(1e-12).sqrt()
    return F.relu(margin - dist).mean()


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def pixels_last(x: torch.Tensor) -> torch.Tensor:
    """[B, D, H, W] -> [B*H*W, D], the pixel-major layout the losses and kNN take."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def segmentation_loss(output: dict, target: torch.Tensor, cfg: MethodConfig) -> tuple[torch.Tensor, dict]:
    """The method's training loss on a model output dict and [B, H, W] targets -> (loss, parts)."""
    size = target.shape[-2:]
    if cfg.name == "baseline":
        logits = upsample(output["logits"].float(), size)
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
        return loss, {"loss_ce": loss.detach()}
    knn = knn_backend(cfg.knn, cfg.knn_chunk_mib * 2**20)
    emb, class_emb = output["embeddings"].float(), output["class_embeddings"]
    if cfg.variant == "essnet":
        emb = upsample(F.normalize(emb, dim=1), size)
        cls = essnet_loss(pixels_last(emb), class_emb, target.reshape(-1), cfg.k, knn=knn)
    else:
        cls = ess_loss(pixels_last(upsample(emb, size)), class_emb, target.reshape(-1), cfg.k, cfg.tau,
                       negatives=cfg.negatives, normalize=cfg.normalize, knn=knn)
    parts = {"loss_ess": cls.detach()}
    loss = cls
    if cfg.margin_weight > 0:
        margin = max_margin_loss(class_emb, cfg.margin, knn)
        loss = loss + cfg.margin_weight * margin
        parts["loss_margin"] = margin.detach()
    return loss, parts
