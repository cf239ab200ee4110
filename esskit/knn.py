"""Exact k-nearest-neighbour search between pixel embeddings and class embeddings.

The search runs without gradient (paper §3.3.1: "not included in the computational graph").
"""

from __future__ import annotations

import torch

from esskit.errors import ConfigError

DEFAULT_CHUNK_BYTES = 256 * 2**20


def _check_k(k: int, num_keys: int) -> None:
    if not 1 <= k <= num_keys:
        raise ConfigError(f"kNN k = {k} must be between 1 and the number of classes ({num_keys})")


@torch.no_grad()
def knn_exact(queries: torch.Tensor, keys: torch.Tensor, k: int,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared-L2 k nearest `keys` [C, d] of each query [N, d] -> (dist [N, k], idx [N, k]), ascending.

    Queries are processed in row blocks sized so that one fp32 [rows, C] distance block stays
    within `chunk_bytes`: N x C is never materialised at once.
    """
    with torch.autocast(queries.device.type, enabled=False):  # exact means fp32 under AMP too
        return _knn_blocks(queries.float(), keys.float(), k, chunk_bytes)


def _knn_blocks(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk_bytes: int):
    num_keys = keys.shape[0]
    _check_k(k, num_keys)
    key_sq = keys.pow(2).sum(1)
    rows = max(1, chunk_bytes // (4 * num_keys))
    dists, idxs = [], []
    for block in queries.split(rows):
        # |q|^2 - 2 q.k + |k|^2: one matmul per block, the FAISS IndexFlatL2 formulation
        d = torch.addmm(key_sq, block, keys.T, alpha=-2).add_(block.pow(2).sum(1, keepdim=True))
        dist, idx = d.clamp_min_(0).topk(k, dim=1, largest=False, sorted=True)
        dists.append(dist)
        idxs.append(idx)
    if not dists:
        empty = queries.new_zeros(0, k)
        return empty, empty.long()
    return torch.cat(dists), torch.cat(idxs)


@torch.no_grad()
def knn_faiss(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `knn_exact` through FAISS brute force (GPU when the build and tensors allow)."""
    try:
        import faiss
    except ImportError:
        raise ConfigError("method.knn = 'faiss' needs FAISS: pip install 'esskit[faiss]' "
                          "(faiss-gpu) or faiss-cpu, or set method.knn = 'torch'") from None
    _check_k(k, keys.shape[0])
    device = queries.device
    xq = queries.detach().float().contiguous()
    xb = keys.detach().float().contiguous()
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
        import faiss.contrib.torch_utils  # noqa: F401  (lets FAISS take torch CUDA tensors)
        dist, idx = faiss.knn_gpu(faiss.StandardGpuResources(), xq, xb, k)
        return dist, idx.long()
    dist, idx = faiss.knn(xq.cpu().numpy(), xb.cpu().numpy(), k)
    return torch.from_numpy(dist).to(device), torch.from_numpy(idx).long().to(device)


def knn_backend(name: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """The search function selected by `method.knn`."""
    if name == "faiss":
        return knn_faiss
    return lambda queries, keys, k: knn_exact(queries, keys, k, chunk_bytes)
