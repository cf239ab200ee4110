"""Exact kNN as one fused Triton kernel: distances and k-selection in registers, FAISS-style.

On an H200 the chunked search (`knn.knn_exact`) spends most of its time in `torch.topk`, 10-50x
slower than the memory allows (profiling/README.md, "Measured on a GPU"). Here each program takes
BLOCK_N queries and streams the keys in tiles of BLOCK_C. It computes each tile's squared distances
as |q|^2 + |k|^2 - 2 q.k in fp32 (the FAISS IndexFlatL2 form, as `knn_exact`) and merges the
tile into a running per-query top-k held in registers: it moves the tile's smallest distance into
the slot of the current worst of the k until no query's tile minimum beats its worst, so after
the first tiles most tiles cost one min and one max. Nothing of size [N, C] is written.
profiling/knn_kernel_model.py counts each variant's instructions per tile and per merge round from
its sm_90a build, without a GPU.

`method.knn = "triton"` (and "auto" on CUDA GPUs, as the GPU recipes set): CUDA tensors (or any
tensors under TRITON_INTERPRET=1, which the tests use on CPUs). Fake tensors (the profiler's
estimate) take `knn_exact`, whose blocks bound this kernel's memory (it allocates only its [N, k]
outputs and |k|^2 [C]).
"""

from __future__ import annotations

import os

import torch
from torch._subclasses.fake_tensor import is_fake

from esskit.errors import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with torch's CUDA wheels on Linux, not everywhere
    triton = None

# 32 x 32 tiles, 4 warps: 76-128 registers and no spills for d = 7 ... 64 (ptxas -v, sm_90a).
BLOCK_N, BLOCK_C = 32, 32
LAUNCH_ELEMENTS = 2**31 - 1  # the kernels' offsets are int32: one launch covers fewer elements
# "auto" takes the fused kernels up to this k: the kNN keeps k slots per query in registers (no
# spills up to 64, ptxas) and the fused Eq. 6 unrolls its k + 1 candidates
FUSED_MAX_K = 64


if triton is not None:
    @triton.jit
    def _key_tile(k_ptr, cols, dims, C: tl.constexpr, D: tl.constexpr):
        """Keys cols as a [DP, BLOCK_C] tile (zeros past C and past d)."""
        return tl.load(k_ptr + cols[None, :] * D + dims[:, None], mask=(cols[None, :] < C) & (dims[:, None] < D),
                       other=0.0)

    @triton.jit
    def _knn_kernel(q_ptr, k_ptr, ksq_ptr, out_d_ptr, out_i_ptr, n, C: tl.constexpr, D: tl.constexpr,
                    DP: tl.constexpr, KK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        dims = tl.arange(0, DP)
        slots = tl.arange(0, K_PAD)
        tile_cols = tl.arange(0, BLOCK_C)
        q = tl.load(q_ptr + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
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
        key = tl.sort(key, 1)
        out = rows[:, None] * KK + slots[None, :]
        keep = row_ok[:, None] & (slots[None, :] < KK)
        tl.store(out_d_ptr + out, (key >> 32).to(tl.int32).to(tl.float32, bitcast=True), mask=keep)
        tl.store(out_i_ptr + out, key & 0xFFFFFFFF, mask=keep)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton(x: torch.Tensor, key: str) -> None:
    """The one-line errors of `key = "triton"` where no fused kernel can run."""
    if triton is None:
        raise ConfigError(f"{key} = 'triton' needs Triton (it ships with torch's CUDA wheels); set {key} = 'torch'")
    if not (x.is_cuda or _interpreted()):
        raise ConfigError(f"{key} = 'triton' runs on a CUDA GPU; set {key} = 'torch' on the CPU")


def fused_by_default(x: torch.Tensor, k: int) -> bool:
    """What `method.knn` / `method.loss_kernel = "auto"` pick: the fused kernels for real CUDA
    tensors on GPUs Triton builds for (sm_70+) and k <= FUSED_MAX_K, the chunked torch code
    elsewhere (CPUs, fake tensors)."""
    return (k <= FUSED_MAX_K and triton is not None and x.is_cuda and not is_fake(x)
            and torch.cuda.get_device_capability(x.device) >= (7, 0))


def launch_ranges(n: int, per_row: int, block: int) -> list[tuple[int, int]]:
    """Row ranges, whole `block`s, whose int32 offsets (up to `per_row` elements a row) stay in range."""
    rows = max(block, LAUNCH_ELEMENTS // per_row // block * block)
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


@torch.no_grad()
def knn_triton(queries: torch.Tensor, keys: torch.Tensor, k: int, block_n: int = BLOCK_N, block_c: int = BLOCK_C,
               num_warps: int = 4, prefetch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
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
    q, key = queries.detach().float().contiguous(), keys.detach().float().contiguous()
    n, d = q.shape
    key_sq = key.pow(2).sum(1)  # |k|^2 once, not per tile and program (ptxas: 11 % fewer instructions a tile)
    dist = torch.empty(n, k, dtype=torch.float32, device=q.device)
    idx = torch.empty(n, k, dtype=torch.int64, device=q.device)
    for start, stop in launch_ranges(n, max(d, k), block_n):
        _knn_kernel[(triton.cdiv(stop - start, block_n),)](
            q[start:stop], key, key_sq, dist[start:stop], idx[start:stop], stop - start, C=key.shape[0], D=d,
            DP=max(16, triton.next_power_of_2(d)), KK=k, K_PAD=triton.next_power_of_2(k), BLOCK_N=block_n,
            BLOCK_C=block_c, PREFETCH=prefetch, num_warps=num_warps)
    return dist, idx
