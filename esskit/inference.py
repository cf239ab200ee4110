"""Whole-image or sliding-window inference (mmseg's `mode='slide'`) for images larger than a crop."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from esskit.config import EvalConfig
from esskit.data.transforms import keep_ratio_size
from esskit.losses import upsample

MAP_KEYS = ("logits", "embeddings")  # per-pixel outputs; other keys (class embeddings) pass through


def _windows(size: int, crop: int, stride: int) -> list[int]:
    """Window starts covering [0, size): a regular grid plus a last window flush with the edge."""
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride))
    return starts + [size - crop]


@torch.no_grad()
def infer(model: torch.nn.Module, images: torch.Tensor, cfg: EvalConfig, coarse: bool = False) -> dict:
    """The model's output dict with per-pixel maps at the images' resolution. With `eval.scale` the
    model sees the images rescaled into that box (mmseg's test-time Resize, keep_ratio) and the maps
    are upsampled back to the images' own size. `coarse` leaves a whole-image output at the model's
    resolution, for `predict_labels`, which upsamples it the same way and can then search there
    (method.knn_at = "feature_exact").

    Sliding windows average the upsampled per-pixel outputs where windows overlap: logits for the
    baseline, embeddings for ESS (unit ones when its loss normalises; `predict_labels` renormalises
    the mean), which ranks classes as averaging ESS's logits would."""
    size = images.shape[-2:]
    if cfg.scale:
        scaled = keep_ratio_size(size, cfg.scale)
        if scaled != list(size):
            output = infer(model, F.interpolate(images, scaled, mode="bilinear", align_corners=False),
                           replace(cfg, scale=[]))
            emb = output.get("embeddings")
            if (cfg.mode == "whole" and emb is not None and output.get("normalize", True)
                    and not output.get("unit_at_stride", False)):
                # mmseg resizes the logits, which for ESS are linear in the unit x^ at this size
                # (the slide mean above already averages unit vectors, as mmseg averages logits)
                output = {**output, "embeddings": F.normalize(emb.float(), dim=1)}
            return {k: upsample(v, size) if k in MAP_KEYS else v for k, v in output.items()}
    if cfg.mode == "whole":
        output = model(images)
        return output if coarse else {k: upsample(v.float(), size) if k in MAP_KEYS else v for k, v in output.items()}
    (ch, cw), (sh, sw) = cfg.crop, cfg.stride
    total, count, rest = None, images.new_zeros(1, 1, *size), {}
    for top in _windows(size[0], ch, sh):
        for left in _windows(size[1], cw, sw):
            window = images[..., top:top + ch, left:left + cw]
            output = model(window)
            key = next(k for k in MAP_KEYS if k in output)
            part = upsample(output[key].float(), window.shape[-2:])
            if key == "embeddings" and output.get("normalize", True) and not output.get("unit_at_stride", False):
                # as mmseg averages logits: the mean of -|x^ - mu^|^2 / tau over windows ranks classes as
                # the mean of the unit x^ does (a raw x's norm, which no loss trains, would weight its window)
                part = F.normalize(part, dim=1)
            if total is None:
                total = images.new_zeros(images.shape[0], part.shape[1], *size, dtype=torch.float32)
            total[..., top:top + ch, left:left + cw] += part
            count[..., top:top + ch, left:left + cw] += 1
            rest = {k: v for k, v in output.items() if k not in MAP_KEYS}
    return {key: total / count, **rest}
