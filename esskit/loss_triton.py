"""Eq. 6 as two fused Triton kernels (`method.loss_kernel = "triton"`): the loss over each pixel's k+1
candidates without any [rows, k+1, d] or [rows, C] tensor in memory.

`lean_loss.CandidateCrossEntropy` gathers [rows, k+1, d] candidate embeddings, multiplies them in
batched matmuls and scatters gradients from a [rows, k+1, d+1] tensor: on an H100 at C = 1284 that
gather alone took as long as the fused kNN (profiling/README.md, "Measured on a GPU"). Here a
program takes BLOCK_N pixels, reads each candidate's class embedding straight from the [C, d]
table (it stays in cache), and keeps logits and gradients in registers:
    forward   z_ij = (2 xh_i.mu_c(ij) - |mu_c(ij)|^2)/tau, an online logsumexp, loss_i = w_i (lse_i - z_i0)
    backward  g_ij = G w_i (exp(z_ij - lse_i) - [j = 0]); dL/dxh_i = (2/tau) sum_j g_ij mu_c(ij),
              chained through the normalisation; dL/dmu_c and dL/d|mu_c|^2 summed over pixels
(the same algebra as `lean_loss`; the kNN's exclusion of the target and the candidate order are the
caller's). Fake tensors (the profiler's estimate) take `CandidateCrossEntropy`'s gathered form.

Two ways to sum dL/dmu over pixels. Above LOCAL_MAX_CLASSES classes, atomic adds into [C, d+1].
Up to it, each program sums its pixels per class in registers, as the one-hot matmul
g_by_class^T xh (g_by_class [rows, C]: the g_ij scattered to their classes), and writes one partial
that torch sums: no atomics, and deterministic. Why: on the H100, ESS minus its kNN took 61.7 / 57.8
/ 53.1 ms at C = 19 / 150 / 1284 against the whole baseline step's 45.3 / 55.2 ms at C = 19 / 150,
an extra that shrinks as C grows, as contention would: at C = 19, 2 M pixels x 9 candidates x 13
atomic adds meet on 247 addresses (profiling/README.md; a guess until timed).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from esskit.data import IGNORE_INDEX
from esskit.errors import ConfigError
from esskit.knn_triton import FUSED_MAX_K, _unit_rows, launch_ranges, require_triton, triton
from esskit.lean_loss import NORMALIZE_EPS, CandidateCrossEntropy, mu_grad

BLOCK_N = 64  # pixels per program
# Copies of the [C, d+1] gradient accumulator, program i adding into copy i % ACC_REPLICAS: fewer
# atomics meet at one address when many pixels share few classes. 1 is what the H100 timed;
# profiling/bench_loss.py's ess_fused_r16 tries 16.
ACC_REPLICAS = 1
# Up to LOCAL_MAX_CLASSES classes and d = LOCAL_MAX_DIM (the paper's d is 7-12) the backward sums
# per class in registers: g_by_class [LOCAL_BLOCK_N, C_pad], partials [C_pad, 16]. ptxas (sm_90a,
# 4 warps) gives 128-255 registers and 0-28 bytes of spills for C = 16 ... 256 at 16 rows, where 32
# rows or d = 32 spill kilobytes. LOCAL_PROGRAMS partials are summed by torch. Not yet timed on a
# GPU: profiling/bench_loss.py's ess_fused_atomic sets LOCAL_MAX_CLASSES = 0 to compare.
LOCAL_MAX_CLASSES = 256
LOCAL_MAX_DIM = 15
LOCAL_BLOCK_N = 16
LOCAL_PROGRAMS = 1024

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _store_grad_x(gx_ptr, gxh, xh, norm, rows, row_ok, dims, dim_ok, D: tl.constexpr, NORMALIZE: tl.constexpr,
                      EPS: tl.constexpr):
        """Writes dL/dx from dL/dxh, through x / max(|x|, eps) as lean_loss.unit_backward."""
        if NORMALIZE:
            radial = tl.sum(xh * gxh, 1) * (norm > EPS).to(tl.float32)
            gx = (gxh - xh * radial[:, None]) / tl.maximum(norm, EPS)[:, None]
        else:
            gx = gxh
        tl.store(gx_ptr + rows[:, None] * D + dims[None, :], gx, mask=row_ok[:, None] & dim_ok[None, :])

    @triton.jit
    def _candidate_logit(xh, mu_ptr, cand_ptr, rows, row_ok, dims, dim_ok, inv_tau, j: tl.constexpr,
                         D: tl.constexpr, K1: tl.constexpr):
        c = tl.load(cand_ptr + rows * K1 + j, mask=row_ok, other=0)
        mu = tl.load(mu_ptr + c[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        return (2 * tl.sum(xh * mu, 1) - tl.sum(mu * mu, 1)) * inv_tau, c, mu

    @triton.jit
    def _candidate_grad(xh, lse, w, mu_ptr, cand_ptr, rows, row_ok, dims, dim_ok, inv_tau, j: tl.constexpr,
                        D: tl.constexpr, K1: tl.constexpr):
        """dL/dz_ij = w_i (softmax_ij - [j = 0]) of candidate j, its class ids and embeddings."""
        z, c, mu = _candidate_logit(xh, mu_ptr, cand_ptr, rows, row_ok, dims, dim_ok, inv_tau, j, D, K1)
        g = tl.exp(z - lse) * w
        if j == 0:  # softmax minus the one-hot target
            g -= w
        return g, c, mu

    @triton.jit
    def _eq6_forward(x_ptr, mu_ptr, cand_ptr, t_ptr, loss_ptr, lse_ptr, n, inv_tau, D: tl.constexpr,
                     DP: tl.constexpr, K1: tl.constexpr, NORMALIZE: tl.constexpr, IGNORE: tl.constexpr,
                     EPS: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, dims = rows < n, tl.arange(0, DP)
        dim_ok = dims < D
        _, xh, _ = _unit_rows(x_ptr, rows, row_ok, dims, dim_ok, D, NORMALIZE, EPS)
        z0, _, _ = _candidate_logit(xh, mu_ptr, cand_ptr, rows, row_ok, dims, dim_ok, inv_tau, 0, D, K1)
        top, total = z0, tl.full([BLOCK_N], 1.0, tl.float32)
        for j in tl.static_range(1, K1):  # online logsumexp over the candidates (unrolled: k <= FUSED_MAX_K)
            z, _, _ = _candidate_logit(xh, mu_ptr, cand_ptr, rows, row_ok, dims, dim_ok, inv_tau, j, D, K1)
            new = tl.maximum(top, z)
            total = total * tl.exp(top - new) + tl.exp(z - new)
            top = new
        lse = top + tl.log(total)
        w = (tl.load(t_ptr + rows, mask=row_ok, other=IGNORE) != IGNORE).to(tl.float32)
        tl.store(loss_ptr + rows, (lse - z0) * w, mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)

    @triton.jit
    def _eq6_backward(x_ptr, mu_ptr, cand_ptr, t_ptr, lse_ptr, grad_ptr, gx_ptr, acc_ptr, acc_size, replicas, n,
                      inv_tau, D: tl.constexpr, DP: tl.constexpr, K1: tl.constexpr, NORMALIZE: tl.constexpr,
                      IGNORE: tl.constexpr, EPS: tl.constexpr, NEED_GX: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, dims = rows < n, tl.arange(0, DP)
        dim_ok = dims < D
        x, xh, norm = _unit_rows(x_ptr, rows, row_ok, dims, dim_ok, D, NORMALIZE, EPS)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        w = (tl.load(t_ptr + rows, mask=row_ok, other=IGNORE) != IGNORE).to(tl.float32) * tl.load(grad_ptr)
        live = row_ok & (w != 0)  # ignore pixels add nothing: no atomics for them
        acc_ptr += (tl.program_id(0) % replicas) * acc_size  # this program's copy of [C, d+1]
        gxh = tl.zeros([BLOCK_N, DP], tl.float32)
        for j in tl.static_range(K1):
            g, c, mu = _candidate_grad(xh, lse, w, mu_ptr, cand_ptr, rows, row_ok, dims, dim_ok, inv_tau, j, D, K1)
            gxh += g[:, None] * mu
            # dL/dmu_c = (2/tau) g xh (dot products) and dL/d|mu_c|^2 = -g/tau, per (pixel, candidate)
            tl.atomic_add(acc_ptr + c[:, None] * (D + 1) + dims[None, :], g[:, None] * xh * (2 * inv_tau),
                          mask=live[:, None] & dim_ok[None, :], sem="relaxed")
            tl.atomic_add(acc_ptr + c * (D + 1) + D, -g * inv_tau, mask=live, sem="relaxed")
        if NEED_GX:
            _store_grad_x(gx_ptr, gxh * (2 * inv_tau), xh, norm, rows, row_ok, dims, dim_ok, D, NORMALIZE, EPS)


    @triton.jit
    def _eq6_backward_local(x_ptr, mu_ptr, cand_ptr, t_ptr, lse_ptr, grad_ptr, gx_ptr, part_ptr, n, inv_tau,
                            D: tl.constexpr, DP: tl.constexpr, CP: tl.constexpr, K1: tl.constexpr,
                            NORMALIZE: tl.constexpr, IGNORE: tl.constexpr, EPS: tl.constexpr, NEED_GX: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr):
        """`_eq6_backward` for C <= CP: program p takes BLOCKS blocks of BLOCK_N pixels and writes
        its sums [CP, DP] of (2/tau) g xh (columns < D) and -g/tau (column D) per class to part_ptr.
        BLOCKS is a constexpr, a power of two (few builds): Triton 3.6's interpreter needs it."""
        dims, classes = tl.arange(0, DP), tl.arange(0, CP)
        dim_ok = dims < D
        acc = tl.zeros([CP, DP], tl.float32)
        acc_norm = tl.zeros([CP], tl.float32)
        for b in range(BLOCKS):
            rows = (tl.program_id(0) * BLOCKS + b) * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = rows < n
            x, xh, norm = _unit_rows(x_ptr, rows, row_ok, dims, dim_ok, D, NORMALIZE, EPS)
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            # past n and at ignore pixels w = 0: g = 0, so they add nothing
            w = (tl.load(t_ptr + rows, mask=row_ok, other=IGNORE) != IGNORE).to(tl.float32) * tl.load(grad_ptr)
            gxh = tl.zeros([BLOCK_N, DP], tl.float32)
            g_by_class = tl.zeros([BLOCK_N, CP], tl.float32)
            for j in tl.static_range(K1):
                g, c, mu = _candidate_grad(xh, lse, w, mu_ptr, cand_ptr, rows, row_ok, dims, dim_ok, inv_tau, j,
                                           D, K1)
                gxh += g[:, None] * mu
                g_by_class += tl.where(c[:, None] == classes[None, :], g[:, None], 0.0)  # repeats add up
            acc += tl.dot(tl.trans(g_by_class), xh, input_precision="ieee")  # fp32 FMAs: exact as the atomics
            acc_norm += tl.sum(g_by_class, 0)
            if NEED_GX:
                _store_grad_x(gx_ptr, gxh * (2 * inv_tau), xh, norm, rows, row_ok, dims, dim_ok, D, NORMALIZE, EPS)
        acc = tl.where(dims[None, :] == D, -acc_norm[:, None], 2 * acc) * inv_tau  # column D: padding until now
        tl.store(part_ptr + tl.program_id(0) * CP * DP + classes[:, None] * DP + dims[None, :], acc)


def _constants(x: torch.Tensor, cand: torch.Tensor, normalize: bool, block_n: int) -> dict:
    d = x.shape[1]
    return dict(D=d, DP=triton.next_power_of_2(d), K1=cand.shape[1], NORMALIZE=normalize,
                IGNORE=IGNORE_INDEX, EPS=NORMALIZE_EPS, BLOCK_N=block_n)


def _local_partials_sum(args: tuple, n: int, classes: int, inv_tau: float, need_gx: bool, consts: dict) -> torch.Tensor:
    """`_eq6_backward_local` over n pixels: the [C, d+1] sum of its programs' partials."""
    d = consts["D"]
    cp, dp = max(16, triton.next_power_of_2(classes)), max(16, triton.next_power_of_2(d + 1))
    blocks = triton.next_power_of_2(triton.cdiv(triton.cdiv(n, LOCAL_BLOCK_N), LOCAL_PROGRAMS))
    programs = triton.cdiv(n, LOCAL_BLOCK_N * blocks)
    part = args[1].new_empty(programs, cp, dp)
    consts = {**consts, "DP": dp, "BLOCK_N": LOCAL_BLOCK_N}
    _eq6_backward_local[(programs,)](*args, part, n, inv_tau, CP=cp, NEED_GX=need_gx, BLOCKS=blocks, **consts)
    return part.sum(0)[:classes, :d + 1]


class FusedCandidateCrossEntropy(torch.autograd.Function):
    """`lean_loss.CandidateCrossEntropy` (its sum of Eq. 6 over pixels, same inputs) in two kernels."""

    @staticmethod
    def forward(ctx, x, mu, cand, target, tau: float, normalize: bool):
        x, mu, cand, target = x.contiguous(), mu.detach().float().contiguous(), cand.contiguous(), target.contiguous()
        n = x.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=x.device)
        lse = torch.empty_like(loss)
        block_n = BLOCK_N
        consts = _constants(x, cand, normalize, block_n)
        for start, stop in launch_ranges(n, max(x.shape[1], cand.shape[1]), block_n):
            _eq6_forward[(triton.cdiv(stop - start, block_n),)](
                x[start:stop], mu, cand[start:stop], target[start:stop], loss[start:stop], lse[start:stop],
                stop - start, 1 / tau, **consts)
        ctx.save_for_backward(x, mu, cand, target, lse)
        # the forward's constants, read once: a benchmark that swaps them around a forward
        # (bench_loss.py's ess_fused_b32) must get the same ones in its backward
        ctx.tau, ctx.normalize, ctx.replicas, ctx.block_n = tau, normalize, ACC_REPLICAS, block_n
        ctx.local = mu.shape[0] <= LOCAL_MAX_CLASSES and mu.shape[1] <= LOCAL_MAX_DIM
        return loss.sum()

    @staticmethod
    def backward(ctx, grad):
        x, mu, cand, target, lse = ctx.saved_tensors
        d, need_gx = mu.shape[1], ctx.needs_input_grad[0]
        gx = torch.empty_like(x) if need_gx else x  # (not written without NEED_GX)
        grad = grad.detach().float().reshape(1).contiguous()
        consts = _constants(x, cand, ctx.normalize, ctx.block_n)
        acc = mu.new_zeros(1 if ctx.local else ctx.replicas, mu.shape[0], d + 1)
        for start, stop in launch_ranges(x.shape[0], max(d, cand.shape[1]), ctx.block_n):
            args = (x[start:stop], mu, cand[start:stop], target[start:stop], lse[start:stop], grad, gx[start:stop])
            if ctx.local:
                acc[0] += _local_partials_sum(args, stop - start, mu.shape[0], 1 / ctx.tau, need_gx, consts)
            else:
                _eq6_backward[(triton.cdiv(stop - start, ctx.block_n),)](
                    *args, acc, acc[0].numel(), ctx.replicas, stop - start, 1 / ctx.tau, NEED_GX=need_gx, **consts)
        return (gx if need_gx else None), mu_grad(acc.sum(0), mu), None, None, None, None


def fused_candidate_cross_entropy(x, mu, cand, target, tau: float, normalize: bool, rows: int) -> torch.Tensor:
    """Sum over pixels of Eq. 6 (see `lean_loss.CandidateCrossEntropy`, whose gathered form in
    `rows`-pixel chunks stands in on fake tensors)."""
    if is_fake(x):
        return CandidateCrossEntropy.apply(x, mu, cand, target, tau, normalize, rows, False)
    require_triton(x, "method.loss_kernel")
    if cand.shape[1] - 1 > FUSED_MAX_K:
        raise ConfigError(f"method.loss_kernel = 'triton' unrolls the k + 1 candidates: method.k = "
                          f"{cand.shape[1] - 1} is over {FUSED_MAX_K}; set method.loss_kernel = 'torch'")
    return FusedCandidateCrossEntropy.apply(x, mu, cand, target, tau, normalize)
