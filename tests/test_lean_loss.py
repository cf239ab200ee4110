"""esskit.lean_loss (chunked Eq. 6 and full softmax) against brute-force references written here:
values and gradients, chunk boundaries, ignore pixels, fake tensors and flat memory in C."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from typer.testing import CliRunner

from esskit.cli import app
from esskit.data import IGNORE_INDEX
from esskit.knn import knn_backend
from esskit.lean_loss import has_builtin_linear_cross_entropy, unit_backward
from esskit.losses import ess_full_loss, ess_loss
from esskit.profile.estimate import MemoryTracker
from test_losses import _inputs as random_inputs


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(n=150, c=12, d=6, seed=0, ignore_every=4):
    return random_inputs(n, c, d, seed, ignore_every)


def _reference_ess(x, mu, t, k, tau, normalize=True):
    """Eq. 6 literally: kept pixels only, negatives by sorting float64 distances, logits
    -|x - mu|^2/tau gathered per candidate (the pre-lean formulation, [n, k+1, d])."""
    keep = t != IGNORE_INDEX
    x, t = x[keep], t[keep]
    if normalize:
        x, mu = x / x.norm(dim=1, keepdim=True), mu / mu.norm(dim=1, keepdim=True)
    with torch.no_grad():
        dist = torch.cdist(x, mu) ** 2
        dist[torch.arange(len(t)), t] = float("inf")
        neg = dist.argsort(dim=1)[:, :k]
    cand = torch.cat([t[:, None], neg], 1)
    logits = -(x[:, None, :] - mu[cand]).pow(2).sum(-1) / tau
    return -torch.log_softmax(logits, 1)[:, 0].mean()


def _reference_full(x, mu, t, tau, normalize=True):
    """Eq. 5: cross-entropy over all C classes with logits -|x - mu|^2/tau, one [N, C] tensor."""
    if normalize:
        x, mu = x / x.norm(dim=1, keepdim=True), mu / mu.norm(dim=1, keepdim=True)
    logits = -(x[:, None, :] - mu[None]).pow(2).sum(-1) / tau
    return F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX)


def _grads(fn, x, mu):
    a, m = x.clone().requires_grad_(True), mu.clone().requires_grad_(True)
    loss = fn(a, m)
    loss.backward()
    return loss.detach().double(), a.grad, m.grad


def _assert_same(ours, reference, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], reference[1], rtol=rtol, atol=atol)
    torch.testing.assert_close(ours[2], reference[2], rtol=rtol, atol=atol)


# rows per chunk: 1, 7 (does not divide 150), 150 (exactly one chunk), 10_000 (bigger than the input)
@pytest.mark.parametrize("rows", [1, 7, 150, 10_000])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dense", [False, True])  # gathered candidates, or [rows, C] logit blocks
def test_ess_loss_chunks_equal_reference(rows, normalize, dense):
    x, mu, t = _inputs(seed=rows)
    k, tau = 4, 0.1 if normalize else 2.0
    chunk = 4 * (max(mu.shape[0], (k + 1) * x.shape[1]) if dense else (k + 1) * x.shape[1]) * rows
    ours = _grads(lambda a, m: ess_loss(a, m, t, k, tau, normalize=normalize, chunk_bytes=chunk, dense=dense),
                  x, mu)
    reference = _grads(lambda a, m: _reference_ess(a, m, t, k, tau, normalize), x, mu)
    _assert_same(ours, reference)
    assert torch.all(ours[1][t == IGNORE_INDEX] == 0)  # ignore pixels weigh exactly 0


@pytest.mark.parametrize("rows", [13, 300, 5000])  # 13 does not divide 300; one chunk; bigger
@pytest.mark.parametrize("builtin", [False, True])
def test_ess_full_equals_full_cross_entropy(rows, builtin):
    if builtin and not has_builtin_linear_cross_entropy():
        pytest.skip("this torch has no F.linear_cross_entropy")
    x, mu, t = _inputs(n=300, c=2500, d=12, seed=rows)
    chunk = 4 * 2500 * rows
    ours = _grads(lambda a, m: ess_full_loss(a, m, t, 0.05, chunk_bytes=chunk, builtin=builtin), x, mu)
    reference = _grads(lambda a, m: _reference_full(a, m, t, 0.05), x, mu)
    _assert_same(ours, reference)


@pytest.mark.parametrize("builtin", [False, True])
def test_ess_full_without_normalisation_and_all_ignore(builtin):
    if builtin and not has_builtin_linear_cross_entropy():
        pytest.skip("this torch has no F.linear_cross_entropy")
    x, mu, t = _inputs(n=90, c=40, d=5, seed=3)
    ours = _grads(lambda a, m: ess_full_loss(a, m, t, 3.0, normalize=False, chunk_bytes=4 * 40 * 11,
                                             builtin=builtin), x, mu)
    _assert_same(ours, _grads(lambda a, m: _reference_full(a, m, t, 3.0, normalize=False), x, mu))
    none = torch.full_like(t, IGNORE_INDEX)
    for fn in (lambda a, m: ess_full_loss(a, m, none, builtin=builtin), lambda a, m: ess_loss(a, m, none, 3)):
        loss, gx, gmu = _grads(fn, x, mu)
        assert loss.item() == 0.0 and torch.all(gx == 0) and torch.all(gmu == 0)


def test_dense_and_gathered_eq6_agree_with_random_negatives():
    # The same random negatives (one seed) through both forms: the dense form scatters dL/dz into
    # the [rows, C] block, the gathered form adds per candidate; 8 classes, so pixels share them.
    x, mu, t = _inputs(n=400, c=8, d=4, seed=7)
    runs = [_grads(lambda a, m: ess_loss(a, m, t, 6, 0.1, negatives="random", dense=dense), x, mu)
            for dense in (False, True) for _ in [torch.manual_seed(0)]]
    _assert_same(runs[1], runs[0])


def test_ess_with_k_c_minus_1_equals_ess_full():
    x, mu, t = _inputs(n=200, c=9, d=7, seed=5)
    a = _grads(lambda a, m: ess_loss(a, m, t, 8, 0.05, chunk_bytes=4 * 9 * 7 * 17), x, mu)
    b = _grads(lambda a, m: ess_full_loss(a, m, t, 0.05, chunk_bytes=4 * 9 * 23), x, mu)
    _assert_same(a, b)


def test_unit_backward_is_the_gradient_of_f_normalize():
    x = torch.randn(50, 6, dtype=torch.float64)
    x[3] = 0.0  # below eps: F.normalize divides by eps there
    grad = torch.randn_like(x)
    a = x.clone().requires_grad_(True)
    F.normalize(a, dim=1).backward(grad)
    torch.testing.assert_close(unit_backward(x, grad), a.grad)


def test_losses_stay_fp32_under_autocast():
    x, mu, t = _inputs(n=64, c=30, d=8)
    x, mu = x.float(), mu.float()
    expected = [ess_loss(x, mu, t, 3), ess_full_loss(x, mu, t, builtin=False)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = [ess_loss(x, mu, t, 3), ess_full_loss(x, mu, t, builtin=False)]
    for e, g in zip(expected, got):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def _loss_peak(fn, n, c, d=12, masks=False):
    """Peak bytes of forward + backward of one loss on fake tensors (the lean losses need no
    boolean masks; `masks` lets the pre-lean reference's `x[keep]` run, see estimate.py)."""
    with FakeTensorMode(), MemoryTracker(all_true_masks=masks) as tracker:
        x = torch.empty(n, d, requires_grad=True)
        mu = torch.empty(c, d, requires_grad=True)
        t = torch.randint(0, c, (n,))
        fn(x, mu, t).backward()
    return tracker.peak_allocated


@pytest.mark.parametrize("method", ["ess", "ess_full"])
def test_loss_memory_is_flat_in_classes(method):
    n, chunk = 2**20, 2**20
    knn = knn_backend("torch", chunk)
    if method == "ess":
        def fn(x, mu, t):
            return ess_loss(x, mu, t, 8, knn=knn, chunk_bytes=chunk)
    else:
        def fn(x, mu, t):
            return ess_full_loss(x, mu, t, chunk_bytes=chunk)
    small, large = _loss_peak(fn, n, 19), _loss_peak(fn, n, 100_000)
    # Only C x d tables (embeddings, normalised copy, gradients, backward temporaries) and at most
    # one chunk grow with C; the per-pixel part (n = 2**20) does not.
    table = 4 * 100_000 * 12
    assert large - small <= 10 * table + 2 * chunk
    # and lean per pixel: far below the pre-lean ~1.7 KB of [N, k+1, d] tensors
    assert small / n < 400


def test_pre_lean_formulation_costs_the_tracker_several_times_more():
    # The reference gathers [N, k+1, d] vectors (~1.9 KB per pixel with their gradients and
    # products); the lean loss keeps ~150 B per pixel with 1 MiB chunks.
    n, chunk = 2**17, 2**20
    knn = knn_backend("torch", chunk)
    lean = _loss_peak(lambda x, mu, t: ess_loss(x, mu, t, 8, knn=knn, chunk_bytes=chunk), n, 19)
    gathered = _loss_peak(lambda x, mu, t: _reference_ess(x, mu, t, 8, 0.05), n, 19, masks=True)
    assert lean / n < 200 and gathered > 8 * lean


def test_cli_trains_ess_full(tmp_path):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "synthetic.toml"
    tiny = ["train.steps=2", "train.batch_size=2", "data.crop=[64,64]", "data.base_size=[64,64]",
            "data.synthetic_image_size=64", "data.synthetic_train_size=4", "data.synthetic_val_size=2",
            "train.log_every=1", "eval.batch_size=2", "method.name=ess_full", "data.num_classes=3000"]
    result = CliRunner().invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run"),
                                      *[a for s in tiny for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["loss"] > 0 for x in lines if "loss" in x)
    assert 0 <= json.loads((tmp_path / "run" / "eval.json").read_text())["mIoU"] <= 1
