"""`method.knn_at = "feature_exact"`'s lookup in two Triton kernels: each label pixel's nearest classes
from its cell's union, proven by the bilinear bound (`knn.BoundedNeighbours`), and Eq. 6's
candidates built in the same pass.

The torch lookup (`BoundedNeighbours._rows`) interpolates [cells, 4, L+1] corner scores and runs a
`topk` per band of label rows, some ten kernels and a [pixels, L+1] tensor per band. Here:
- `_corner_scores_kernel` writes the scores s_i(c) = 2 f_i.mu_c - |mu_c|^2 of a band's cells, each
  corner i over the cell's union [L] ([cells, 4, L]). The class embeddings are gathered once per
  cell, not once per label pixel (16x fewer at stride 4): these gathers of 4-byte values from
  scattered rows are what a per-pixel kernel would spend its time on.
- `_bounded_kernel` takes BLOCK_N label pixels. It reads its cell's scores (contiguous, shared by
  the ~16 pixels of the cell), interpolates them and the corners' bounds as `_rows` does, sorts in
  registers and writes the ids and whether the bound proves them.
With a target (Eq. 6) the target is left out of the union before the sort, and the pixel is proven
when its k-th best other class beats the bound: the k nearest classes other than the target are
what `knn.drop_target` keeps of the k+1 nearest, and this needs one fewer class above the bound.
Unproven pixels get the fused per-pixel search (`knn_triton`), as in the torch lookup. Where the
fused kernels run: `knn_triton.FusedSearch` (method.knn = "triton", and "auto" on CUDA GPUs).
Not yet timed on a GPU.
"""

from __future__ import annotations

import torch

from esskit.knn import _PAD_SCORE, _first_tap, chunk_ranges
from esskit.knn_triton import LAUNCH_ELEMENTS, candidates_triton, launch_ranges, triton

# Cells (corner scores) and label pixels (lookup) per program: these many union slots, whatever the
# padded union width LP (32 ... 128). ptxas (sm_90a, 4 warps, d = 12): 91-94 and 111-126 registers,
# no spills; twice as many slots take ~200 registers, four times spill.
CELL_ELEMENTS = 512
PIXEL_ELEMENTS = 1024

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _corner_scores_kernel(ids_ptr, f_ptr, mu_ptr, musq_ptr, s_ptr, n, cell0, h, w, L, C, D: tl.constexpr,
                              LP: tl.constexpr, BLOCK: tl.constexpr, PAD: tl.constexpr):
        """Cells cell0 + rows: s[row, i, slot] = 2 f_i.mu_c - |mu_c|^2, c the union's id in slot, f_i the
        corners (top-left, top-right, bottom-left, bottom-right; as knn._cell_corners); pads: PAD.
        ids: the unions of cells cell0 onwards."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        row_ok = rows < n
        cell = cell0 + rows
        slots = tl.arange(0, LP)
        keep = row_ok[:, None] & (slots[None, :] < L)
        ids = tl.load(ids_ptr + rows[:, None] * L + slots[None, :], mask=keep, other=C)
        real = ids < C
        key = tl.where(real, ids, 0)
        grid_row, j = cell // w, cell % w  # grid_row = image * h + i
        top = grid_row * w + j
        right = tl.where(j < w - 1, 1, 0)
        down = tl.where(grid_row % h < h - 1, w, 0)  # the last row repeats itself (F.interpolate's clamp)
        s0 = tl.zeros([BLOCK, LP], tl.float32)
        s1 = tl.zeros([BLOCK, LP], tl.float32)
        s2 = tl.zeros([BLOCK, LP], tl.float32)
        s3 = tl.zeros([BLOCK, LP], tl.float32)
        for dim in range(D):  # each class embedding read once for the four corners (unrolled: spills)
            m = tl.load(mu_ptr + key * D + dim)
            s0 += tl.load(f_ptr + top * D + dim, mask=row_ok, other=0.0)[:, None] * m
            s1 += tl.load(f_ptr + (top + right) * D + dim, mask=row_ok, other=0.0)[:, None] * m
            s2 += tl.load(f_ptr + (top + down) * D + dim, mask=row_ok, other=0.0)[:, None] * m
            s3 += tl.load(f_ptr + (top + down + right) * D + dim, mask=row_ok, other=0.0)[:, None] * m
        sq = tl.load(musq_ptr + key)
        out = s_ptr + rows[:, None] * 4 * L + slots[None, :]
        tl.store(out, tl.where(real, 2 * s0 - sq, PAD), mask=keep)
        tl.store(out + L, tl.where(real, 2 * s1 - sq, PAD), mask=keep)
        tl.store(out + 2 * L, tl.where(real, 2 * s2 - sq, PAD), mask=keep)
        tl.store(out + 3 * L, tl.where(real, 2 * s3 - sq, PAD), mask=keep)

    @triton.jit
    def _bounded_kernel(s_ptr, t_ptr, ids_ptr, bounds_ptr, row_first_ptr, row_w_ptr, col_first_ptr, col_w_ptr,
                        out_ptr, ok_ptr, n, start, cell0, H, W, h, w, L, C, LP: tl.constexpr, KK: tl.constexpr,
                        HAS_TARGET: tl.constexpr, BLOCK_N: tl.constexpr):
        """Label pixels start + rows: the KK best classes of the cell's union (without the target if
        HAS_TARGET, written after it: [n, KK + 1]; else [n, KK]) and whether the bound proves them.
        s, ids: the corner scores and unions of cells cell0 onwards (offsets within a band: int32)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        pixel = start + rows  # (image, y, x), as losses.pixels_last numbers them
        image, rest = pixel // (H * W), pixel % (H * W)
        y, xc = rest // W, rest % W
        wy0 = tl.load(row_w_ptr + 2 * y, mask=row_ok, other=0.0)
        wy1 = tl.load(row_w_ptr + 2 * y + 1, mask=row_ok, other=0.0)
        wx0 = tl.load(col_w_ptr + 2 * xc, mask=row_ok, other=0.0)
        wx1 = tl.load(col_w_ptr + 2 * xc + 1, mask=row_ok, other=0.0)
        cell = (image * h + tl.load(row_first_ptr + y, mask=row_ok, other=0)) * w + tl.load(
            col_first_ptr + xc, mask=row_ok, other=0)
        # the corners' scores and bounds, interpolated as BoundedNeighbours._rows does: rows, then
        # columns; an inf bound (a cut union) proves nothing
        slots = tl.arange(0, LP)
        keep = row_ok[:, None] & (slots[None, :] < L)
        s = s_ptr + (cell - cell0)[:, None] * 4 * L + slots[None, :]
        left = (tl.load(s, mask=keep, other=0.0) * wy0[:, None]
                + tl.load(s + 2 * L, mask=keep, other=0.0) * wy1[:, None])
        right = (tl.load(s + L, mask=keep, other=0.0) * wy0[:, None]
                 + tl.load(s + 3 * L, mask=keep, other=0.0) * wy1[:, None])
        score = left * wx0[:, None] + right * wx1[:, None]
        b = bounds_ptr + 4 * cell
        bound = ((tl.load(b, mask=row_ok, other=0.0) * wy0 + tl.load(b + 2, mask=row_ok, other=0.0) * wy1) * wx0
                 + (tl.load(b + 1, mask=row_ok, other=0.0) * wy0 + tl.load(b + 3, mask=row_ok, other=0.0) * wy1) * wx1)
        ids = tl.load(ids_ptr + (cell - cell0)[:, None] * L + slots[None, :], mask=keep, other=C)
        real = ids < C  # unions are padded with C
        if HAS_TARGET:
            t = tl.maximum(tl.load(t_ptr + rows, mask=row_ok, other=0), 0)  # ignore pixels: class 0
            real = real & (ids != t[:, None])
        # descending score = ascending -score; fp32 bits made to order as signed ints (negatives' low
        # 31 bits flipped), then (order, id) in one int64 key: one sort, ties by id
        bits = tl.where(real, -score, float("inf")).to(tl.int32, bitcast=True)
        order = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = tl.sort((order.to(tl.int64) << 32) | tl.where(real, ids, 0).to(tl.int64), 1)
        kth = tl.sum(tl.where(slots[None, :] == KK - 1, key >> 32, 0), 1).to(tl.int32)
        kth = tl.where(kth < 0, kth ^ 0x7FFFFFFF, kth).to(tl.float32, bitcast=True)
        proved = -kth > bound  # false where the bound is inf or NaN (0 x inf) and past the union's end
        found = (key & 0xFFFFFFFF).to(tl.int32)
        keep = row_ok[:, None] & (slots[None, :] < KK)
        if HAS_TARGET:
            tl.store(out_ptr + rows[:, None] * (KK + 1) + 1 + slots[None, :], found, mask=keep)
            tl.store(out_ptr + rows * (KK + 1), t.to(tl.int32), mask=row_ok)
        else:
            tl.store(out_ptr + rows[:, None] * KK + slots[None, :], found, mask=keep)
        tl.store(ok_ptr + rows, proved.to(tl.int8), mask=row_ok)


@torch.no_grad()
def bounded_lookup_triton(neighbours, x: torch.Tensor, start: int, target: torch.Tensor | None = None,
                          kk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Label pixels start .. start + len(x) - 1 of `neighbours` (a `knn.BoundedNeighbours`): (ids,
    proved [n] bool). Without `target`, ids [n, kk] int32 are the kk nearest classes in the union
    (kk: neighbours.k); with it, [n, kk + 1] Eq. 6 candidates, the target (ignore pixels: 0) then its
    kk nearest other classes. Unproven rows are the caller's. The corner scores are computed band
    by band of label rows, each band's within neighbours.chunk_bytes."""
    kk = neighbours.k if kk is None else kk
    keys = neighbours.keys.float().contiguous()
    num_keys, d = keys.shape
    _, h, w = neighbours.grid
    height, width = neighbours.rows[0].shape[0], neighbours.cols[0].shape[0]
    mu_sq = torch.zeros_like(keys[:, 0]) if neighbours.normalize else keys.pow(2).sum(1)  # as _scores
    # contiguous: the kernels read rows by offset (a batch of one image leaves a strided view)
    ids, bounds, features = (a.contiguous() for a in (neighbours.ids, neighbours.bounds, neighbours.features))
    slots = ids.shape[1]
    lp = max(16, triton.next_power_of_2(slots))
    block_cells, block_n = max(1, CELL_ELEMENTS // lp), max(1, PIXEL_ELEMENTS // lp)
    n, stop, device = x.shape[0], start + x.shape[0], x.device
    out = torch.empty(n, kk + (target is not None), dtype=torch.int32, device=device)
    proved = torch.empty(n, dtype=torch.int8, device=device)
    t = target.contiguous() if target is not None else proved  # unread without a target
    taps = [a.contiguous() for a in (neighbours.rows[0].int(), neighbours.rows[1], neighbours.cols[0].int(),
                                     neighbours.cols[1])]
    # label rows per band: its [cells, 4, L] fp32 scores within chunk_bytes, and under 2^31 elements
    band_bytes = min(neighbours.chunk_bytes, 4 * LAUNCH_ELEMENTS)
    band_rows = max(1, (max(1, band_bytes // (16 * slots * w)) - 1) * height // h)
    r0 = start // width
    while r0 * width < stop:
        r1 = min(r0 + band_rows, -(-stop // width))
        # the band's cell rows, from Python ints (no GPU sync), and its corner scores
        first, last = ((r // height) * h + _first_tap(r % height, height, h) for r in (r0, r1 - 1))
        cells = (last + 1 - first) * w
        scores = torch.empty(cells, 4, slots, dtype=torch.float32, device=device)
        for lo, hi in launch_ranges(cells, 4 * slots, block_cells):
            _corner_scores_kernel[(triton.cdiv(hi - lo, block_cells),)](
                ids[first * w + lo:], features, keys, mu_sq, scores[lo:hi], hi - lo, first * w + lo, h, w, slots,
                num_keys, D=d, LP=lp, BLOCK=block_cells, PAD=_PAD_SCORE, num_warps=4)
        p0, p1 = max(start, r0 * width), min(stop, r1 * width)  # the band's pixels
        for lo, hi in launch_ranges(p1 - p0, kk + 1, block_n):
            a, b = p0 - start + lo, p0 - start + hi
            _bounded_kernel[(triton.cdiv(hi - lo, block_n),)](
                scores, t[a:b], ids[first * w:], bounds, *taps, out[a:b], proved[a:b], hi - lo, p0 + lo, first * w,
                height, width, h, w, slots, num_keys, LP=lp, KK=kk, HAS_TARGET=target is not None, BLOCK_N=block_n,
                num_warps=4)
        r0 = r1
    return out, proved.bool()


@torch.no_grad()
def bounded_candidates_triton(neighbours, x: torch.Tensor, target: torch.Tensor, k: int,
                              normalize: bool) -> torch.Tensor:
    """Eq. 6's [N, k+1] int32 candidates of all label pixels from `neighbours`, as
    `knn_triton.candidates_triton` builds them from a search per pixel: the bounded lookup, then the
    fused per-pixel search for the pixels it does not prove (one GPU sync)."""
    cand, proved = bounded_lookup_triton(neighbours, x, 0, target, k)
    redo = (~proved).nonzero()[:, 0]
    # the unproven pixels' embeddings copied a chunk at a time (up to ~40 % of them at random init)
    for lo, hi in chunk_ranges(len(redo), max(1, neighbours.chunk_bytes // (4 * x.shape[1]))):
        rows = redo[lo:hi]
        cand[rows] = candidates_triton(x[rows], neighbours.keys, target[rows], k, normalize)
    return cand
