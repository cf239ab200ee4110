"""esskit.metrics.SegMetrics against hand-computed and brute-force numbers."""

import math

import numpy as np
import pytest
import torch

import esskit.metrics
from esskit.data import IGNORE_INDEX
from esskit.metrics import SegMetrics

# C = 5. Two ignored pixels (their predictions 3 and 0 must not count). Valid (target, pred):
# (0,0) (0,0) (0,1) (1,1) (1,2) (2,2) (2,2) (0,1) (1,4)   -> 9 pixels
TARGET = torch.tensor([0, 0, 0, 1, 1, 2, -1, -1, 2, 0, 1])
PRED = torch.tensor([0, 0, 1, 1, 2, 2, 3, 0, 2, 1, 4])
# rows: target class, columns: predicted class
CONFUSION = [[2, 2, 0, 0, 0],
             [0, 1, 1, 0, 1],
             [0, 0, 2, 0, 0],
             [0, 0, 0, 0, 0],
             [0, 0, 0, 0, 0]]
# target counts 4,3,2,0,0; pred counts 2,3,3,0,1; TP 2,1,2,0,0
# IoU: 2/(4+2-2)=1/2, 1/(3+3-1)=1/5, 2/(2+3-2)=2/3, class 3 absent from both -> NaN,
# class 4 predicted but never a target -> 0/1 = 0 (counts in mIoU)
IOU = [1 / 2, 1 / 5, 2 / 3, math.nan, 0.0]
MIOU = (1 / 2 + 1 / 5 + 2 / 3 + 0) / 4  # = 41/120
FWIOU = (4 * 1 / 2 + 3 * 1 / 5 + 2 * 2 / 3) / 9  # = 59/135
PACC = 5 / 9
MACC = (2 / 4 + 1 / 3 + 2 / 2) / 3  # classes 3 and 4 have no target pixel = 11/18


def _check_hand_example(result):
    assert set(result) >= {"mIoU", "fwIoU", "pAcc", "mAcc", "IoU"}
    assert result["mIoU"] == pytest.approx(41 / 120) == pytest.approx(MIOU)
    assert result["fwIoU"] == pytest.approx(59 / 135) == pytest.approx(FWIOU)
    assert result["pAcc"] == pytest.approx(PACC)
    assert result["mAcc"] == pytest.approx(11 / 18) == pytest.approx(MACC)
    assert len(result["IoU"]) == 5
    for got, want in zip(result["IoU"], IOU):
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want)


def test_hand_computed_example():
    m = SegMetrics(5)
    m.update(PRED, TARGET)
    assert m.confusion.tolist() == CONFUSION
    assert m.num_pixels == 9
    _check_hand_example(m.compute())


def test_2d_batched_input_and_int32_pred():
    m = SegMetrics(5)
    m.update(PRED[:10].view(2, 5).int(), TARGET[:10].view(2, 5))
    m.update(PRED[10:].view(1, 1), TARGET[10:].view(1, 1))
    _check_hand_example(m.compute())


def test_update_in_several_calls_equals_one_call():
    m = SegMetrics(5)
    for lo, hi in [(0, 3), (3, 4), (4, 4), (4, 9), (9, 11)]:
        m.update(PRED[lo:hi], TARGET[lo:hi])
    assert m.confusion.tolist() == CONFUSION
    _check_hand_example(m.compute())


def test_merge_equals_single():
    a, b, c = SegMetrics(5), SegMetrics(5), SegMetrics(5)
    a.update(PRED[:4], TARGET[:4])
    b.update(PRED[4:], TARGET[4:])
    assert a.merge(b).merge(c) is a
    assert a.confusion.tolist() == CONFUSION
    _check_hand_example(a.compute())


def test_all_ignored_update_changes_nothing():
    m = SegMetrics(5)
    m.update(PRED, TARGET)
    m.update(torch.tensor([1, 2, 3]), torch.full((3,), IGNORE_INDEX))
    _check_hand_example(m.compute())


def test_nothing_labelled_gives_nan_for_every_score():
    m = SegMetrics(5)
    m.update(torch.tensor([1, 2, 3]), torch.full((3,), IGNORE_INDEX))
    result = m.compute()
    assert all(math.isnan(result[k]) for k in ("mIoU", "fwIoU", "pAcc", "mAcc"))  # fwIoU was 0.0


def _numpy_reference(pred, target, c):
    valid = target != IGNORE_INDEX
    p, t = pred[valid], target[valid]
    conf = np.zeros((c, c), dtype=np.int64)
    np.add.at(conf, (t, p), 1)
    tp = np.diag(conf).astype(float)
    tc, pc = conf.sum(1).astype(float), conf.sum(0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tc + pc - tp)
        acc = tp / tc
    freq = tc / tc.sum()
    return {"mIoU": np.nanmean(iou), "fwIoU": np.nansum(freq * np.where(freq > 0, iou, 0)),
            "pAcc": tp.sum() / tc.sum(), "mAcc": np.nanmean(acc), "IoU": iou}


def _assert_same(got, want):
    for key in ("mIoU", "fwIoU", "pAcc", "mAcc"):
        assert got[key] == pytest.approx(float(want[key]), rel=1e-12), key
    np.testing.assert_allclose(np.array(got["IoU"], dtype=float), np.asarray(want["IoU"], dtype=float),
                               rtol=1e-12, equal_nan=True)


def test_random_against_numpy_reference():
    g = torch.Generator().manual_seed(0)
    c = 23
    target = torch.randint(-1, c - 3, (4, 32, 32), generator=g)  # classes 20..22 never targets
    pred = torch.where(torch.rand(4, 32, 32, generator=g) < 0.6, target.clamp_min(0),
                       torch.randint(0, c - 1, (4, 32, 32), generator=g))  # class 22 never predicted
    m = SegMetrics(c)
    m.update(pred, target)
    want = _numpy_reference(pred.numpy().ravel(), target.numpy().ravel(), c)
    assert math.isnan(m.compute()["IoU"][22])
    _assert_same(m.compute(), want)


def test_large_c_linear_path_equals_confusion_path(monkeypatch):
    c = 3000
    g = torch.Generator().manual_seed(1)
    target = torch.randint(-1, c, (20000,), generator=g)
    pred = torch.where(torch.rand(20000, generator=g) < 0.5, target.clamp_min(0),
                       torch.randint(0, c, (20000,), generator=g))
    linear = SegMetrics(c)
    assert linear.confusion is None  # > 2048 classes: O(C) path
    for chunk in range(0, 20000, 7000):
        linear.update(pred[chunk:chunk + 7000], target[chunk:chunk + 7000])
    monkeypatch.setattr(esskit.metrics, "MAX_CONFUSION_CLASSES", 4096)
    full = SegMetrics(c)
    assert full.confusion is not None and full.confusion.shape == (c, c)
    full.update(pred, target)
    got_linear, got_full = linear.compute(), full.compute()
    _assert_same(got_linear, got_full)
    _assert_same(got_linear, _numpy_reference(pred.numpy(), target.numpy(), c))
    # merge works on the linear path too
    a, b = SegMetrics(c), SegMetrics(c)
    a.update(pred[:5000], target[:5000])
    b.update(pred[5000:], target[5000:])
    _assert_same(a.merge(b).compute(), got_linear)
    assert a.num_pixels == int((target != IGNORE_INDEX).sum())
