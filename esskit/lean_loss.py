"""Memory-lean softmax cross-entropies on ESS embeddings, as custom autograd functions.

With unit vectors, -|x - mu|^2/tau = (2 x.mu - |mu|^2)/tau - |x|^2/tau (the last term is the same
for all classes of a pixel and cancels in the softmax), so Eq. 6's logits over a pixel's k+1
candidates and the full softmax's logits over all C classes (Eq. 5) are dot products plus a
per-class bias. The general form also holds without normalisation (method.normalize = false).

Forward computes the loss in pixel chunks and keeps only the raw pixel embeddings [N, d] (each
chunk is normalised on the fly), the class embeddings and, for Eq. 6, the int32 candidate ids
[N, k+1]. Backward recomputes each chunk's logits and writes
    dL/dx_i  = (2/tau) sum_j g_ij mu_c(ij)     (chained through the normalisation)
    dL/dmu_c = (2/tau) sum_ij g_ij x_i - (2/tau) (sum_ij g_ij) mu_c   over the (i, j) with c(ij) = c
with g_ij = w_i (softmax_ij - [j is the target]), w_i = 0 for ignore pixels (no boolean masks:
no data-dependent shapes, so the profiler's fake tensors run it as is). No tensor of size
[N, k+1, d] or [N, C] ever exists, only chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from esskit.data import IGNORE_INDEX
from esskit.knn import chunk_ranges

NORMALIZE_EPS = 1e-12  # F.normalize's default


def unit(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    return F.normalize(x, dim=1, eps=NORMALIZE_EPS) if normalize else x


def unit_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient through x / max(|x|, eps) (F.normalize) for the output gradient `grad`."""
    norm = x.norm(dim=1, keepdim=True)
    n = norm.clamp_min(NORMALIZE_EPS)
    xh = x / n
    radial = (xh * grad).sum(1, keepdim=True) * (norm > NORMALIZE_EPS)
    return (grad - xh * radial) / n


def mu_grad(acc: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """dL/dmu from the per-class sums [C, d+1] the backward passes gather: dL/dmu through the dot
    products (columns < d), then dL/d|mu|^2 (column d) chained through |mu|^2 (the -|mu|^2/tau term)."""
    d = mu.shape[1]
    return acc[:, :d] + 2 * acc[:, d:] * mu


def _fp32(x: torch.Tensor):
    """The losses stay fp32 under autocast (matmuls would otherwise run in fp16/bf16)."""
    return torch.autocast(x.device.type, enabled=False)


def _weights(target: torch.Tensor, scale, dtype) -> torch.Tensor:
    return (target != IGNORE_INDEX).to(dtype) * scale


def _save(ctx, *tensors, tau: float, normalize: bool, rows: int) -> None:
    ctx.save_for_backward(*tensors)
    ctx.tau, ctx.normalize, ctx.rows = tau, normalize, rows


def _dense_backward(g, xc, xh, mu, tau: float, normalize: bool, gmu, gsq, need_gx: bool):
    """Chain dL/dz of one [rows, C] logit block z = (2 xh.mu - |mu|^2)/tau: accumulates dL/dmu
    (dot-product part) into `gmu` and dL/d|mu|^2 into `gsq`; returns dL/dx of the chunk (or None)."""
    gmu.addmm_(g.T, xh, alpha=2 / tau)
    gsq -= g.sum(0) / tau
    if not need_gx:
        return None
    gxh = (g @ mu) * (2 / tau)
    return unit_backward(xc, gxh) if normalize else gxh


def _candidate_logits(xc, mu, sq, cc, tau: float, normalize: bool):
    """Eq. 6 logits of one chunk [n, k+1] (up to a per-pixel constant), with what backward reuses."""
    xh, c = unit(xc, normalize), cc.long()
    m = mu[c]  # [n, k+1, d]: one chunk's candidates
    z = (2 * torch.bmm(m, xh.unsqueeze(2)).squeeze(2) - sq[c]) / tau
    return z, xh, m, c


class CandidateCrossEntropy(torch.autograd.Function):
    """sum_i w_i (-log softmax_j z_ij at j = 0) over the candidates `cand` [N, k+1] (target first):
    Eq. 6 summed over pixels. Inputs: raw pixel embeddings x [N, d] (normalised per chunk when
    `normalize`), class embeddings mu [C, d] (already normalised when `normalize`).

    `dense` computes each chunk's logits through its full [rows, C] block (one matmul, then the
    candidates' columns) and backward through two matmuls on that block, instead of gathering
    [rows, k+1, d] class embeddings, tiny batched matmuls and an index_add_ whose atomics collide
    when many pixels share few classes: the GPU-friendly form for small C, same result."""

    @staticmethod
    def forward(ctx, x, mu, cand, target, tau: float, normalize: bool, rows: int, dense: bool = False):
        with _fp32(x):
            sq = mu.pow(2).sum(1)
            total = x.new_zeros(())
            for start, stop in chunk_ranges(x.shape[0], rows, x):
                xc, cc = x[start:stop], cand[start:stop]
                z = (_full_logits(xc, mu, sq, tau, normalize)[0].gather(1, cc.long()) if dense
                     else _candidate_logits(xc, mu, sq, cc, tau, normalize)[0])
                total += ((z.logsumexp(1) - z[:, 0]) * _weights(target[start:stop], 1.0, z.dtype)).sum()
        _save(ctx, x, mu, cand, target, tau=tau, normalize=normalize, rows=rows)
        ctx.dense = dense
        return total

    @staticmethod
    def backward(ctx, grad):
        x, mu, cand, target = ctx.saved_tensors
        tau, normalize = ctx.tau, ctx.normalize
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        d = mu.shape[1]
        # [C, d+1]: dL/dmu from the dot products, then dL/d|mu|^2 (the gathered form: one index_add_)
        acc = mu.new_zeros(mu.shape[0], d + 1)
        with _fp32(x):
            sq = mu.pow(2).sum(1)
            for start, stop in chunk_ranges(x.shape[0], ctx.rows, x):
                xc = x[start:stop]
                if ctx.dense:
                    c = cand[start:stop].long()
                    full, xh = _full_logits(xc, mu, sq, tau, normalize)
                    z = full.gather(1, c)
                else:
                    z, xh, m, c = _candidate_logits(xc, mu, sq, cand[start:stop], tau, normalize)
                g = z.softmax(1)
                g[:, 0] -= 1
                g *= _weights(target[start:stop], grad, g.dtype)[:, None]  # dL/dz
                if ctx.dense:
                    full.zero_().scatter_add_(1, c, g)  # dL/d(full logits)
                    gxc = _dense_backward(full, xc, xh, mu, tau, normalize, acc[:, :d], acc[:, d],
                                          gx is not None)
                else:
                    gxh = torch.bmm(g.unsqueeze(1), m).squeeze(1) * (2 / tau)
                    gxc = unit_backward(xc, gxh) if normalize else gxh
                    src = torch.cat([(2 / tau) * xh.unsqueeze(1).expand(-1, c.shape[1], -1), g.new_full(
                        (*g.shape, 1), -1 / tau)], dim=2).mul_(g.unsqueeze(2))
                    acc.index_add_(0, c.reshape(-1), src.flatten(0, 1))
                if gx is not None:
                    gx[start:stop] = gxc
        return gx, mu_grad(acc, mu), None, None, None, None, None, None


def _full_logits(xc, mu, sq, tau: float, normalize: bool):
    """Full-softmax logits of one chunk [n, C] (up to a per-pixel constant) and the unit chunk."""
    xh = unit(xc, normalize)
    return torch.addmm(sq, xh, mu.T, beta=-1 / tau, alpha=2 / tau), xh


class FullCrossEntropy(torch.autograd.Function):
    """sum_i w_i (-log softmax_c z_ic at c = target_i) over all C classes, z = (2 x.mu - |mu|^2)/tau:
    Eq. 5 summed over pixels, `rows` pixels ([rows, C] logits) at a time."""

    @staticmethod
    def forward(ctx, x, mu, target, tau: float, normalize: bool, rows: int):
        with _fp32(x):
            sq = mu.pow(2).sum(1)
            total = x.new_zeros(())
            for start, stop in chunk_ranges(x.shape[0], rows, x):
                z = _full_logits(x[start:stop], mu, sq, tau, normalize)[0]
                t = target[start:stop]
                picked = z.gather(1, t.clamp_min(0)[:, None])[:, 0]
                total += ((z.logsumexp(1) - picked) * _weights(t, 1.0, z.dtype)).sum()
        _save(ctx, x, mu, target, tau=tau, normalize=normalize, rows=rows)
        return total

    @staticmethod
    def backward(ctx, grad):
        x, mu, target = ctx.saved_tensors
        tau, normalize = ctx.tau, ctx.normalize
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        d = mu.shape[1]
        acc = mu.new_zeros(mu.shape[0], d + 1)  # [C, d+1], as CandidateCrossEntropy's
        with _fp32(x):
            sq = mu.pow(2).sum(1)
            for start, stop in chunk_ranges(x.shape[0], ctx.rows, x):
                xc, t = x[start:stop], target[start:stop]
                z, xh = _full_logits(xc, mu, sq, tau, normalize)
                g = z.softmax(1)
                g.scatter_add_(1, t.clamp_min(0)[:, None], g.new_full((g.shape[0], 1), -1.0))
                g *= _weights(t, grad, g.dtype)[:, None]  # dL/dz
                gxc = _dense_backward(g, xc, xh, mu, tau, normalize, acc[:, :d], acc[:, d], gx is not None)
                if gx is not None:
                    gx[start:stop] = gxc
        return gx, mu_grad(acc, mu), None, None, None, None


def has_builtin_linear_cross_entropy() -> bool:
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def full_cross_entropy(x: torch.Tensor, mu: torch.Tensor, target: torch.Tensor, tau: float, normalize: bool,
                       rows: int, builtin: bool | None = None) -> torch.Tensor:
    """Eq. 5 summed over pixels. `builtin=None` uses torch's chunked linear_cross_entropy when this
    torch has it (it precomputes the gradients in forward: no recomputed logits in backward),
    except on fake tensors: the profiler's byte tracker sees every allocation of `FullCrossEntropy`
    but only the outputs of the builtin (one custom op); both use `rows`-pixel chunks."""
    if builtin is None:
        builtin = has_builtin_linear_cross_entropy() and not is_fake(x)
    if not builtin:
        return FullCrossEntropy.apply(x, mu, target, tau, normalize, rows)
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=rows, chunking_method=None)
    with _fp32(x):
        return F.linear_cross_entropy(unit(x, normalize), mu * (2 / tau), target,
                                      linear_bias=mu.pow(2).sum(1) / -tau, reduction="sum",
                                      ignore_index=IGNORE_INDEX, options=options)
