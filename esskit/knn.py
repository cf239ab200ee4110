"""Exact k-nearest-neighbour search between pixel embeddings and class embeddings, and neighbour
lists shared by groups of label pixels (supp. §B: the kNN is "the major bottleneck"; adjacent
pixels' embeddings are close, so one search can serve 4 or 8 neighbouring pixels).

The search runs without gradient (paper §3.3.1: "not included in the computational graph").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from esskit.errors import ConfigError

DEFAULT_CHUNK_BYTES = 64 * 2**20  # = method.knn_chunk_mib default


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


def chunk_ranges(n: int, rows: int, like: torch.Tensor | None = None):
    """(start, stop) of consecutive `rows`-row chunks of n rows.

    On fake tensors (`like`; the profiler's memory estimate) only the first and the last chunk:
    every loop that uses this writes into outputs allocated before it and frees each chunk's
    buffers before the next, so the full-size chunks between allocate exactly what the first one
    does and the peak is unchanged; skipping them keeps a C = 100,000 estimate in seconds.
    """
    starts = range(0, n, rows)
    if like is not None and is_fake(like) and len(starts) > 2:
        starts = [starts[0], starts[-1]]
    return ((start, min(start + rows, n)) for start in starts)


def _knn_blocks(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk_bytes: int):
    num_keys, num_queries = keys.shape[0], queries.shape[0]
    _check_k(k, num_keys)
    key_sq = keys.pow(2).sum(1)
    rows = max(1, chunk_bytes // (4 * num_keys))
    dists = queries.new_empty(num_queries, k)
    idxs = torch.empty(num_queries, k, dtype=torch.int64, device=queries.device)
    # One [rows, C] buffer for every block: fresh blocks were 1.0-2x slower on a CPU
    # (profiling/README.md, "The chunked kNN"), and two were alive while the next was written.
    buffer = queries.new_empty(min(rows, num_queries), num_keys)
    for start, stop in chunk_ranges(num_queries, rows, queries):
        # |k|^2 - 2 q.k: one matmul per block, the FAISS IndexFlatL2 formulation. |q|^2 is the same
        # for every key of a row, so it is added to the k found below, not to the whole block.
        block = torch.addmm(key_sq, queries[start:stop], keys.T, alpha=-2, out=buffer[:stop - start])
        if k == 1:  # prediction's nearest class: a plain min (H200: topk is 10x slower than the block's reads)
            torch.min(block, dim=1, keepdim=True, out=(dists[start:stop], idxs[start:stop]))
        else:
            torch.topk(block, k, dim=1, largest=False, sorted=True, out=(dists[start:stop], idxs[start:stop]))
    return dists.add_(queries.pow(2).sum(1, keepdim=True)).clamp_min_(0), idxs


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
    """The search function selected by `method.knn` ("auto": the fused kernel on CUDA tensors,
    2-5x faster than the chunked search on an H100, and the chunked search elsewhere). The fused
    ones also build Eq. 6's candidates in one kernel (`knn_triton.FusedSearch.candidates`)."""
    if name == "faiss":
        return knn_faiss
    exact = lambda queries, keys, k: knn_exact(queries, keys, k, chunk_bytes)  # noqa: E731
    if name == "torch":
        return exact
    from esskit.knn_triton import FusedSearch
    return FusedSearch(exact, always=name == "triton")


@dataclass(frozen=True)
class GridNeighbours:
    """k nearest keys searched once per cell of a coarse grid [B, h, w] and shared by the label
    pixels [B, H, W] each cell covers: label row y belongs to cell row `row_cell[y]`, column x to
    `col_cell[x]`. Label pixels are numbered like `pixels_last` rows (image, row, column)."""

    table: torch.Tensor  # [B*h*w, k] key ids, nearest first
    grid: tuple[int, int]  # (h, w)
    row_cell: torch.Tensor  # [H] int64 in 0..h-1
    col_cell: torch.Tensor  # [W] int64 in 0..w-1

    def cells(self, start: int, stop: int) -> torch.Tensor:
        """Cell ids of the label pixels start..stop-1."""
        (h, w), height, width = self.grid, self.row_cell.shape[0], self.col_cell.shape[0]
        i = torch.arange(start, stop, device=self.table.device)
        image, rest = i // (height * width), i % (height * width)
        return (image * h + self.row_cell[rest // width]) * w + self.col_cell[rest % width]

    def lookup(self, start: int, stop: int) -> torch.Tensor:
        return self.table[self.cells(start, stop)]


def covering_cells(label_size: int, grid_size: int, device=None) -> torch.Tensor:
    """The grid cell nearest to each label pixel centre, as F.interpolate(mode="nearest-exact")
    picks it: floor((y + 0.5) * h / H), in integers."""
    y = torch.arange(label_size, device=device)
    return ((2 * y + 1) * grid_size).div(2 * label_size, rounding_mode="floor").clamp_max(grid_size - 1)


def _search_grid(queries: torch.Tensor, keys: torch.Tensor, k: int, knn, normalize: bool) -> torch.Tensor:
    flat = queries.permute(0, 2, 3, 1).reshape(-1, queries.shape[1])
    return knn(F.normalize(flat, dim=1) if normalize else flat, keys, k)[1]


@torch.no_grad()
def feature_neighbours(features: torch.Tensor, label_size, keys: torch.Tensor, k: int, knn=None,
                       normalize: bool = True) -> GridNeighbours:
    """`method.knn_at = "feature"`: search once per decoder pixel (stride 4, before upsampling;
    (H/4)(W/4) queries instead of HW) and give each label pixel the list of the feature pixel
    covering it. The loss then drops each label pixel's own target from the list (Eq. 6)."""
    knn = knn or knn_exact
    h, w = features.shape[-2:]
    table = _search_grid(features.detach().float(), keys, k, knn, normalize)
    return GridNeighbours(table, (h, w), covering_cells(label_size[0], h, table.device),
                          covering_cells(label_size[1], w, table.device))


@torch.no_grad()
def block_neighbours(label_emb: torch.Tensor, block: int, keys: torch.Tensor, k: int, knn=None,
                     normalize: bool = True) -> GridNeighbours:
    """`method.knn_block = b`: one search per b x b block of label pixels (partial blocks at the
    border), shared by the block. The query is the block centre in the mean-direction sense: the
    mean of the block's normalised embeddings, normalised again (not the union of the pixels'
    lists, which would need every pixel's search and defeat the purpose)."""
    knn = knn or knn_exact
    b, _, height, width = label_emb.shape
    pooled = []
    for i in range(b):  # image by image: a normalised copy of one image at a time
        m = label_emb[i:i + 1].detach().float()
        pooled.append(F.avg_pool2d(F.normalize(m, dim=1) if normalize else m, block, ceil_mode=True))
    queries = torch.cat(pooled)
    table = _search_grid(queries, keys, k, knn, normalize)
    device = table.device
    return GridNeighbours(table, tuple(queries.shape[-2:]), torch.arange(height, device=device) // block,
                          torch.arange(width, device=device) // block)
