"""Exact k-nearest-neighbour search between pixel embeddings and class embeddings, and neighbour
lists shared by groups of label pixels (supp. §B: the kNN is "the major bottleneck"; adjacent
pixels' embeddings are close, so one search can serve 4 or 8 neighbouring pixels).

The search runs without gradient (paper §3.3.1: "not included in the computational graph").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from esskit.config import MethodConfig
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


def drop_target(found: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """k of the k+1 classes `found` per pixel, nearest first, without the pixel's target (or
    without the farthest when the target is not among them): negatives stay strict."""
    is_target = found == target[:, None]  # at most one per row: the kNN returns distinct classes
    at = torch.where(is_target.any(1), is_target.int().argmax(1), k)  # the target's position, or k
    slots = torch.arange(k, device=found.device)
    return found.gather(1, slots + (slots >= at[:, None]))  # skip the target's slot


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

    def lookup(self, start: int, stop: int, queries: torch.Tensor | None = None) -> torch.Tensor:
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


def bilinear_taps(out_size: int, in_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """F.interpolate(mode="bilinear", align_corners=False) along one axis: output i reads inputs
    first[i] and min(first[i] + 1, in_size - 1) with weights [out, 2] (PyTorch's source index
    (i + 0.5) * in/out - 0.5, clamped at 0)."""
    i = torch.arange(out_size, device=device, dtype=torch.float64)
    src = ((i + 0.5) * (in_size / out_size) - 0.5).clamp_min(0)
    first = src.floor().long().clamp_max(in_size - 1)
    frac = (src - first).float()
    return first, torch.stack([1 - frac, frac], 1)


def _first_tap(i: int, out_size: int, in_size: int) -> int:
    """bilinear_taps(out_size, in_size)[0][i], in Python (the same float64 arithmetic)."""
    return min(int(max((i + 0.5) * (in_size / out_size) - 0.5, 0.0)), in_size - 1)


# Keys kept per decoder pixel for knn_at = "feature_exact", as a multiple of the k+1 searched (m = 18 at
# k = 8): method.knn_bound_keys's default, one value for the config and the functions below. CPU,
# C = 1284, Eq. 6's negatives, against the search per label pixel: x2.8-3.1 on a synthetic run trained
# 150 steps (2.2-2.3 % of its pixels need the full search); x1.4-1.5 at the profiler's random-init
# cell, where 27-34 % do (x1.6 at 3(k+1), 7-10 %), and x2.3 on a synthetic dataset image there (5.5 %).
# profiling/README.md, "An exact search at the decoder's stride".
BOUNDED_CANDIDATES_PER_K = MethodConfig.knn_bound_keys
# Unions are padded to the count that covers all but UNION_CUT of the cells; the pixels of the cells
# with more ids get the full search: padding every cell to the longest union cost more than that.
UNION_CUT = 0.02
_PAD_SCORE = -1e30  # padded candidate slots: below every real score, finite so 0 weights stay 0


@dataclass(frozen=True)
class BoundedNeighbours:
    """`method.knn_at = "feature_exact"`: each label pixel's exact k nearest keys, from a search at
    the decoder's stride and a bound.

    The loss upsamples the stride-4 embeddings bilinearly, so a label pixel's x is a convex
    combination sum_i w_i f_i of four decoder pixels (the corners of its cell). Its ranking score
    s(c) = 2 x.mu_c - |mu_c|^2 (= |x|^2 - |x - mu_c|^2; on unit vectors the order of |x/|x| - mu_c|)
    is then the same combination sum_i w_i s_i(c). Each corner keeps its m nearest keys and b_i,
    the score of its (m+1)-th: no key outside its list scores above b_i there. Over the union U of
    the four lists, a pixel's k-th best score above sum_i w_i b_i proves its k best in U are its k
    nearest of all keys. Pixels the bound does not prove get the full search (`knn`).
    """

    ids: torch.Tensor  # [cells, L] int32 key ids of each cell's union U, padded with C
    bounds: torch.Tensor  # [cells, 4] b_i + slack per corner (inf where U was cut: nothing proven)
    features: torch.Tensor  # [B*h*w, d] the decoder pixels, raw
    grid: tuple[int, int, int]  # (B, h, w)
    rows: tuple[torch.Tensor, torch.Tensor]  # bilinear_taps(H, h)
    cols: tuple[torch.Tensor, torch.Tensor]  # bilinear_taps(W, w)
    keys: torch.Tensor
    k: int
    knn: object
    normalize: bool
    chunk_bytes: int

    def lookup(self, start: int, stop: int, queries: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """[stop - start, k] key ids, nearest first, of label pixels start..stop-1 (`pixels_last`
        order), whose upsampled embeddings are `queries` (for the full search where needed). With
        `target` [stop - start] (Eq. 6's negatives): the k - 1 nearest keys other than each pixel's
        target, `drop_target` of the k nearest. The target is left out of the union, so the bound
        needs one key fewer above it: more pixels are proven."""
        if getattr(self.knn, "fused", None) is not None and self.knn.fused(queries, self.k):  # one kernel
            from esskit.knn_bounded_triton import bounded_lookup_triton
            found, proved = bounded_lookup_triton(self, queries, start, target, self.k - (target is not None))
            found = found[:, 1:] if target is not None else found  # without the target column
            return self._redo(found.long(), [proved], queries, target)
        (_, _, w), width = self.grid, self.cols[0].shape[0]
        slots, d = self.ids.shape[1] + 1, self.features.shape[1]
        # a label row's temporaries: 4 x [W, L+1] at its pixels, [w, 4 + 2, L+1] and [w, L, d] at its cells
        rows = max(1, self.chunk_bytes // (4 * slots * (4 * width + (6 + d) * w)))
        found, proved = [], []
        r0 = start // width
        while r0 * width < stop:  # whole label rows, at most `rows` at a time
            r1 = min(r0 + rows, -(-stop // width))
            lo, hi = max(start, r0 * width), min(stop, r1 * width)
            band_target = target[lo - start:hi - start] if target is not None else None
            ids, ok = self._rows(r0, r1, lo - r0 * width, hi - r0 * width, band_target)
            found.append(ids)
            proved.append(ok)
            r0 = r1
        return self._redo(torch.cat(found), proved, queries, target)

    def _redo(self, found: torch.Tensor, proved: list[torch.Tensor], queries: torch.Tensor,
              target: torch.Tensor | None) -> torch.Tensor:
        """One full search for the pixels the bound did not prove (one GPU sync per call); fake
        tensors (the profiler's estimate) count every pixel, an upper bound."""
        redo = torch.arange(len(found), device=found.device) if is_fake(found) else (~torch.cat(proved)).nonzero()[:, 0]
        if len(redo):
            q = queries[redo].float()
            full = self.knn(F.normalize(q, dim=1) if self.normalize else q, self.keys, self.k)[1]
            found[redo] = full if target is None else drop_target(full, target[redo], self.k - 1)
        return found

    def _scores(self, cells: slice) -> torch.Tensor:
        """[cells, 4, L+1]: s_i(c) of each corner over U (pads: _PAD_SCORE), then b_i."""
        ids = self.ids[cells].long()
        pad = ids == self.keys.shape[0]
        ids = ids.masked_fill(pad, 0)
        mu, corners = self.keys.float(), self.features[_cell_corners(cells, self.grid, self.ids.device)]
        # unit keys (normalize): rank by 2 x.mu alone; a -|mu|^2 ~ -1 term would round the score
        # differences, ~|x| and small when the raw embeddings are, at fp32's absolute 1e-7
        sq = torch.zeros_like(mu[:, 0]) if self.normalize else mu.pow(2).sum(1)
        s = torch.baddbmm(-sq[ids][:, None, :], corners, mu[ids].transpose(1, 2), alpha=2)
        s.masked_fill_(pad[:, None, :], _PAD_SCORE)
        return torch.cat([s, self.bounds[cells, :, None]], 2)

    def _rows(self, r0: int, r1: int, lo: int, hi: int,
              target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Label rows r0..r1-1 (global: image * H + y), pixels lo..hi-1 of them -> (the k best ids
        in each pixel's union, nearest first, or the k - 1 best other than `target`; whether the
        bound proves them)."""
        (_, h, w), height = self.grid, self.rows[0].shape[0]
        label_row = torch.arange(r0, r1, device=self.ids.device)
        cell_row = label_row // height * h + self.rows[0][label_row % height]  # [R] into B*h, ascending
        # the band's cell rows, from Python ints (no GPU sync; fake tensors have no values)
        first_row, last_row = ((r // height) * h + _first_tap(r % height, height, h) for r in (r0, r1 - 1))
        s = self._scores(slice(first_row * w, (last_row + 1) * w)).view(-1, w, 4, self.ids.shape[1] + 1)
        s = s[cell_row - first_row]  # [R, w, 4, L+1]
        wy = self.rows[1][label_row % height]  # [R, 2]
        s = s[:, :, :2] * wy[:, 0, None, None, None] + s[:, :, 2:] * wy[:, 1, None, None, None]  # [R, w, 2, L+1]
        first, wx = self.cols
        s = s[:, first, 0] * wx[:, 0, None] + s[:, first, 1] * wx[:, 1, None]  # [R, W, L+1]
        s = s.flatten(0, 1)[lo:hi]
        cell = (cell_row[:, None] * w + first).flatten()[lo:hi]
        if target is not None:
            s[:, :-1].masked_fill_(self.ids[cell] == target[:, None], _PAD_SCORE)
        best, slot = s[:, :-1].topk(self.k - (target is not None), dim=1)
        return self.ids.view(-1)[cell[:, None] * self.ids.shape[1] + slot].long(), best[:, -1] > s[:, -1]


@torch.no_grad()
def bounded_neighbours(features: torch.Tensor, label_size, keys: torch.Tensor, k: int, knn=None,
                       normalize: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                       per_k: int = BOUNDED_CANDIDATES_PER_K) -> BoundedNeighbours | None:
    """`method.knn_at = "feature_exact"` (see `BoundedNeighbours`): one search per decoder pixel of
    `features` [B, d, h, w] for m = per_k * k keys, and each cell's union of its corners' lists
    (their scores are computed as the label pixels are looked up). None where C is too small for
    the bound to save work (C <= 2m), or without pixels: the caller searches every label pixel."""
    knn = knn or knn_exact
    (batch, d, h, w), num_keys = features.shape, keys.shape[0]
    m = per_k * k
    if num_keys <= 2 * m or features.numel() == 0:  # an empty batch: the caller's plain search returns nothing
        return None
    # raw: s is linear in x, not x/|x|; contiguous (one image's reshape is a strided view, and the
    # lookup kernels read rows by offset)
    f = features.detach().float().permute(0, 2, 3, 1).reshape(-1, d).contiguous()
    dist, idx = knn(f, keys, m + 1)
    f_sq = f.pow(2).sum(1)
    # b_i = |f|^2 - dist to the (m+1)-th, plus a slack far above fp32 rounding of these scores
    bound = f_sq - dist[:, m] + 1e-5 * (1 + f_sq.sqrt()).pow(2)
    if normalize:  # the scores leave out |mu|^2 (unit keys: 1 up to rounding, far below the slack)
        bound += keys.float().pow(2).sum(1)[idx[:, m]]
    height, width = label_size
    cells = batch * h * w
    lists = idx.new_empty(cells, 4 * m, dtype=torch.int32)
    count = torch.empty(cells, dtype=torch.int64, device=f.device)
    bounds = f.new_empty(cells, 4)
    for start, stop in chunk_ranges(cells, max(1, chunk_bytes // (8 * 4 * m * 3)), f):
        corners = _cell_corners(slice(start, stop), (batch, h, w), f.device)
        lists[start:stop], count[start:stop] = _distinct_first(idx[:, :m][corners].flatten(1), num_keys)
        bounds[start:stop] = bound[corners]
    # pad to the count that all but UNION_CUT of the cells fit in; fake tensors (the profiler's
    # estimate) keep all 4m, an upper bound
    slots = 4 * m if is_fake(f) else int(count.kthvalue(max(1, math.ceil((1 - UNION_CUT) * cells))).values)
    ids = lists[:, :slots].clone()
    del lists
    bounds.masked_fill_((count > slots)[:, None], float("inf"))  # a cut union proves nothing
    return BoundedNeighbours(ids, bounds, f, (batch, h, w), bilinear_taps(height, h, f.device),
                             bilinear_taps(width, w, f.device), keys, k, knn, normalize, chunk_bytes)


def _cell_corners(cells: slice, grid: tuple[int, int, int], device) -> torch.Tensor:
    """[cells, 4] decoder pixels at the corners (top-left, top-right, bottom-left, bottom-right) of
    cells (image, i, j) = (image * h + i) * w + j of `grid` (B, h, w)."""
    _, h, w = grid
    cell = torch.arange(cells.start, cells.stop, device=device)
    row, j = cell // w, cell % w  # row = image * h + i
    down = (row % h < h - 1).long() * w  # the last row's cells repeat it (F.interpolate's clamp)
    right = (j < w - 1).long()
    top = row * w + j
    return torch.stack([top, top + right, top + down, top + down + right], 1)


def _distinct_first(lists: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's distinct ids first, ascending, then num_keys in place of repeats -> (ids, counts)."""
    ids = lists.sort(1).values
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    return ids.masked_fill(repeat, num_keys).sort(1).values, (~repeat).sum(1)
