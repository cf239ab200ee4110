"""Sliding-window inference against whole-image inference on a context-free model."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

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
    if key == "embeddings":  # windows average unit embeddings (the ESS loss trains directions only)
        slide[key], whole[key] = F.normalize(slide[key], dim=1), F.normalize(whole[key], dim=1)
    torch.testing.assert_close(slide[key], whole[key])
    assert torch.equal(predict_labels(slide, (37, 53)), predict_labels(whole, (37, 53)))


def test_slide_averages_unit_embeddings_as_mmseg_averages_logits():
    # Two windows see the overlap as 10 (cos 40, sin 40) and 1 (cos 80, sin 80): the mean of ESS's
    # logits -|x^ - mu^|^2 / tau ranks classes by the mean unit vector (60 deg: class 1 at 62 deg);
    # averaging the raw vectors would let the long one win (43 deg: class 0 at 45 deg)
    def unit(deg):
        return torch.tensor([math.cos(math.radians(deg)), math.sin(math.radians(deg))])

    class TwoWindows(nn.Module):
        calls = 0

        def forward(self, x):
            self.calls += 1
            vector = 10 * unit(40) if self.calls == 1 else unit(80)
            return {"embeddings": vector.view(1, 2, 1, 1).expand(x.shape[0], 2, *x.shape[-2:]),
                    "class_embeddings": torch.stack([unit(45), unit(62)]), "normalize": True}

    out = infer(TwoWindows(), torch.zeros(1, 3, 8, 30), EvalConfig(mode="slide", crop=[8, 20], stride=[8, 10]))
    labels = predict_labels(out, (8, 30))[0]
    assert (labels[:, :10] == 0).all() and (labels[:, 10:20] == 1).all() and (labels[:, 20:] == 1).all()


def test_windows_cover_every_pixel_and_stay_inside():
    for size, crop, stride in [(37, 16, 10), (16, 16, 5), (10, 16, 5), (100, 30, 30)]:
        starts = _windows(size, crop, stride)
        covered = torch.zeros(size, dtype=torch.bool)
        for s in starts:
            assert 0 <= s and s + min(crop, size) <= size
            covered[s:s + crop] = True
        assert covered.all()


def test_eval_scale_feeds_the_model_the_mmseg_test_size_and_scores_at_the_label_size():
    # eval.scale = [512, 2048] on a 375 x 500 VOC-sized image: the model sees 512 x 683 (mmcv's
    # rescale_size), the maps come back at 375 x 500; slide windows then tile the rescaled image
    seen = []

    class Recording(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return {"logits": x[:, :2]}

    images = torch.randn(1, 3, 375, 500)
    out = infer(Recording(), images, EvalConfig(scale=[512, 2048]))
    assert seen == [(512, 683)] and out["logits"].shape[-2:] == (375, 500)
    expected = F.interpolate(F.interpolate(images, (512, 683), mode="bilinear"), (375, 500), mode="bilinear")
    torch.testing.assert_close(out["logits"], expected[:, :2])
    seen.clear()
    infer(Recording(), images, EvalConfig(scale=[512, 2048], mode="slide", crop=[512, 512], stride=[341, 341]))
    assert seen == [(512, 512), (512, 512)]
    seen.clear()
    infer(Recording(), torch.randn(1, 3, 512, 1024), EvalConfig(scale=[512, 2048]))  # fits already: as is
    assert seen == [(512, 1024)]


def test_eval_scale_whole_equals_one_slide_window_for_ess():
    # mmseg resizes the logits at the rescaled size; ESS's are linear in the unit x^ there. Whole mode
    # must normalise before that resize, as a slide window covering the image does
    torch.manual_seed(0)
    model = PixelwiseModel("embeddings", 3)
    images = torch.randn(1, 3, 37, 53)
    whole = infer(model, images, EvalConfig(scale=[64, 96]))
    slide = infer(model, images, EvalConfig(scale=[64, 96], mode="slide", crop=[64, 96], stride=[64, 96]))
    torch.testing.assert_close(whole["embeddings"], slide["embeddings"])
    scaled = F.interpolate(images, (64, 92), mode="bilinear")  # keep_ratio_size((37, 53), [64, 96])
    expected = F.interpolate(F.normalize(model.conv(scaled), dim=1), (37, 53), mode="bilinear")
    torch.testing.assert_close(whole["embeddings"], expected)


def test_coarse_whole_image_output_is_the_models_own():
    """infer(coarse=True) leaves whole-image maps at the model's resolution for predict_labels,
    which upsamples them as infer would: the same labels; slide mode ignores it."""
    class Stride2(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.class_embeddings = nn.Parameter(torch.randn(7, 4))

        def forward(self, x):
            return {"embeddings": self.conv(x), "class_embeddings": self.class_embeddings}

    model, images = Stride2(), torch.randn(2, 3, 12, 10)
    coarse = infer(model, images, EvalConfig(mode="whole"), coarse=True)
    full = infer(model, images, EvalConfig(mode="whole"))
    assert coarse["embeddings"].shape[-2:] == (6, 5) and full["embeddings"].shape[-2:] == (12, 10)
    assert torch.equal(predict_labels(coarse, (12, 10)), predict_labels(full, (12, 10)))
    slide = EvalConfig(mode="slide", crop=[8, 8], stride=[4, 4])
    assert infer(model, images, slide, coarse=True)["embeddings"].shape[-2:] == (12, 10)
