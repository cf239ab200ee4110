"""Segmentation metrics from a confusion matrix accumulated with bincount."""

from __future__ import annotations

import torch
import torch.distributed as dist

from esskit.data import IGNORE_INDEX

# Above this C the C x C matrix (8*C^2 bytes) is not kept; every metric needs only its diagonal,
# row sums and column sums, which are accumulated directly in O(C).
MAX_CONFUSION_CLASSES = 2048


class SegMetrics:
    """mIoU, fwIoU, pixel and mean accuracy over pixels whose target is not IGNORE_INDEX.

    `confusion[t, p]` counts pixels of target class t predicted as p (kept for C <= 2048).
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        c = num_classes
        self.confusion = torch.zeros(c, c, dtype=torch.int64, device=device) if c <= MAX_CONFUSION_CLASSES else None
        self.true_pos = torch.zeros(c, dtype=torch.int64, device=device)
        self.target_count = torch.zeros(c, dtype=torch.int64, device=device)
        self.pred_count = torch.zeros(c, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        c = self.num_classes
        valid = target != IGNORE_INDEX
        p, t = pred[valid].long().to(self.true_pos.device), target[valid].long().to(self.true_pos.device)
        if self.confusion is not None:
            self.confusion += torch.bincount(t * c + p, minlength=c * c).view(c, c)
        self.true_pos += torch.bincount(t[p == t], minlength=c)
        self.target_count += torch.bincount(t, minlength=c)
        self.pred_count += torch.bincount(p, minlength=c)

    def _tensors(self) -> list[torch.Tensor]:
        return [x for x in (self.confusion, self.true_pos, self.target_count, self.pred_count) if x is not None]

    def merge(self, other: "SegMetrics") -> "SegMetrics":
        for mine, theirs in zip(self._tensors(), other._tensors()):
            mine += theirs.to(mine.device)
        return self

    def all_reduce(self) -> "SegMetrics":
        """Sum the counts of every process (call on all ranks)."""
        if dist.is_available() and dist.is_initialized():
            for x in self._tensors():
                dist.all_reduce(x)
        return self

    @property
    def num_pixels(self) -> int:
        return int(self.target_count.sum())

    def compute(self) -> dict:
        tp, target, pred = (x.double().cpu() for x in (self.true_pos, self.target_count, self.pred_count))
        total = target.sum()
        union = target + pred - tp
        iou = tp / union  # NaN where a class is absent from both prediction and target
        acc = tp / target  # NaN where a class is absent from the target
        freq = target / total
        present = freq > 0
        return {
            "mIoU": float(iou.nanmean()),
            "fwIoU": float((freq[present] * iou[present]).sum()) if total > 0 else float("nan"),  # as mIoU
            "pAcc": float(tp.sum() / total),
            "mAcc": float(acc.nanmean()),
            "IoU": iou.tolist(),
        }
