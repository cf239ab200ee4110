"""Losses: baseline cross-entropy, ESS kNN softmax (Eq. 6), its exact full-softmax form
(`ess_full`) and the max-margin regulariser (Eq. 7).

All losses run in fp32, also under autocast. Eq. 6 (`ess_loss`) and the full softmax
(`ess_full_loss`) are memory-lean: nothing of size [pixels, k+1, d] or [pixels, C] exists at once
(the official-code variant `essnet_loss` keeps its literal form). Both use
-|x - mu|^2/tau = (2 x.mu - |mu|^2)/tau - |x|^2/tau, whose last term is the same for every class
of a pixel and cancels in the softmax; so the logits are dot products, computed in pixel chunks
in forward and recomputed chunk by chunk in backward (`esskit.lean_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from esskit.lean_loss import CandidateCrossEntropy, full_cross_entropy, unit
from esskit.full_loss_triton import fused_full_cross_entropy
from esskit.knn_triton import fused_by_default
from esskit.loss_triton import fused_candidate_cross_entropy
from esskit.config import MethodConfig
from esskit.data import IGNORE_INDEX
from esskit.errors import ConfigError
from esskit.knn import (BOUNDED_CANDIDATES_PER_K, DEFAULT_CHUNK_BYTES, BoundedNeighbours, GridNeighbours,
                        block_neighbours, bounded_neighbours, chunk_ranges, drop_target, feature_neighbours,
                        knn_backend, knn_exact)

ESSNET_SCALE = 20.0  # the official code's logits: -20 * |x - mu| (not squared)
LOSS_CHUNK_BYTES = 64 * 2**20  # default of method.loss_chunk_mib
# Eq. 6 through [rows, C] logit blocks (matmuls) up to this C, through gathered candidates above:
# the dense form costs ~C, the gathered one a constant (profiling/README.md, "Measured on a GPU").
# H200, 2M pixels: loss minus kNN 5.5 vs 62 ms at C = 19, 16 vs 46 ms at C = 150, and ~2.3x slower
# than gathered at C = 1284 (break-even ~440). One threshold for every device, tuned for GPUs
# (CPU, 2 cores: even at C ~ 150), so the profiler's CPU estimate follows the GPU's path.
DENSE_MAX_CLASSES = 384


def nearest_negatives(x: torch.Tensor, mu: torch.Tensor, target: torch.Tensor, k: int,
                      knn=knn_exact) -> torch.Tensor:
    """The k nearest classes of each pixel other than its target [N, k], nearest first.

    Searches k+1 and drops the target where it appears (else the farthest).
    """
    _, idx = knn(x.detach(), mu.detach(), k + 1)
    return drop_target(idx, target, k)


def random_negatives(target: torch.Tensor, num_classes: int, k: int) -> torch.Tensor:
    """k distinct classes per pixel, a uniform k-subset of its C-1 non-target classes (Table 2's
    random negatives: Eq. 6 normalises over a set). Floyd's sampling, vectorised over pixels:
    k draws, no [N, C] tensor."""
    if not 0 < k < num_classes:
        raise ConfigError(f"method.k = {k}: random negatives need 1 <= k <= C - 1 = {num_classes - 1}")
    n, device = target.shape[0], target.device
    r = torch.empty(n, k, dtype=torch.long, device=device)
    for i, j in enumerate(range(num_classes - 1 - k, num_classes - 1)):
        draw = (torch.rand(n, device=device) * (j + 1)).long().clamp_max(j)  # uniform in [0, j]
        r[:, i] = torch.where((r[:, :i] == draw[:, None]).any(1), j, draw)  # taken: j, new this round
    return r + (r >= target[:, None]).long()


@torch.no_grad()
def ess_candidates(x: torch.Tensor, mu: torch.Tensor, target: torch.Tensor, k: int, *, rows: int,
                   negatives: str = "nearest", normalize: bool = True, knn=knn_exact,
                   neighbours: GridNeighbours | BoundedNeighbours | None = None) -> torch.Tensor:
    """[N, k+1] int32 class ids per pixel: the target (ignore pixels: class 0), then its k
    negatives (Eq. 6), built `rows` pixels at a time so the kNN outputs stay chunk-sized.

    `neighbours` replaces the per-pixel search by one shared per feature pixel or pixel block. A
    search with `candidates` (the fused kernel's) builds them all in one pass where it runs, per
    pixel or from `BoundedNeighbours` (exact, as per pixel).
    """
    fused = getattr(knn, "candidates", None)
    if negatives == "nearest" and fused is not None and not isinstance(neighbours, GridNeighbours):
        cand = fused(x, mu, target, k, normalize, neighbours)
        if cand is not None:
            return cand
    n = x.shape[0]
    t = target.clamp_min(0)
    cand = torch.empty(n, k + 1, dtype=torch.int32, device=x.device)
    cand[:, 0] = t
    for start, stop in chunk_ranges(n, rows, x):
        if negatives == "random":
            neg = random_negatives(t[start:stop], mu.shape[0], k)
        elif isinstance(neighbours, BoundedNeighbours):  # the target left out before the search's proof
            neg = _search_time(knn, neighbours.lookup, start, stop, x[start:stop], t[start:stop])
        else:
            found = (_search_time(knn, neighbours.lookup, start, stop, x[start:stop]) if neighbours is not None
                     else knn(unit(x[start:stop], normalize), mu, k + 1)[1])
            neg = drop_target(found, t[start:stop], k)
        cand[start:stop, 1:] = neg
    return cand


def _kept_mean(total: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A sum over pixels / the number of pixels not ignored (no data-dependent shapes; a batch of
    only ignore pixels gives 0, still connected to the inputs)."""
    return total / (target != IGNORE_INDEX).sum().clamp_min(1)


def ess_loss(pixel_emb: torch.Tensor, class_emb: torch.Tensor, target: torch.Tensor, k: int,
             tau: float = 0.05, *, negatives: str = "nearest", normalize: bool = True, knn=knn_exact,
             neighbours: GridNeighbours | BoundedNeighbours | None = None, chunk_bytes: int = LOSS_CHUNK_BYTES,
             dense: bool | None = None, kernel: str = "auto") -> torch.Tensor:
    """Eq. 6: softmax over the target and its k nearest negative classes, logits -|x - mu|^2 / tau.

    pixel_emb [N, d], class_emb [C, d], target [N] (IGNORE_INDEX pixels weigh 0). With k = C - 1
    this is exactly the full softmax cross-entropy of Eq. 5. Memory: the int32 candidates
    [N, k+1] plus chunks of `chunk_bytes`; pixel embeddings are normalised chunk by chunk.
    `dense` computes it through [rows, C] logit blocks (None: when C <= DENSE_MAX_CLASSES);
    `kernel = "triton"` in two fused kernels instead (`esskit.loss_triton`; CUDA), "auto" when the
    inputs are CUDA tensors (`knn_triton.fused_by_default`) and `dense` is not given.
    """
    x, mu = pixel_emb.float(), class_emb.float()
    if normalize:
        mu = F.normalize(mu, dim=1)
    rows = max(1, chunk_bytes // (4 * (k + 1) * x.shape[1]))
    cand = ess_candidates(x.detach(), mu.detach(), target, k, rows=rows, negatives=negatives,
                          normalize=normalize, knn=knn, neighbours=neighbours)
    if kernel == "triton" or (kernel == "auto" and dense is None and fused_by_default(x, k)):
        return _kept_mean(fused_candidate_cross_entropy(x, mu, cand, target, tau, normalize, rows), target)
    if dense is None:
        dense = mu.shape[0] <= DENSE_MAX_CLASSES
    if dense:  # chunks of [rows, C] logits instead of [rows, k+1, d] gathered embeddings; not more
        # rows than the gathered form (at C = 19 the chunk's [rows, d] temporaries would dominate)
        rows = max(1, chunk_bytes // (4 * max(mu.shape[0], (k + 1) * x.shape[1])))
    total = CandidateCrossEntropy.apply(x, mu, cand, target, tau, normalize, rows, dense)
    return _kept_mean(total, target)


def ess_full_loss(pixel_emb: torch.Tensor, class_emb: torch.Tensor, target: torch.Tensor, tau: float = 0.05,
                  *, normalize: bool = True, chunk_bytes: int = LOSS_CHUNK_BYTES,
                  builtin: bool | None = None, kernel: str = "torch") -> torch.Tensor:
    """Eq. 5 on ESS embeddings: exact softmax over all C classes, logits -|x - mu|^2 / tau.

    A linear cross-entropy with weight (2/tau) mu and bias -|mu|^2/tau (module doc), in pixel
    chunks of at most `chunk_bytes` of logits: no [N, C] tensor. `builtin` picks
    torch.nn.functional.linear_cross_entropy (recent torch; looked up by name) or esskit's own
    (None: the builtin when present, except on fake tensors, see `lean_loss.full_cross_entropy`).
    `kernel = "triton"` runs fused kernels instead (`esskit.full_loss_triton`; CUDA). "auto" keeps
    the chunked forms here: the fused Eq. 5 has not been timed on a GPU yet.
    """
    x, mu = pixel_emb.float(), class_emb.float()
    if normalize:
        mu = F.normalize(mu, dim=1)
    rows = max(1, chunk_bytes // (4 * mu.shape[0]))
    if kernel == "triton":
        return _kept_mean(fused_full_cross_entropy(x, mu, target, tau, normalize, rows), target)
    total = full_cross_entropy(x, mu, target, tau, normalize, rows, builtin)
    return _kept_mean(total, target)


def essnet_loss(pixel_emb: torch.Tensor, class_emb: torch.Tensor, target: torch.Tensor, k: int,
                knn=knn_exact) -> torch.Tensor:
    """The official code's form of Algorithm 1: the target concatenated with a plain kNN result
    (which may contain the target again), logits -20 * |x - mu| on normalised class embeddings.
    The pixel embeddings arrive normalised at stride 4 and upsampled (not renormalised)."""
    x, t = pixel_emb.float(), target.clamp_min(0)
    mu = F.normalize(class_emb.float(), dim=1)
    _, neg = knn(x.detach(), mu.detach(), k)
    candidates = torch.cat([t[:, None], neg], dim=1)
    dist = (x[:, None, :] - mu[candidates]).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    per_pixel = F.cross_entropy(-ESSNET_SCALE * dist, torch.zeros_like(t), reduction="none")
    return _kept_mean((per_pixel * (target != IGNORE_INDEX)).sum(), target)


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


def _search_time(knn, fn, *args):
    """fn(*args), timed as part of the search where `knn` times (the profiler's TimedKnn): the
    neighbour lists' own work beside the searches they call."""
    timed = getattr(knn, "timed", None)
    return timed(fn, *args) if timed is not None else fn(*args)


@torch.no_grad()
def shared_neighbours(emb: torch.Tensor, up: torch.Tensor, class_emb: torch.Tensor, k: int, *, knn_at: str,
                      knn_block: int, knn=knn_exact, normalize: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                      bound_keys: int = BOUNDED_CANDIDATES_PER_K) -> GridNeighbours | BoundedNeighbours | None:
    """The k+1 nearest classes searched once per stride-4 decoder pixel (`knn_at = "feature"`, shared
    by the label pixels it covers; "feature_exact", exact per label pixel through a bound) or per
    b x b block of label pixels (`knn_block = b`) of `emb` [B, d, h, w] / `up` (it at label size);
    None for the paper's one search per label pixel. `bound_keys`: method.knn_bound_keys."""
    if knn_at == "label" and knn_block == 1:
        return None
    mu = unit(class_emb.detach().float(), normalize)
    if knn_at == "feature_exact":
        return _search_time(knn, bounded_neighbours, emb, up.shape[-2:], mu, k + 1, knn, normalize, chunk_bytes,
                            bound_keys)
    if knn_at == "feature":
        return _search_time(knn, feature_neighbours, emb, up.shape[-2:], mu, k + 1, knn, normalize)
    return _search_time(knn, block_neighbours, up, knn_block, mu, k + 1, knn, normalize)


@torch.no_grad()
def negatives_differ(x: torch.Tensor, mu: torch.Tensor, target: torch.Tensor, k: int, neighbours: GridNeighbours,
                     *, rows: int, knn=knn_exact) -> torch.Tensor:
    """[N] bool: label pixels (not ignore) whose set of k negatives from the shared `neighbours`
    differs from the exact per-pixel search's."""
    exact = ess_candidates(x, mu, target, k, rows=rows, knn=knn)[:, 1:].sort(1).values
    shared = ess_candidates(x, mu, target, k, rows=rows, knn=knn, neighbours=neighbours)[:, 1:].sort(1).values
    return (exact != shared).any(1) & (target != IGNORE_INDEX)


def ess_paper_loss(emb: torch.Tensor, class_emb: torch.Tensor, target: torch.Tensor, cfg: MethodConfig,
               knn, dense: bool | None = None) -> torch.Tensor:
    """Eq. 6 at label resolution, with the kNN per label pixel or shared (method.knn_at / knn_block)."""
    up = upsample(emb, target.shape[-2:])
    neighbours = None
    if cfg.negatives == "nearest":
        neighbours = shared_neighbours(emb, up, class_emb, cfg.k, knn_at=cfg.knn_at, knn_block=cfg.knn_block,
                                       knn=knn, normalize=cfg.normalize, chunk_bytes=cfg.knn_chunk_bytes,
                                       bound_keys=cfg.knn_bound_keys)
    return ess_loss(pixels_last(up), class_emb, target.reshape(-1), cfg.k, cfg.tau, negatives=cfg.negatives,
                    normalize=cfg.normalize, knn=knn, neighbours=neighbours,
                    chunk_bytes=cfg.loss_chunk_bytes, dense=dense, kernel=cfg.loss_kernel)


def segmentation_loss(output: dict, target: torch.Tensor, cfg: MethodConfig, knn=None) -> tuple[torch.Tensor, dict]:
    """The method's training loss on a model output dict and [B, H, W] targets -> (loss, parts).
    `knn` replaces the configured search (the profiler passes a timed one)."""
    size = target.shape[-2:]
    if cfg.name == "baseline":
        logits = upsample(output["logits"].float(), size)
        # a sum over the kept pixels, as ESS: F.cross_entropy's mean is NaN on an all-ignore batch
        loss = _kept_mean(F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum"), target)
        return loss, {"loss_ce": loss.detach()}
    knn = knn or knn_backend(cfg.knn, cfg.knn_chunk_bytes)
    emb, class_emb = output["embeddings"].float(), output["class_embeddings"]
    if cfg.name == "ess_full":
        cls = ess_full_loss(pixels_last(upsample(emb, size)), class_emb, target.reshape(-1), cfg.tau,
                            normalize=cfg.normalize, chunk_bytes=cfg.loss_chunk_bytes, kernel=cfg.loss_kernel)
        parts = {"loss_full": cls.detach()}
    elif cfg.variant == "essnet":  # the head is unit at stride 4 already (unit_at_stride): idempotent here
        emb = upsample(F.normalize(emb, dim=1), size)
        cls = essnet_loss(pixels_last(emb), class_emb, target.reshape(-1), cfg.k, knn=knn)
        parts = {"loss_ess": cls.detach()}
    else:
        cls = ess_paper_loss(emb, class_emb, target, cfg, knn)
        parts = {"loss_ess": cls.detach()}
    # The raw embeddings' norm: the normalisation makes the head scale-invariant, so SGD steps grow
    # it and every layer below gets gradients divided by it (a diagnostic for the lr schedule).
    # (the head's output before any normalisation: essnet's head normalises at stride 4)
    parts["emb_norm"] = output["raw_norm"] if "raw_norm" in output else emb.detach().norm(dim=1).mean()
    loss = cls
    if cfg.margin_weight > 0:
        margin = max_margin_loss(class_emb, cfg.margin, knn)
        loss = loss + cfg.margin_weight * margin
        parts["loss_margin"] = margin.detach()
    return loss, parts
