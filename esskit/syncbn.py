"""SyncBatchNorm for multi-process training, including CPU (gloo) processes.

torch.nn.SyncBatchNorm only runs on accelerators; on CPU the same batch statistics are all-reduced
with a differentiable all-reduce, so gradients also cross processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


class AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of every process's input is the sum of all output grads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole global batch (all processes).

    Replacing timm's BatchNormAct2d, it keeps that module's `drop` and `act`, and so its
    state_dict keys: checkpoints load in single-process runs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._normalize(x)
        for extra in (getattr(self, "drop", None), getattr(self, "act", None)):
            if extra is not None:
                y = extra(y)
        return y

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = torch.full((x.shape[1],), x.numel() / x.shape[1], dtype=torch.float64, device=x.device)
        stats = torch.stack([x.double().sum((0, 2, 3)), x.double().pow(2).sum((0, 2, 3)), count])
        total, total_sq, n = AllReduceSum.apply(stats)
        mean = total / n
        var = (total_sq / n - mean.pow(2)).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked + 1)
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = (1, -1, 1, 1)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm becomes a synchronised one: timm's conversion (which keeps BatchNormAct2d's
    activation) on accelerators, CpuSyncBatchNorm on CPU."""
    if device.type != "cpu":
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(model)
    return _swap_cpu(model)


def _swap_cpu(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and type(child) is not CpuSyncBatchNorm:
            sync = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            for extra in ("drop", "act"):
                if isinstance(getattr(child, extra, None), nn.Module):
                    setattr(sync, extra, getattr(child, extra))
            setattr(module, name, sync)
        else:
            _swap_cpu(child)
    return module
