"""Sliding-window inference against whole-image inference on a context-free model."""

import pytest
import torch
import torch.nn as nn

from esskit.config import EvalConfig
from esskit.inference import _windows, infer
from esskit.models import predict_labels


class PixelwiseModel(nn.Module):
    """A 1x1 conv at full resolution: each output pixel depends on its input pixel only, so any
    window tiling must reproduce the whole-image output exactly."""

    def __init__(self, key: str, channels: int):
        super().__init__()
        self.key = key
        self.conv = nn.Conv2d(3, channels, 1)
        self.class_embeddings = nn.Parameter(torch.randn(5, channels))

    def forward(self, x):
        out = {self.key: self.conv(x)}
        if self.key == "embeddings":
            out["class_embeddings"] = self.class_embeddings
        return out


@pytest.mark.parametrize("key, channels", [("logits", 5), ("embeddings", 3)])
def test_slide_equals_whole_for_a_pixelwise_model(key, channels):
    torch.manual_seed(0)
    model = PixelwiseModel(key, channels)
    images = torch.randn(2, 3, 37, 53)
    whole = infer(model, images, EvalConfig(mode="whole"))
    slide = infer(model, images, EvalConfig(mode="slide", crop=[16, 20], stride=[10, 13]))
    torch.testing.assert_close(slide[key], whole[key])
    assert torch.equal(predict_labels(slide, (37, 53)), predict_labels(whole, (37, 53)))


def test_windows_cover_every_pixel_and_stay_inside():
    for size, crop, stride in [(37, 16, 10), (16, 16, 5), (10, 16, 5), (100, 30, 30)]:
        starts = _windows(size, crop, stride)
        covered = torch.zeros(size, dtype=torch.bool)
        for s in starts:
            assert 0 <= s and s + min(crop, size) <= size
            covered[s:s + crop] = True
        assert covered.all()
