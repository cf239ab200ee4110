"""Exact kNN as one fused Triton kernel: distances and k-selection in registers, FAISS-style.

On an H200 the chunked search (`knn.knn_exact`) spends most of its time in `torch.topk`, 10-50x
slower than the memory allows (profiling/README.md, "Measured on a GPU"). Here each program takes
BLOCK_N queries and streams the keys in tiles of BLOCK_C. It computes each tile's squared distances
as |q|^2 + |k|^2 - 2 q.k in fp32 (the FAISS IndexFlatL2 form, as `knn_exact`) and merges the
tile into a running per-query top-k held in registers: it moves the tile's smallest distance into
the slot of the current worst of the k until no query's tile minimum beats its worst, so after
the first tiles most tiles cost one min and one max. Nothing of size [N, C] is written.
`candidates_triton` runs the same search inside Eq. 6's candidate build: normalisation, search and
the target's removal in one kernel, writing only the [N, k+1] int32 candidates.
profiling/knn_kernel_model.py counts each variant's instructions per tile and per merge round from
its sm_90a build, without a GPU.

`method.knn = "triton"` (and "auto" on CUDA GPUs, as the GPU recipes set): CUDA tensors (or any
tensors under TRITON_INTERPRET=1, which the tests use on CPUs). Fake tensors (the profiler's
estimate) take `knn_exact`, whose blocks bound this kernel's memory (it allocates only its [N, k]
outputs and |k|^2 [C]).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch._subclasses.fake_tensor import is_fake

from esskit.errors import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with torch's CUDA wheels on Linux, not everywhere
    triton = None

# 32 x 32 tiles, 4 warps: 76-128 registers and no spills for d = 7 ... 64 (ptxas -v, sm_90a). The
# defaults of both searches; profiling/step_breakdown.py --knn-tiles times the alternatives.
BLOCK_N, BLOCK_C, NUM_WARPS, PREFETCH = 32, 32, 4, False
LAUNCH_ELEMENTS = 2**31 - 1  # the kernels' offsets are int32: one launch covers fewer elements
# "auto" takes the fused kernels up to this k: the kNN keeps k slots per query in registers (no
# spills up to 64, ptxas) and the fused Eq. 6 unrolls its k + 1 candidates
FUSED_MAX_K = 64
# and up to this d: past it the tiles outgrow sm_90's 227 KiB of shared memory (Triton's compiler:
# the ess_full forward needs 385 KiB at d = 300, the searches 256 KiB at d = 600) and Triton refuses
# the launch
FUSED_MAX_DIM = 256


if triton is not None:
    @triton.jit
    def _key_tile(k_ptr, cols, dims, C: tl.constexpr, D: tl.constexpr):
        """Keys cols as a [DP, BLOCK_C] tile (zeros past C and past d)."""
        return tl.load(k_ptr + cols[None, :] * D + dims[:, None], mask=(cols[None, :] < C) & (dims[:, None] < D),
                       other=0.0)

    @triton.jit
    def _top_k(q, k_ptr, ksq_ptr, C: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, KK: tl.constexpr,
               K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr):
        """The KK nearest keys of the queries q [BLOCK_N, DP] as sorted int64 keys (distance bits, index)
        [BLOCK_N, K_PAD] (slots past KK: +inf distance, last)."""
        dims = tl.arange(0, DP)
        slots = tl.arange(0, K_PAD)
        tile_cols = tl.arange(0, BLOCK_C)
        # Slots past k hold -inf: never the worst, so never replaced (K_PAD is a power of two).
        best_d = tl.where(slots[None, :] < KK, float("inf"), -float("inf")) + tl.zeros([BLOCK_N, K_PAD], tl.float32)
        best_i = tl.zeros([BLOCK_N, K_PAD], dtype=tl.int32)
        if PREFETCH:
            kt = _key_tile(k_ptr, tile_cols, dims, C, D)
        for c0 in range(0, C, BLOCK_C):  # C is a constexpr (one build per C): Triton 3.6's interpreter needs it
            cols = c0 + tile_cols
            col_ok = cols < C
            if PREFETCH:  # the next tile's keys are in flight while this one is merged
                kt_next = _key_tile(k_ptr, cols + BLOCK_C, dims, C, D)
            else:
                kt = _key_tile(k_ptr, cols, dims, C, D)
            # |k|^2 - 2 q.k ranks like |q - k|^2 (|q|^2 is added at the end); fp32 products, no TF32
            ksq = tl.load(ksq_ptr + cols, mask=col_ok, other=0.0)
            dist = ksq[None, :] - 2 * tl.dot(q, kt, input_precision="ieee")
            dist = tl.where(col_ok[None, :], dist, float("inf"))
            low = tl.min(dist, 1)
            worst = tl.max(best_d, 1)
            pending = tl.sum((low < worst).to(tl.int32), 0)
            while pending > 0:  # at most k rounds: each moves one tile entry into a query's top-k
                # where the known minimum (maximum) is, first of ties as argmin: one int reduction, not a pair
                at = tl.min(tl.where(dist == low[:, None], tile_cols[None, :], BLOCK_C), 1)
                worst_slot = tl.min(tl.where(best_d == worst[:, None], slots[None, :], K_PAD), 1)
                slot = (slots[None, :] == worst_slot[:, None]) & (low < worst)[:, None]
                best_d = tl.where(slot, low[:, None], best_d)
                best_i = tl.where(slot, (c0 + at)[:, None], best_i)
                dist = tl.where(tile_cols[None, :] == at[:, None], float("inf"), dist)
                low = tl.min(dist, 1)
                worst = tl.max(best_d, 1)
                pending = tl.sum((low < worst).to(tl.int32), 0)
            if PREFETCH:
                kt = kt_next
        # Ascending order in registers: non-negative fp32 bits order like their values, so one int64 key
        # (distance bits, index) per slot sorts both (slots past k: +inf, last).
        dist = tl.where(slots[None, :] < KK, tl.maximum(best_d + tl.sum(q * q, 1)[:, None], 0.0), float("inf"))
        key = (dist.to(tl.int32, bitcast=True).to(tl.int64) << 32) | best_i.to(tl.int64)
        return tl.sort(key, 1)

    @triton.jit
    def _unit_rows(x_ptr, rows, row_ok, dims, dim_ok, D: tl.constexpr, NORMALIZE: tl.constexpr, EPS: tl.constexpr):
        x = tl.load(x_ptr + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                    other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, 1))
        if NORMALIZE:
            xh = x / tl.maximum(norm, EPS)[:, None]
        else:
            xh = x
        return x, xh, norm

    @triton.jit
    def _knn_kernel(q_ptr, k_ptr, ksq_ptr, out_d_ptr, out_i_ptr, n, C: tl.constexpr, D: tl.constexpr,
                    DP: tl.constexpr, KK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        slots = tl.arange(0, K_PAD)
        dims = tl.arange(0, DP)
        q, _, _ = _unit_rows(q_ptr, rows, row_ok, dims, dims < D, D, False, 0.0)
        key = _top_k(q, k_ptr, ksq_ptr, C, D, DP, KK, K_PAD, BLOCK_N,
                     BLOCK_C, PREFETCH)
        out = rows[:, None] * KK + slots[None, :]
        keep = row_ok[:, None] & (slots[None, :] < KK)
        tl.store(out_d_ptr + out, (key >> 32).to(tl.int32).to(tl.float32, bitcast=True), mask=keep)
        tl.store(out_i_ptr + out, key & 0xFFFFFFFF, mask=keep)

    @triton.jit
    def _candidates_kernel(x_ptr, t_ptr, k_ptr, ksq_ptr, cand_ptr, n, C: tl.constexpr, D: tl.constexpr,
                           DP: tl.constexpr, KK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr, NORMALIZE: tl.constexpr,
                           EPS: tl.constexpr):
        """Eq. 6's candidates in one pass: each pixel's target (ignore pixels: class 0), then the KK - 1
        nearest classes other than it (the KK nearest without the target, or without the farthest)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        slots = tl.arange(0, K_PAD)
        dims = tl.arange(0, DP)
        _, x, _ = _unit_rows(x_ptr, rows, row_ok, dims, dims < D, D, NORMALIZE, EPS)  # as F.normalize
        key = _top_k(x, k_ptr, ksq_ptr, C, D, DP, KK, K_PAD, BLOCK_N, BLOCK_C, PREFETCH)
        t = tl.maximum(tl.load(t_ptr + rows, mask=row_ok, other=0), 0)
        # the target's slot (if found) sorts last: the first KK - 1 are the negatives, nearest first
        key = tl.sort(tl.where((key & 0xFFFFFFFF) == t[:, None], 0x7FFFFFFFFFFFFFFF, key), 1)
        out = rows[:, None] * KK + slots[None, :]
        tl.store(cand_ptr + out + 1, (key & 0xFFFFFFFF).to(tl.int32), mask=row_ok[:, None] & (slots[None, :] < KK - 1))
        tl.store(cand_ptr + rows * KK, t.to(tl.int32), mask=row_ok)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton(x: torch.Tensor, key: str) -> None:
    """The one-line errors of `key = "triton"` where no fused kernel can run."""
    if triton is None:
        raise ConfigError(f"{key} = 'triton' needs Triton (it ships with torch's CUDA wheels); set {key} = 'torch'")
    if x.shape[-1] > FUSED_MAX_DIM:
        raise ConfigError(f"{key} = 'triton' runs up to model.embed_dim = {FUSED_MAX_DIM}, not {x.shape[-1]}; "
                          f"set {key} = 'auto' or 'torch'")
    if not (x.is_cuda or _interpreted()):
        raise ConfigError(f"{key} = 'triton' runs on a CUDA GPU; set {key} = 'torch' on the CPU")


def fused_by_default(x: torch.Tensor, k: int) -> bool:
    """What `method.knn` / `method.loss_kernel = "auto"` pick: the fused kernels for real CUDA
    tensors on GPUs Triton builds for (sm_70+), k <= FUSED_MAX_K and d <= FUSED_MAX_DIM, the chunked
    torch code elsewhere (CPUs, fake tensors)."""
    return (k <= FUSED_MAX_K and x.shape[-1] <= FUSED_MAX_DIM and triton is not None and x.is_cuda and not is_fake(x)
            and torch.cuda.get_device_capability(x.device) >= (7, 0))


def launch_ranges(n: int, per_row: int, block: int) -> list[tuple[int, int]]:
    """Row ranges, whole `block`s, whose int32 offsets (up to `per_row` elements a row) stay in range."""
    rows = max(block, LAUNCH_ELEMENTS // per_row // block * block)
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


@torch.no_grad()
def knn_triton(queries: torch.Tensor, keys: torch.Tensor, k: int, block_n: int = BLOCK_N, block_c: int = BLOCK_C,
               num_warps: int = NUM_WARPS, prefetch: bool = PREFETCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `knn.knn_exact`: squared-L2 k nearest `keys` [C, d] of each query [N, d]
    -> (dist [N, k], idx [N, k]), ascending, fp32 whatever the inputs' dtype. The tile shape, warps
    and `prefetch` (load tile t+1's keys before merging tile t; not yet timed) are arguments for
    profiling/step_breakdown.py's sweep; the defaults are what the H100 timed, before the merge
    round's rewrite (profiling/README.md, "What would close the remaining gaps")."""
    from esskit.knn import _check_k, knn_exact  # knn imports this module for its backend table

    if is_fake(queries):
        return knn_exact(queries, keys, k)
    require_triton(queries, "method.knn")
    _check_k(k, keys.shape[0])
    q, key, key_sq, consts = _search_inputs(queries, keys, k)
    n = q.shape[0]
    dist = torch.empty(n, k, dtype=torch.float32, device=q.device)
    idx = torch.empty(n, k, dtype=torch.int64, device=q.device)
    for start, stop in launch_ranges(n, max(consts["D"], k), block_n):
        _knn_kernel[(triton.cdiv(stop - start, block_n),)](
            q[start:stop], key, key_sq, dist[start:stop], idx[start:stop], stop - start, **consts, BLOCK_N=block_n,
            BLOCK_C=block_c, PREFETCH=prefetch, num_warps=num_warps)
    return dist, idx


def _search_inputs(queries: torch.Tensor, keys: torch.Tensor, kk: int):
    """Both searches' inputs for the kk nearest keys: fp32 contiguous queries and keys, |k|^2 (once,
    not per tile and program: ptxas, 11 % fewer instructions a tile) and the kernel's constexprs."""
    q, key = queries.detach().float().contiguous(), keys.detach().float().contiguous()
    d = q.shape[1]
    consts = {"C": key.shape[0], "D": d, "DP": max(16, triton.next_power_of_2(d)), "KK": kk,
              "K_PAD": triton.next_power_of_2(kk)}
    return q, key, key.pow(2).sum(1), consts


@torch.no_grad()
def candidates_triton(x: torch.Tensor, mu: torch.Tensor, target: torch.Tensor, k: int,
                      normalize: bool = True) -> torch.Tensor:
    """Eq. 6's [N, k+1] int32 candidates as `losses.ess_candidates` builds them (the target, ignore
    pixels: class 0, then its k nearest other classes, nearest first) in one kernel: the pixel
    embeddings x [N, d] normalised in registers, the k+1 nearest `mu` [C, d] searched as
    `knn_triton` does, the target dropped. It allocates the output and |mu|^2 [C], nothing else:
    no chunks, no normalised copy, no [N, k+1] int64 search result."""
    require_triton(x, "method.knn")
    from esskit.knn import _check_k  # knn imports this module for its backend table
    from esskit.lean_loss import NORMALIZE_EPS

    _check_k(k + 1, mu.shape[0])
    q, key, key_sq, consts = _search_inputs(x, mu, k + 1)
    t, n = target.contiguous(), q.shape[0]
    cand = torch.empty(n, k + 1, dtype=torch.int32, device=q.device)
    for start, stop in launch_ranges(n, max(consts["D"], k + 1), BLOCK_N):
        _candidates_kernel[(triton.cdiv(stop - start, BLOCK_N),)](
            q[start:stop], t[start:stop], key, key_sq, cand[start:stop], stop - start, **consts, BLOCK_N=BLOCK_N,
            BLOCK_C=BLOCK_C, PREFETCH=PREFETCH, NORMALIZE=normalize, EPS=NORMALIZE_EPS, num_warps=NUM_WARPS)
    return cand


@dataclass(frozen=True)
class FusedSearch:
    """`method.knn = "triton"` (`always`) and `"auto"` (where `fused_by_default`): `knn_triton`, and
    Eq. 6's candidates in one kernel (`candidates_triton`); elsewhere `fallback` and None, and the
    loss builds the candidates chunk by chunk. Fake tensors (the profiler's estimate) always take
    the fallback."""

    fallback: Callable
    always: bool

    def fused(self, x: torch.Tensor, k: int) -> bool:
        return (self.always and not is_fake(x)) or fused_by_default(x, k)

    def __call__(self, queries: torch.Tensor, keys: torch.Tensor, k: int):
        return (knn_triton if self.fused(queries, k) else self.fallback)(queries, keys, k)

    def candidates(self, x: torch.Tensor, mu: torch.Tensor, target: torch.Tensor, k: int, normalize: bool,
                   neighbours=None) -> torch.Tensor | None:
        """Eq. 6's candidates, searched per pixel or, with `neighbours` (a `knn.BoundedNeighbours`,
        method.knn_at = "feature_exact"), looked up and proven in one kernel."""
        if not self.fused(x, k + 1):
            return None
        if neighbours is None:
            return candidates_triton(x, mu, target, k, normalize)
        from esskit.knn_bounded_triton import bounded_candidates_triton
        return bounded_candidates_triton(neighbours, x, target, k, normalize)
