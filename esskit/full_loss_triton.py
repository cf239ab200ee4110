"""Eq. 5 (`method.name = "ess_full"`, the exact softmax over all C classes) as fused Triton kernels,
`method.loss_kernel = "triton"`: flash-attention style, no [rows, C] logits in memory.

The chunked forms (`lean_loss.FullCrossEntropy`, torch's `linear_cross_entropy`) write each
[rows, C] logit block to memory and read it back several times; on an H100 ess_full took 2.6-2.8x
the step of ESS with its fused kernels at C = 1284. Here the logits z = (2 xh.mu - |mu|^2)/tau of a
BLOCK_N x BLOCK_C tile live only in registers:
    forward    per pixel block, over class tiles: an online logsumexp and the target's logit
    backward   per pixel block, over class tiles: dL/dxh = (2/tau) sum_c g_c mu_c, g = G w (softmax - onehot)
               per class tile and pixel split, over pixel blocks: partial dL/dmu = (2/tau) g^T xh and
               dL/d|mu|^2 = -sum g / tau, summed over splits by torch (no atomics: deterministic)
Matmuls are fp32 (`input_precision="ieee"`, no TF32), as torch's default. Fake tensors (the
profiler's estimate) take `FullCrossEntropy`.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from esskit.data import IGNORE_INDEX
from esskit.errors import ConfigError
from esskit.knn_triton import launch_ranges, require_triton, triton
from esskit.lean_loss import NORMALIZE_EPS, FullCrossEntropy, mu_grad
from esskit.loss_triton import BLOCK_N

BLOCK_C = 64  # classes per tile, by BLOCK_N pixels (tl.dot needs >= 16 on each side)
SPLIT_PROGRAMS = 2048  # the dL/dmu kernel splits the pixels so that about this many programs run


def _padded_dim(d: int) -> int:
    """DP, the kernels' tile width over d (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(d))


def shared_memory_bytes(d: int) -> int:
    """Shared memory per program of the largest of the three kernels (dL/dmu, its pixel loop pipelined
    in Triton's default 3 stages): ptxas for sm_80 and sm_90 (Triton 3.8, 4 warps) gives 34 / 51 / 83 /
    149 / 280 KB at a padded d of 16 / 32 / 64 / 128 / 256, 17.5 KB + 1 KB per padded dimension."""
    return 17_920 + 1_024 * _padded_dim(d)


def check_shared_memory(d: int, limit: int, gpu: str) -> None:
    """The one-line error where a GPU's shared memory per block (`limit` bytes) is too small for the
    kernels at this d (Triton would fail at launch with OutOfResources)."""
    needed = shared_memory_bytes(d)
    if limit and needed > limit:
        raise ConfigError(f"method.loss_kernel = 'triton' with method.name = 'ess_full' needs "
                          f"{needed // 1024} KiB of shared memory per block at model.embed_dim = {d}; "
                          f"{gpu} has {limit // 1024} KiB: set method.loss_kernel = 'torch' or a smaller "
                          f"model.embed_dim")

if triton is not None:
    import triton.language as tl

    from esskit.knn_triton import _unit_rows
    from esskit.loss_triton import _store_grad_x

    @triton.jit
    def _logit_tile(xh, mu_ptr, c0, dims, dim_ok, inv_tau, C: tl.constexpr, D: tl.constexpr,
                    BLOCK_C: tl.constexpr):
        """z [BLOCK_N, BLOCK_C] of classes c0 ... (-inf past C), the class ids and mu^T [DP, BLOCK_C]."""
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        mt = tl.load(mu_ptr + cols[None, :] * D + dims[:, None], mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
        z = (2 * tl.dot(xh, mt, input_precision="ieee") - tl.sum(mt * mt, 0)[None, :]) * inv_tau
        return tl.where(col_ok[None, :], z, -float("inf")), cols, mt

    @triton.jit
    def _full_forward(x_ptr, mu_ptr, t_ptr, loss_ptr, lse_ptr, n, inv_tau, C: tl.constexpr, D: tl.constexpr,
                      DP: tl.constexpr, NORMALIZE: tl.constexpr, IGNORE: tl.constexpr, EPS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, dims = rows < n, tl.arange(0, DP)
        dim_ok = dims < D
        xh = _unit_rows(x_ptr, rows, row_ok, dims, dim_ok, D, NORMALIZE, EPS)[1]
        t = tl.load(t_ptr + rows, mask=row_ok, other=IGNORE)
        top = tl.full([BLOCK_N], -float("inf"), tl.float32)
        total = tl.zeros([BLOCK_N], tl.float32)
        picked = tl.zeros([BLOCK_N], tl.float32)
        for c0 in range(0, C, BLOCK_C):  # online logsumexp over class tiles
            z, cols, mt = _logit_tile(xh, mu_ptr, c0, dims, dim_ok, inv_tau, C, D, BLOCK_C)
            new = tl.maximum(top, tl.max(z, 1))
            total = total * tl.exp(top - new) + tl.sum(tl.exp(z - new[:, None]), 1)
            top = new
            picked += tl.sum(tl.where(cols[None, :] == t[:, None], z, 0.0), 1)
        lse = top + tl.log(total)
        tl.store(loss_ptr + rows, (lse - picked) * (t != IGNORE).to(tl.float32), mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)

    @triton.jit
    def _softmax_grad(z, cols, t, lse, w):
        """dL/dz of a tile: w (softmax - onehot(target)); columns past C hold z = -inf, so 0."""
        return (tl.exp(z - lse[:, None]) - (cols[None, :] == t[:, None]).to(tl.float32)) * w[:, None]

    @triton.jit
    def _full_backward_x(x_ptr, mu_ptr, t_ptr, lse_ptr, grad_ptr, gx_ptr, n, inv_tau, C: tl.constexpr,
                         D: tl.constexpr, DP: tl.constexpr, NORMALIZE: tl.constexpr, IGNORE: tl.constexpr,
                         EPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, dims = rows < n, tl.arange(0, DP)
        dim_ok = dims < D
        x, xh, norm = _unit_rows(x_ptr, rows, row_ok, dims, dim_ok, D, NORMALIZE, EPS)
        t = tl.load(t_ptr + rows, mask=row_ok, other=IGNORE)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        w = (t != IGNORE).to(tl.float32) * tl.load(grad_ptr)
        gxh = tl.zeros([BLOCK_N, DP], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            z, cols, mt = _logit_tile(xh, mu_ptr, c0, dims, dim_ok, inv_tau, C, D, BLOCK_C)
            gxh += tl.dot(_softmax_grad(z, cols, t, lse, w), tl.trans(mt), input_precision="ieee")
        _store_grad_x(gx_ptr, gxh * (2 * inv_tau), xh, norm, rows, row_ok, dims, dim_ok, D, NORMALIZE, EPS)

    @triton.jit
    def _full_backward_mu(x_ptr, mu_ptr, t_ptr, lse_ptr, grad_ptr, part_ptr, n, inv_tau, C: tl.constexpr,
                          D: tl.constexpr, DP: tl.constexpr, NORMALIZE: tl.constexpr, IGNORE: tl.constexpr,
                          EPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                          SPLIT_BLOCKS: tl.constexpr):
        c0, split = tl.program_id(0) * BLOCK_C, tl.program_id(1)
        dims = tl.arange(0, DP)
        dim_ok = dims < D
        grad = tl.load(grad_ptr)
        acc = tl.zeros([BLOCK_C, DP], tl.float32)
        acc_sq = tl.zeros([BLOCK_C], tl.float32)
        # constexpr trip count (a power of two: few builds; Triton 3.6's interpreter needs it); blocks
        # past n, in the last split, weigh 0: none of their rows is valid
        for i in range(0, SPLIT_BLOCKS):
            rows = (split * SPLIT_BLOCKS + i) * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = rows < n
            xh = _unit_rows(x_ptr, rows, row_ok, dims, dim_ok, D, NORMALIZE, EPS)[1]
            t = tl.load(t_ptr + rows, mask=row_ok, other=IGNORE)
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            z, cols, mt = _logit_tile(xh, mu_ptr, c0, dims, dim_ok, inv_tau, C, D, BLOCK_C)
            g = _softmax_grad(z, cols, t, lse, (t != IGNORE).to(tl.float32) * grad)
            acc += tl.dot(tl.trans(g), xh, input_precision="ieee")
            acc_sq += tl.sum(g, 0)
        cols = c0 + tl.arange(0, BLOCK_C)
        out = part_ptr + (split * C + cols) * (D + 1)
        tl.store(out[:, None] + dims[None, :], acc * (2 * inv_tau), mask=(cols < C)[:, None] & dim_ok[None, :])
        tl.store(out + D, -acc_sq * inv_tau, mask=cols < C)


class FusedFullCrossEntropy(torch.autograd.Function):
    """`lean_loss.FullCrossEntropy` (its sum of Eq. 5 over pixels, same inputs) in three kernels."""

    @staticmethod
    def forward(ctx, x, mu, target, tau: float, normalize: bool):
        x, mu, target = x.contiguous(), mu.detach().float().contiguous(), target.contiguous()
        n, d = x.shape
        loss = torch.empty(n, dtype=torch.float32, device=x.device)
        lse = torch.empty_like(loss)
        consts = _constants(mu, normalize)
        for start, stop in launch_ranges(n, d, BLOCK_N):
            _full_forward[(triton.cdiv(stop - start, BLOCK_N),)](
                x[start:stop], mu, target[start:stop], loss[start:stop], lse[start:stop], stop - start, 1 / tau,
                **consts)
        ctx.save_for_backward(x, mu, target, lse)
        ctx.tau, ctx.normalize = tau, normalize
        return loss.sum()

    @staticmethod
    def backward(ctx, grad):
        x, mu, target, lse = ctx.saved_tensors
        (n, d), classes = x.shape, mu.shape[0]
        grad = grad.detach().float().reshape(1).contiguous()
        consts = _constants(mu, ctx.normalize)
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        acc = mu.new_zeros(classes, d + 1)
        tiles = triton.cdiv(classes, BLOCK_C)
        for start, stop in launch_ranges(n, d, BLOCK_N):
            xs, ts, ls, rows = x[start:stop], target[start:stop], lse[start:stop], stop - start
            blocks = triton.cdiv(rows, BLOCK_N)
            if gx is not None:
                _full_backward_x[(blocks,)](xs, mu, ts, ls, grad, gx[start:stop], rows, 1 / ctx.tau, **consts)
            per_split = triton.next_power_of_2(triton.cdiv(blocks, max(1, SPLIT_PROGRAMS // tiles)))
            part = mu.new_empty(triton.cdiv(blocks, per_split), classes, d + 1)
            _full_backward_mu[(tiles, part.shape[0])](xs, mu, ts, ls, grad, part, rows, 1 / ctx.tau,
                                                      SPLIT_BLOCKS=per_split, **consts)
            acc += part.sum(0)
        return gx, mu_grad(acc, mu), None, None, None


def _constants(mu: torch.Tensor, normalize: bool) -> dict:
    classes, d = mu.shape
    return dict(C=classes, D=d, DP=_padded_dim(d), NORMALIZE=normalize, IGNORE=IGNORE_INDEX,
                EPS=NORMALIZE_EPS, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C)


def fused_full_cross_entropy(x, mu, target, tau: float, normalize: bool, rows: int) -> torch.Tensor:
    """Sum over pixels of Eq. 5 (see `lean_loss.FullCrossEntropy`, whose `rows`-pixel chunks stand
    in on fake tensors)."""
    if is_fake(x):
        return FullCrossEntropy.apply(x, mu, target, tau, normalize, rows)
    require_triton(x, "method.loss_kernel")
    if x.is_cuda:
        props = torch.cuda.get_device_properties(x.device)
        check_shared_memory(x.shape[1], getattr(props, "shared_memory_per_block_optin", 0), props.name)
    return FusedFullCrossEntropy.apply(x, mu, target, tau, normalize)
