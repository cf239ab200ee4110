"""esskit.data.transforms: the training rescale follows mmseg's keep-ratio rule (mmcv.rescale_size),
and crop, flip and padding keep image and mask aligned."""

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

from esskit.config import DataConfig
from esskit.data import IGNORE_INDEX
from esskit.data.transforms import RandomRescale, SegmentationSet, train_transforms
from esskit.errors import ConfigError


def _mmcv_size(h, w, scale, ratio=1.0):
    """mmcv.rescale_size(keep_ratio) of the box scale * ratio, written out: (h, w)."""
    long, short = max(scale) * ratio, min(scale) * ratio
    factor = min(long / max(h, w), short / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


@pytest.mark.parametrize("box, image, expected", [
    ([1024, 2048], (1024, 2048), (1024, 2048)),  # Cityscapes at ratio 1: unchanged
    ([1024, 2048], (2048, 1024), (2048, 1024)),  # portrait: the same scale, not halved
    ([512, 2048], (375, 500), (512, 683)),  # VOC: the short side reaches 512
    ([2048, 512], (375, 500), (512, 683)),  # the box in either order
    ([512, 2048], (300, 1500), (410, 2048)),  # a long panorama: its long side stops at 2048
])
def test_rescale_fits_the_box_as_mmseg(box, image, expected):
    assert _mmcv_size(*image, box) == expected
    out, mask = RandomRescale(box, [1.0, 1.0])(tv_tensors.Image(torch.zeros(3, *image, dtype=torch.uint8)),
                                               tv_tensors.Mask(torch.zeros(*image, dtype=torch.int64)))
    assert tuple(out.shape[-2:]) == tuple(mask.shape) == expected


def test_rescale_ratio_is_drawn_from_the_range():
    rescale = RandomRescale([512, 2048], [0.5, 2.0])
    heights = set()
    for seed in range(200):
        torch.manual_seed(seed)
        out, _ = rescale(tv_tensors.Image(torch.zeros(3, 375, 500, dtype=torch.uint8)),
                         tv_tensors.Mask(torch.zeros(375, 500, dtype=torch.int64)))
        heights.add(out.shape[-2])
    assert min(heights) >= 256 and max(heights) <= 1024 and min(heights) < 300 and max(heights) > 950


def test_train_transforms_keep_image_and_mask_aligned():
    # 16 x 16 blocks whose label is written into the image (value 10 * label): after rescale, crop and
    # flip, every pixel away from block edges still carries its block's label in both
    h, w = 96, 128
    labels = (torch.arange(h)[:, None] // 16 * 8 + torch.arange(w)[None, :] // 16) % 20
    image = (labels * 10).to(torch.uint8).expand(3, h, w).clone()
    cfg = DataConfig(crop=[64, 64], base_size=[96, 128], scale_range=[0.75, 1.5], mean=[0, 0, 0], std=[1, 1, 1])
    dataset = SegmentationSet([(image, labels)], train_transforms(cfg), num_classes=20)
    for epoch in range(8):
        x, y = dataset[epoch]  # index epoch * len + 0: another crop, scale and flip each time
        assert x.shape == (3, 64, 64) and y.shape == (64, 64)
        from_image = (x[0] * 255 / 10).round().long()
        window = from_image[None, None].float()  # pixels whose 5 x 5 neighbourhood is one block
        uniform = (F.max_pool2d(window, 5, 1, 2) == -F.max_pool2d(-window, 5, 1, 2))[0, 0]
        inner = (y != IGNORE_INDEX) & uniform
        assert inner.float().mean() > 0.3
        assert torch.equal(from_image[inner], y[inner])


def test_crop_pads_the_mask_with_ignore_and_the_image_with_the_mean():
    cfg = DataConfig(crop=[64, 64], base_size=[32, 32], scale_range=[1.0, 1.0], flip=False, photometric=False)
    image, mask = torch.full((3, 32, 32), 200, dtype=torch.uint8), torch.ones(32, 32, dtype=torch.int64)
    x, y = SegmentationSet([(image, mask)], train_transforms(cfg), num_classes=2)[0]
    assert (y == 1).sum() == 32 * 32 and (y == IGNORE_INDEX).sum() == 64 * 64 - 32 * 32
    # as mmseg pads the normalised image with 0: the mean colour (to uint8 rounding), not black
    padded = x[:, y == IGNORE_INDEX]
    assert padded.abs().max() < 0.5 / 255 / min(cfg.std) and x[:, y == 1].abs().min() > 0.5


def test_cat_max_ratio_redraws_one_class_crops():
    # left half class 0, right half class 1: a 16 x 16 crop at column L holds L / 16 of class 1, so
    # only L = 5..11 (7 of 17 positions) keep both classes under 0.75; one draw lands there 41 % of
    # the time, ten draws 99.5 %
    mask = (torch.arange(32) >= 16).long().expand(32, 32).clone()
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)

    def balanced(cat_max_ratio: float) -> float:
        cfg = DataConfig(crop=[16, 16], base_size=[32, 32], scale_range=[1.0, 1.0], flip=False,
                         cat_max_ratio=cat_max_ratio)
        dataset = SegmentationSet([(image, mask)], train_transforms(cfg), num_classes=2)
        shares = [dataset[epoch][1].float().mean() for epoch in range(200)]
        return sum(0.25 < s < 0.75 for s in shares) / len(shares)

    assert balanced(0.75) > 0.95
    assert 0.25 < balanced(1.0) < 0.6  # off: a plain random crop


def test_cat_max_ratio_off_is_the_plain_crop_and_photometric_changes_only_images():
    image = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    mask = torch.randint(0, 5, (48, 48))
    base = dict(crop=[32, 32], base_size=[48, 48], scale_range=[0.8, 1.2])
    plain = SegmentationSet([(image, mask)], train_transforms(DataConfig(**base)), num_classes=5, seed=3)
    photo = SegmentationSet([(image, mask)], train_transforms(DataConfig(**base, photometric=True)), num_classes=5,
                            seed=3)
    changed = 0
    for epoch in range(6):
        (x, y), (xp, yp) = plain[epoch], photo[epoch]
        assert torch.equal(y, yp)  # same crop and flip: the distortion draws after them
        changed += not torch.allclose(x, xp)
    assert changed >= 4  # each of 4 jitters applies with probability 1/2
    with pytest.raises(ConfigError, match=r"data.cat_max_ratio = 0"):
        DataConfig(cat_max_ratio=0)
