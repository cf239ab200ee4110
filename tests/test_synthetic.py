import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esskit.data import IGNORE_INDEX
from esskit.data.synthetic import SyntheticSegmentation


def _class_pixel_counts(ds, num_images):
    counts = np.zeros(ds.num_classes, dtype=np.int64)
    for i in range(num_images):
        mask = ds[i][1]
        counts += np.bincount(mask[mask != IGNORE_INDEX].numpy(), minlength=ds.num_classes)
    return counts


def test_same_item_is_bit_identical_and_seed_changes_it():
    ds = SyntheticSegmentation(num_classes=19, length=8, image_size=64, seed=3)
    again = SyntheticSegmentation(num_classes=19, length=8, image_size=64, seed=3)
    for i in (0, 5):
        image, mask = ds[i]
        assert torch.equal(image, ds[i][0]) and torch.equal(mask, ds[i][1])
        assert torch.equal(image, again[i][0]) and torch.equal(mask, again[i][1])
    other_seed = SyntheticSegmentation(num_classes=19, length=8, image_size=64, seed=4)
    assert not torch.equal(ds[0][1], other_seed[0][1])
    assert not torch.equal(ds[0][0], other_seed[0][0])
    assert not torch.equal(ds[0][1], ds[1][1])


def test_train_and_val_are_disjoint():
    train = SyntheticSegmentation(num_classes=19, length=16, image_size=48, split="train")
    val = SyntheticSegmentation(num_classes=19, length=16, image_size=48, split="val")
    train_items = {ds_item[1].numpy().tobytes() for ds_item in train}
    val_items = {ds_item[1].numpy().tobytes() for ds_item in val}
    assert len(train_items) == 16 and len(val_items) == 16
    assert not train_items & val_items
    assert all(not torch.equal(train[i][0], val[i][0]) for i in range(16))


def test_dtypes_shapes_range_and_names():
    ds = SyntheticSegmentation(num_classes=19, length=4, image_size=40)
    assert len(ds) == 4 and len(ds.class_names) == 19
    assert ds.class_names[7] == "class_0007" and len(set(ds.class_names)) == 19
    for image, mask in ds:  # iteration must stop at len via IndexError
        assert image.dtype == torch.uint8 and image.shape == (3, 40, 40)
        assert mask.dtype == torch.int64 and mask.shape == (40, 40)
        valid = mask[mask != IGNORE_INDEX]
        assert valid.numel() > 0 and valid.min() >= 0 and valid.max() < 19
        assert image.float().std() > 10  # textured, not blank
    assert torch.equal(ds[-1][1], ds[3][1])
    with pytest.raises(IndexError):
        ds[4]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 40, 40) and batch[1].shape == (4, 40, 40)


def test_two_classes_work():
    ds = SyntheticSegmentation(num_classes=2, length=10, image_size=32)
    assert set(np.flatnonzero(_class_pixel_counts(ds, 10))) == {0, 1}


def test_ignore_is_a_thin_border_band():
    ds = SyntheticSegmentation(num_classes=19, length=40, image_size=128)
    fractions = []
    for image, mask in ds:
        ignore = mask == IGNORE_INDEX
        fractions.append(ignore.float().mean().item())
        # Ignore pixels separate regions: every one has a labelled pixel within 2 px.
        near_label = F.max_pool2d((~ignore).float()[None, None], 5, stride=1, padding=2)[0, 0]
        assert near_label[ignore].min() == 1
    assert 0.02 <= np.mean(fractions) <= 0.10
    assert min(fractions) > 0 and max(fractions) < 0.12


def test_class_frequencies_are_long_tailed():
    counts = _class_pixel_counts(SyntheticSegmentation(num_classes=19, length=50), 50)
    share = counts / counts.sum()
    assert share[0] > 3 * share[10]
    assert share[0] == share.max()
    # Spearman rank correlation between class id and pixel count: strongly decreasing.
    ranks = np.argsort(np.argsort(-counts))
    assert np.corrcoef(np.arange(19), ranks)[0, 1] > 0.7
    # Grouped means are strictly decreasing: head > body > tail.
    assert share[:3].mean() > share[3:9].mean() > share[9:].mean()


def test_hundred_thousand_classes_reach_the_tail():
    ds = SyntheticSegmentation(num_classes=100_000, length=10, image_size=128)
    seen = set()
    for _, mask in ds:
        valid = mask[mask != IGNORE_INDEX]
        assert valid.min() >= 0 and valid.max() < 100_000
        seen.update(valid.unique().tolist())
    assert len(seen) >= 20
    # Zipf with C = 100k puts ~38% of regions at ids >= 1000: the tail must be reachable.
    assert max(seen) >= 1000


def _local_features(image):
    """Per-pixel hand-made features: 7x7 mean colour and mean |gradient| along 4 directions."""
    x = image.float()[None]
    grey = x.mean(1, keepdim=True)
    pad = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    diffs = [pad[..., 1:-1, 2:] - grey, pad[..., 2:, 1:-1] - grey,
             pad[..., 2:, 2:] - grey, pad[..., 2:, :-2] - grey]
    feats = torch.cat([x] + [d.abs() for d in diffs], 1)
    feats = F.avg_pool2d(feats, 7, stride=1, padding=3, count_include_pad=False)
    return feats[0].flatten(1).T  # [H*W, 7]


def _features_and_labels(ds, num_images):
    feats, labels = [], []
    for i in range(num_images):
        image, mask = ds[i]
        feats.append(_local_features(image))
        labels.append(mask.flatten())
    feats, labels = torch.cat(feats), torch.cat(labels)
    keep = labels != IGNORE_INDEX
    return feats[keep], labels[keep]


def test_classes_are_distinguishable_by_a_nearest_centroid_pixel_classifier():
    # Appearance comes from the class id, so centroids fitted on train images must transfer to
    # val images; a per-pixel rule with no learning beating the majority class shows the task is
    # learnable, and it fails if neighbouring ids (or any two ids) share a look.
    num_classes = 19
    train = SyntheticSegmentation(num_classes, length=30, image_size=96, split="train")
    val = SyntheticSegmentation(num_classes, length=20, image_size=96, split="val")
    x_train, y_train = _features_and_labels(train, 30)
    x_val, y_val = _features_and_labels(val, 20)
    mean, std = x_train.mean(0), x_train.std(0)
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    present = y_train.unique()
    assert len(present) >= 15
    centroids = torch.stack([x_train[y_train == c].mean(0) for c in present])
    pred = present[torch.cdist(x_val, centroids).argmin(1)]
    accuracy = (pred == y_val).float().mean().item()
    majority = (y_val == 0).float().mean().item()
    assert accuracy > 0.65  # measured 0.76-0.85 over seeds 0-5; majority class is 0.23-0.36
    assert accuracy > majority + 0.35
    # No two class centroids coincide: the appearance hash separates every pair.
    gaps = torch.cdist(centroids, centroids) + torch.eye(len(present)) * 1e9
    assert gaps.min() > 0.3  # in feature std units; measured 0.53-0.68, ~0 if two looked alike


@pytest.mark.parametrize("split", ["test", "Train", ""])
def test_invalid_split_raises(split):
    # The message names the bad value and the choices.
    with pytest.raises(ValueError, match=re.escape(repr(split))) as err:
        SyntheticSegmentation(num_classes=19, length=1, split=split)
    assert repr(split) in str(err.value) and "'train', 'val'" in str(err.value)
