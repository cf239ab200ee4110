"""esskit.data.transforms: the training rescale follows mmseg's keep-ratio rule (mmcv.rescale_size),
and crop, flip and padding keep image and mask aligned."""

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

from esskit.config import DataConfig
from esskit.data import IGNORE_INDEX
from esskit.data.transforms import RandomRescale, SegmentationSet, train_transforms


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


def test_crop_pads_the_mask_with_ignore():
    cfg = DataConfig(crop=[64, 64], base_size=[32, 32], scale_range=[1.0, 1.0], flip=False)
    image, mask = torch.full((3, 32, 32), 200, dtype=torch.uint8), torch.ones(32, 32, dtype=torch.int64)
    x, y = SegmentationSet([(image, mask)], train_transforms(cfg), num_classes=2)[0]
    assert (y == 1).sum() == 32 * 32 and (y == IGNORE_INDEX).sum() == 64 * 64 - 32 * 32
