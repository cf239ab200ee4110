"""esskit.losses against direct, brute-force references written here."""

import pytest
import torch
import torch.nn.functional as F

from esskit.config import MethodConfig
from esskit.data import IGNORE_INDEX
from esskit.errors import ConfigError
from esskit.knn import block_neighbours, feature_neighbours
from esskit.losses import (ess_candidates, essnet_loss, ess_loss, max_margin_loss, nearest_negatives, pixels_last,
                           random_negatives, segmentation_loss)


def _inputs(n=200, c=12, d=7, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    mu = torch.randn(c, d, generator=g, dtype=torch.float64)
    t = torch.randint(0, c, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = IGNORE_INDEX
    return x, mu, t


def _bruteforce_negatives(x, mu, t, k):
    """k nearest non-target classes per pixel by sorting full float64 distances."""
    dist = torch.cdist(x.double(), mu.double()) ** 2
    dist[torch.arange(len(t)), t] = float("inf")
    return dist.argsort(dim=1)[:, :k]


def _reference_ess(x, mu, t, k, tau, normalize=True):
    keep = t != IGNORE_INDEX
    x, t = x[keep], t[keep]
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
        mu = mu / mu.norm(dim=1, keepdim=True)
    with torch.no_grad():
        neg = _bruteforce_negatives(x, mu, t, k)
    per_pixel = []
    for i in range(len(t)):
        cand = [int(t[i])] + neg[i].tolist()
        logits = torch.stack([-((x[i] - mu[j]) ** 2).sum() / tau for j in cand])
        per_pixel.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(per_pixel).mean()


def test_k_c_minus_1_equals_full_cross_entropy_and_drops_ignore():
    x, mu, t = _inputs(c=9)
    loss = ess_loss(x, mu, t, k=8, tau=0.07)
    keep = t != IGNORE_INDEX
    xh, muh = F.normalize(x[keep], dim=1), F.normalize(mu, dim=1)
    logits = -((xh[:, None, :] - muh[None]) ** 2).sum(-1) / 0.07
    expected = F.cross_entropy(logits, t[keep])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # Also equals CE with ignore_index on all pixels (ignored pixels are not counted).
    all_logits = -((F.normalize(x, dim=1)[:, None] - muh[None]) ** 2).sum(-1) / 0.07
    torch.testing.assert_close(loss.double(), F.cross_entropy(all_logits, t, ignore_index=IGNORE_INDEX),
                               rtol=1e-5, atol=1e-6)
    # The ignored pixels' embeddings do not matter.
    x2 = x.clone()
    x2[~keep] = 1e3 * torch.randn_like(x2[~keep])
    torch.testing.assert_close(ess_loss(x2, mu, t, k=8, tau=0.07), loss)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_k_below_c_minus_1_equals_bruteforce_reference(k):
    x, mu, t = _inputs(n=120, c=10, d=5, seed=k)
    loss = ess_loss(x, mu, t, k=k, tau=0.05)
    expected = _reference_ess(x, mu, t, k, 0.05)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_nearest_negatives_bruteforce_and_never_target():
    x, mu, t = _inputs(n=400, c=15, d=6, seed=3, ignore_every=0)
    x, mu = F.normalize(x, dim=1), F.normalize(mu, dim=1)
    for k in (1, 4, 14):
        neg = nearest_negatives(x, mu, t, k)
        assert neg.shape == (400, k)
        assert not (neg == t[:, None]).any()
        assert (neg >= 0).all() and (neg < 15).all()
        # distinct classes per pixel
        assert (neg.sort(1).values.diff(dim=1) != 0).all()
        ref = _bruteforce_negatives(x, mu, t, k)
        dist = torch.cdist(x, mu) ** 2
        # identical where the reference ordering has no near-ties
        torch.testing.assert_close(dist.gather(1, neg), dist.gather(1, ref), rtol=1e-5, atol=1e-5)
        assert (neg == ref).float().mean() > 0.99


def test_nearest_negatives_when_target_is_far():
    # Target is the farthest class: negatives are just the plain k nearest.
    mu = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.05]], dtype=torch.float64)
    neg = nearest_negatives(x, mu, torch.tensor([3]), 2)
    assert neg.tolist() == [[0, 1]]
    neg = nearest_negatives(x, mu, torch.tensor([0]), 2)
    assert neg.tolist() == [[1, 2]]


def test_gradients_match_reference_and_flow_to_both_inputs():
    x, mu, t = _inputs(n=60, c=10, d=5, seed=7)
    x1, mu1 = x.clone().requires_grad_(True), mu.clone().requires_grad_(True)
    ess_loss(x1, mu1, t, k=3, tau=0.1).backward()
    x2, mu2 = x.clone().requires_grad_(True), mu.clone().requires_grad_(True)
    _reference_ess(x2, mu2, t, 3, 0.1).backward()
    assert x1.grad.abs().sum() > 0 and mu1.grad.abs().sum() > 0
    keep = t != IGNORE_INDEX
    assert torch.all(x1.grad[~keep] == 0)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mu1.grad, mu2.grad, rtol=1e-4, atol=1e-6)


def test_knn_runs_without_grad():
    seen = []

    def spy_knn(queries, keys, k):
        seen.append((queries.requires_grad, keys.requires_grad, torch.is_grad_enabled()))
        from esskit.knn import knn_exact
        return knn_exact(queries, keys, k)

    x, mu, t = _inputs()
    x.requires_grad_(True)
    mu.requires_grad_(True)
    ess_loss(x, mu, t, k=3, knn=spy_knn).backward()
    assert seen and all(not q and not kk for q, kk, _ in seen)


def test_all_ignore_target_gives_zero_loss_that_backprops():
    x, mu, _ = _inputs()
    x.requires_grad_(True)
    mu.requires_grad_(True)
    t = torch.full((x.shape[0],), IGNORE_INDEX)
    for loss in (ess_loss(x, mu, t, k=3), essnet_loss(x, mu, t, k=3)):
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert x.grad is not None and mu.grad is not None
        assert torch.all(x.grad == 0) and torch.all(mu.grad == 0)


def test_random_negatives_in_range_and_never_target():
    torch.manual_seed(0)
    c, k = 7, 6
    t = torch.randint(0, c, (5000,))
    neg = random_negatives(t, c, k)
    assert neg.shape == (5000, k) and neg.dtype == torch.int64
    assert (neg >= 0).all() and (neg < c).all()
    assert not (neg == t[:, None]).any()
    # every non-target class is drawn for each target (uniform over C-1, including C-1 and 0)
    for cls in range(c):
        drawn = set(neg[t == cls].unique().tolist())
        assert drawn == set(range(c)) - {cls}
    # a set, as Eq. 6's denominator: k distinct classes per pixel, each class drawn k / (C-1) of the
    # time, each pair of them as often as any other (uniform k-subsets: Floyd's algorithm)
    c, k = 19, 7
    t = torch.randint(0, c, (40000,))
    neg = random_negatives(t, c, k)
    assert (neg.sort(1).values.diff(1) > 0).all() and not (neg == t[:, None]).any()
    kept = neg[t == 0]  # non-targets 1..18
    freq = torch.bincount(kept.flatten(), minlength=c)[1:] / kept.shape[0]
    assert torch.allclose(freq, torch.full_like(freq, k / (c - 1)), atol=0.03)
    pair = ((kept == 1).any(1) & (kept == 2).any(1)).float().mean()  # P = k(k-1) / ((C-1)(C-2))
    assert abs(pair - k * (k - 1) / ((c - 1) * (c - 2))) < 0.03
    with pytest.raises(ConfigError, match="method.k = 19"):
        random_negatives(t, c, c)
    # used through ess_loss
    x, mu, t2 = _inputs(c=c)
    loss = ess_loss(x, mu, t2, k=2, negatives="random")
    assert torch.isfinite(loss)


def _reference_margin(mu, m):
    mu = mu / mu.norm(dim=1, keepdim=True)
    c = mu.shape[0]
    terms = []
    for i in range(c):
        dmin = min(torch.sqrt(((mu[i] - mu[j]) ** 2).sum()) for j in range(c) if j != i)
        terms.append(torch.clamp(m - dmin, min=0))
    return torch.stack(terms).sum() / c


@pytest.mark.parametrize("m", [0.2, 1.0, 1.5])
def test_max_margin_equals_direct_reference(m):
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(9, 3, generator=g, dtype=torch.float64)
    loss = max_margin_loss(mu, m)
    expected = _reference_margin(mu, m)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    if m == 1.5:
        assert expected > 0  # the case actually exercises the hinge


def test_max_margin_with_coinciding_classes_is_finite():
    mu = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                      dtype=torch.float64, requires_grad=True)  # classes 0 and 1 coincide once normalised
    loss = max_margin_loss(mu, 0.2)
    # classes 0 and 1: min distance 0 -> 0.2 each; classes 2, 3: distance sqrt(2) -> 0
    torch.testing.assert_close(loss.double(), torch.tensor(0.4 / 4, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.isfinite(mu.grad).all()


def test_max_margin_gradient_matches_reference():
    g = torch.Generator().manual_seed(5)
    mu = torch.randn(8, 3, generator=g, dtype=torch.float64)
    a, b = mu.clone().requires_grad_(True), mu.clone().requires_grad_(True)
    max_margin_loss(a, 1.2).backward()
    _reference_margin(b, 1.2).backward()
    assert a.grad.abs().sum() > 0
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def _reference_essnet(x, mu, t, k):
    """Docstring: target + plain kNN (may repeat the target), logits -20*|x - mu_hat|, x as given."""
    keep = t != IGNORE_INDEX
    x, t = x[keep], t[keep]
    mu = mu / mu.norm(dim=1, keepdim=True)
    with torch.no_grad():
        plain = (torch.cdist(x, mu) ** 2).argsort(dim=1)[:, :k]
    losses = []
    for i in range(len(t)):
        cand = [int(t[i])] + plain[i].tolist()
        logits = torch.stack([-20.0 * torch.sqrt(((x[i] - mu[j]) ** 2).sum()) for j in cand])
        losses.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(losses).mean()


def test_essnet_loss_equals_docstring_reference():
    x, mu, t = _inputs(n=100, c=10, d=5, seed=11)
    x = F.normalize(x, dim=1) * 0.9  # "arrive normalised ... upsampled (not renormalised)"
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ma, mb = mu.clone().requires_grad_(True), mu.clone().requires_grad_(True)
    loss = essnet_loss(a, ma, t, k=4)
    expected = _reference_essnet(b, mb, t, 4)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ma.grad, mb.grad, rtol=1e-4, atol=1e-6)


def test_segmentation_loss_baseline_is_upsampled_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 16, 16), generator=g)
    target[0, :3] = IGNORE_INDEX
    loss, parts = segmentation_loss({"logits": logits}, target, MethodConfig(name="baseline"))
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, target, ignore_index=-1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert "loss_ce" in parts
    # a batch of ignore pixels only: 0, not F.cross_entropy's NaN mean, and still a graph
    logits.requires_grad_(True)
    loss, _ = segmentation_loss({"logits": logits}, torch.full_like(target, IGNORE_INDEX), MethodConfig(name="baseline"))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_segmentation_loss_ess_paper_matches_reference():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    class_emb = torch.randn(6, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 6, (2, 8, 8), generator=g)
    target[1, 2:5] = IGNORE_INDEX
    cfg = MethodConfig(name="ess", k=3, tau=0.1, margin=1.5, margin_weight=0.5)
    loss, parts = segmentation_loss({"embeddings": emb, "class_embeddings": class_emb}, target, cfg)
    up = F.interpolate(emb, size=(8, 8), mode="bilinear", align_corners=False)
    pix = up.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = _reference_ess(pix, class_emb, target.reshape(-1), 3, 0.1) + 0.5 * _reference_margin(class_emb, 1.5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"loss_ess", "loss_margin", "emb_norm"}
    # the mean norm of the raw stride-4 embeddings, before upsampling and normalisation
    torch.testing.assert_close(parts["emb_norm"].double(), emb.pow(2).sum(1).sqrt().mean(), rtol=1e-6, atol=0)


def test_loss_is_fp32_for_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 4, generator=g).bfloat16()
    target = torch.randint(0, 5, (2, 8, 8), generator=g)
    loss, _ = segmentation_loss({"logits": logits}, target, MethodConfig(name="baseline"))
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(F.interpolate(logits.double(), size=(8, 8), mode="bilinear"), target)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)

    emb = torch.randn(2, 4, 4, 4, generator=g).bfloat16().requires_grad_(True)
    class_emb = torch.randn(6, 4, generator=g).bfloat16().requires_grad_(True)
    for variant in ("paper", "essnet"):
        cfg = MethodConfig(name="ess", k=3, variant=variant)
        loss, parts = segmentation_loss({"embeddings": emb, "class_embeddings": class_emb}, target, cfg)
        assert loss.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in parts.values())
        loss.backward()
    assert emb.grad.dtype == torch.bfloat16 and torch.isfinite(emb.grad.float()).all()
    x, mu, t = _inputs()
    assert ess_loss(x.bfloat16(), mu.bfloat16(), t, k=3).dtype == torch.float32
    assert max_margin_loss(mu.bfloat16()).dtype == torch.float32


def _reference_full(x, mu, t, tau):
    xh, muh = F.normalize(x, dim=1), F.normalize(mu, dim=1)
    return F.cross_entropy(-torch.cdist(xh, muh) ** 2 / tau, t, ignore_index=IGNORE_INDEX)


def test_segmentation_loss_ess_full_is_full_softmax_plus_margin():
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    class_emb = torch.randn(40, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 40, (2, 8, 8), generator=g)
    target[0, 1] = IGNORE_INDEX
    cfg = MethodConfig(name="ess_full", tau=0.1, margin=1.5, margin_weight=0.5, loss_chunk_mib=1)  # C > k: no kNN
    loss, parts = segmentation_loss({"embeddings": emb, "class_embeddings": class_emb}, target, cfg)
    pix = F.interpolate(emb, size=(8, 8), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(-1, 5)
    expected = _reference_full(pix, class_emb, target.reshape(-1), 0.1) + 0.5 * _reference_margin(class_emb, 1.5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"loss_full", "loss_margin", "emb_norm"}


@pytest.mark.parametrize("sets", [{"knn_at": "feature"}, {"knn_block": 2}, {"knn_block": 4}])
def test_shared_neighbours_keep_negatives_strict(sets):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 6, 5, 5, generator=g, requires_grad=True)
    class_emb = torch.randn(40, 6, generator=g, requires_grad=True)
    target = torch.randint(0, 40, (2, 20, 20), generator=g)
    target[:, 0] = IGNORE_INDEX
    cfg = MethodConfig(k=5, **sets)
    loss, _ = segmentation_loss({"embeddings": emb, "class_embeddings": class_emb}, target, cfg)
    loss.backward()
    assert torch.isfinite(loss) and emb.grad.abs().sum() > 0 and class_emb.grad.abs().sum() > 0
    # the candidates: target first, then 5 distinct classes none of which is the target
    up = F.interpolate(emb.detach(), size=(20, 20), mode="bilinear", align_corners=False)
    mu = F.normalize(class_emb.detach(), dim=1)
    neighbours = (feature_neighbours(emb, (20, 20), mu, 6) if "knn_at" in sets
                  else block_neighbours(up, sets["knn_block"], mu, 6))
    t = target.reshape(-1)
    cand = ess_candidates(pixels_last(up), mu, t, 5, rows=37, neighbours=neighbours).long()
    assert torch.equal(cand[:, 0], t.clamp_min(0))
    assert not (cand[:, 1:] == cand[:, :1]).any()
    assert (cand[:, 1:].sort(1).values.diff(dim=1) != 0).all()


@pytest.mark.parametrize("normalize, bound_keys", [(True, 2), (False, 2), (True, 3)])
def test_feature_exact_search_gives_the_per_pixel_loss_and_gradients(normalize, bound_keys, monkeypatch):
    import esskit.losses

    lists = []  # m of each bounded search: method.knn_bound_keys reaches it
    bounded = esskit.losses.bounded_neighbours
    monkeypatch.setattr(esskit.losses, "bounded_neighbours",
                        lambda *args: lists.append(args[-1] * args[3]) or bounded(*args))
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(2, 6, 8, 7, generator=g)
    emb = (F.avg_pool2d(emb, 3, 1, 1, count_include_pad=False) + torch.randn(2, 6, 1, 1, generator=g)).requires_grad_()
    class_emb = torch.randn(200, 6, generator=g, requires_grad=True)
    target = torch.randint(0, 200, (2, 32, 27), generator=g)
    target[:, 0] = IGNORE_INDEX
    results = []
    for knn_at, keys in (("label", 2), ("feature_exact", bound_keys)):
        cfg = MethodConfig(k=5, knn_at=knn_at, normalize=normalize, knn_chunk_mib=1, loss_chunk_mib=1,
                           knn_bound_keys=keys)
        loss, _ = segmentation_loss({"embeddings": emb, "class_embeddings": class_emb}, target, cfg)
        results.append((loss, *torch.autograd.grad(loss, [emb, class_emb])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert lists == [bound_keys * 6]


def test_method_config_validates_the_new_keys():

    assert MethodConfig(name="ess_full").name == "ess_full"
    for bad, match in [({"knn_block": 3}, "knn_block"), ({"knn_at": "stride4"}, "knn_at"),
                       ({"knn_at": "feature", "knn_block": 2}, "alternatives"),
                       ({"knn_at": "feature_exact", "knn_block": 4}, "alternatives"),
                       ({"variant": "essnet", "knn_block": 2}, "essnet"), ({"loss_chunk_mib": 0}, "loss_chunk_mib"),
                       ({"knn_at": "feature_exact", "knn_bound_keys": 0}, "knn_bound_keys")]:
        with pytest.raises(ConfigError, match=match):
            MethodConfig(**bad)
    # a list size that knn_at = "label" would ignore: refused when training
    with pytest.raises(ConfigError, match="method.knn_bound_keys = 3 sizes the lists of knn_at = 'feature_exact', "
                                          "not 'label'"):
        MethodConfig(knn_bound_keys=3).check_training()
    MethodConfig(knn_at="feature_exact", knn_bound_keys=3).check_training()


def test_emb_norm_is_the_heads_raw_norm_for_both_variants():
    """The logged emb_norm is the norm before normalisation, also where essnet's head normalises."""
    from esskit.models.heads import EmbeddingHead

    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 4, 4, generator=g)
    target = torch.randint(0, 6, (2, 16, 16), generator=g)
    for variant in ("paper", "essnet"):
        head = EmbeddingHead(8, 6, 4, unit_at_stride=variant == "essnet")
        with torch.no_grad():
            head.proj.weight.mul_(50)  # raw norm far from 1
            raw = head.proj(features).norm(dim=1).mean()
        _, parts = segmentation_loss(head(features), target, MethodConfig(name="ess", k=3, variant=variant))
        assert raw > 5
        torch.testing.assert_close(parts["emb_norm"], raw)
