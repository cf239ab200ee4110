"""esskit.models: DeepLabV3+ structure, output shapes, GroupNorm swap, errors and predict_labels."""

import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from esskit.config import MethodConfig
from esskit.data import IGNORE_INDEX
from esskit.errors import ModelError
from esskit.knn import bounded_neighbours
from esskit.losses import segmentation_loss
from esskit.models import build_model, predict_labels
from esskit.models.deeplab import batchnorm_to_groupnorm

C = 5
SIZE = 64
BACKBONES = ["resnet18", "mobilenetv2_100"]

_cache = {}


def _model(backbone, method, norm="bn"):
    key = (backbone, method, norm)
    if key not in _cache:
        torch.manual_seed(0)
        _cache[key] = build_model(backbone, C, method, embed_dim=7, norm=norm)
    return _cache[key]


def _images(b=2, size=SIZE):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", ["baseline", "ess"])
def test_output_keys_and_shapes_at_stride_4(backbone, method):
    model = _model(backbone, method).eval()
    with torch.no_grad():
        out = model(_images())
    if method == "baseline":
        assert set(out) == {"logits"}
        assert out["logits"].shape == (2, C, SIZE // 4, SIZE // 4)
    else:
        assert set(out) == {"embeddings", "class_embeddings", "normalize", "unit_at_stride", "raw_norm"}
        assert out["normalize"] is True and out["unit_at_stride"] is False
        assert out["embeddings"].shape == (2, 7, SIZE // 4, SIZE // 4)
        ce = out["class_embeddings"]
        assert ce.shape == (C, 7)
        assert isinstance(ce, nn.Parameter) and ce.requires_grad
        assert any(p is ce for p in model.parameters())
        assert model.class_embeddings is ce  # DESIGN.md: the ESS model owns class_embeddings [C, d]
        assert "class_embeddings" not in dict(model.named_parameters())  # a view, no second state-dict key


@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_output_stride_16(backbone):
    model = _model(backbone, "ess").eval()
    with torch.no_grad():
        feats = model.backbone(_images(b=1))
    assert feats[-1].shape[-2:] == (SIZE // 16, SIZE // 16)
    assert model.backbone.feature_info.reduction()[-1] == 16
    stride4 = model.backbone.feature_info.reduction().index(4)
    assert feats[stride4].shape[-2:] == (SIZE // 4, SIZE // 4)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_batch_1_train_and_eval(backbone):
    model = _model(backbone, "ess")
    x = _images(b=1)
    model.train()
    out = model(x)
    assert out["embeddings"].shape == (1, 7, SIZE // 4, SIZE // 4)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out["embeddings"].shape == (1, 7, SIZE // 4, SIZE // 4)
    assert torch.isfinite(out["embeddings"]).all()


def _convs(module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_deeplab_structure():
    model = _model("resnet18", "baseline")
    aspp_convs = _convs(model.aspp)
    atrous = [m for m in aspp_convs if m.kernel_size == (3, 3)]
    assert sorted(m.dilation[0] for m in atrous) == [6, 12, 18]
    assert all(m.dilation[0] == m.dilation[1] == m.padding[0] == m.padding[1] for m in atrous)
    assert all(m.out_channels == 256 for m in aspp_convs)
    low_convs = _convs(model.low_proj)
    assert len(low_convs) == 1
    low = low_convs[0]
    assert low.out_channels == 48 and low.kernel_size == (1, 1)
    stride4 = model.backbone.feature_info.reduction().index(4)
    assert low.in_channels == model.backbone.feature_info.channels()[stride4]
    decoder = [m for m in _convs(model.decoder) if m.kernel_size == (3, 3)]
    assert len(decoder) == 2 and all(m.out_channels == 256 for m in decoder)
    assert decoder[0].in_channels == 256 + 48
    head = _convs(model.head)
    assert len(head) == 1 and head[0].kernel_size == (1, 1)
    assert head[0].out_channels == C and head[0].bias is not None
    ess_head = _convs(_model("resnet18", "ess").head)
    assert len(ess_head) == 1 and ess_head[0].out_channels == 7


def _has_batchnorm(model):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_groupnorm_removes_all_batchnorm(backbone):
    assert _has_batchnorm(_model(backbone, "ess"))  # the check can fail
    model = _model(backbone, "ess", norm="gn")
    assert not _has_batchnorm(model)
    assert any(isinstance(m, nn.GroupNorm) for m in model.backbone.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.aspp.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.decoder.modules())


def test_groupnorm_model_trains_a_step():
    # mobilenetv2 uses timm's BatchNormAct2d, the harder case for the swap
    model = _model("mobilenetv2_100", "ess", norm="gn").train()
    target = torch.randint(0, C, (2, SIZE, SIZE), generator=torch.Generator().manual_seed(1))
    target[:, :4] = IGNORE_INDEX
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, _ = segmentation_loss(model(_images()), target, MethodConfig(k=3))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.head.class_embeddings.grad is not None and model.head.class_embeddings.grad.abs().sum() > 0
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("backbone.") for n in changed)
    assert any("class_embeddings" in n for n in changed)


def test_batchnorm_to_groupnorm_keeps_affine_and_activation():
    bn = nn.BatchNorm2d(64)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    module = batchnorm_to_groupnorm(nn.Sequential(nn.Conv2d(3, 64, 1), bn, nn.Sequential(nn.BatchNorm2d(6))))
    assert not _has_batchnorm(module)
    gn = module[1]
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4 and gn.num_channels == 64  # 16 channels each
    assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias)
    assert isinstance(module[2][0], nn.GroupNorm) and module[2][0].num_groups == 1  # 6 < 16 channels
    # timm's BatchNormAct2d: its activation must survive the swap
    from timm.layers import BatchNormAct2d
    swapped = batchnorm_to_groupnorm(nn.Sequential(BatchNormAct2d(32, act_layer=nn.ReLU)))
    assert not _has_batchnorm(swapped)
    x = torch.randn(2, 32, 4, 4)
    assert (swapped(x) >= 0).all()  # ReLU kept


def test_unknown_backbone_raises_model_error():
    with pytest.raises(ModelError, match="resnet_does_not_exist"):
        build_model("resnet_does_not_exist", C, "ess")


def test_backbone_without_output_stride_raises_model_error():
    with pytest.raises(ModelError, match="vit_small_patch16_224"):
        build_model("vit_small_patch16_224", C, "ess")


def test_unknown_method_raises_model_error():
    with pytest.raises(ModelError, match="knn"):
        build_model("resnet18", C, "knn")


def test_pretrained_without_network_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    try:  # huggingface_hub reads these at import time
        import huggingface_hub.constants as hf_constants
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True, raising=False)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    except ImportError:
        pass
    start = time.monotonic()
    with pytest.raises(ModelError, match="resnet18") as err:
        build_model("resnet18", C, "ess", pretrained=True)
    assert "pretrained" in str(err.value)
    assert time.monotonic() - start < 20


def test_pretrained_backbone_without_weights_says_so():
    with pytest.raises(ModelError, match=r"model.pretrained: timm has no pretrained weights for 'mobilenetv2_075'"):
        build_model("mobilenetv2_075", C, "ess", pretrained=True)


def _near_tie_free(values, gap=1e-4):
    """Pixels whose best and second-best scores differ by more than `gap`."""
    top2 = values.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) > gap


def test_predict_labels_ess_is_argmin_to_normalised_class_embeddings():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 7, 8, 8, generator=g, dtype=torch.float64)
    mu = torch.randn(C, 7, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1, 3, 10, 0.5],
                                                                              dtype=torch.float64)[:, None]
    labels = predict_labels({"embeddings": emb, "class_embeddings": mu}, (32, 32))
    assert labels.shape == (2, 32, 32) and labels.dtype == torch.int64
    up = F.interpolate(emb, size=(32, 32), mode="bilinear", align_corners=False)
    pix = up.permute(0, 2, 3, 1).reshape(-1, 7)
    pix = pix / pix.norm(dim=1, keepdim=True)
    mu_hat = mu / mu.norm(dim=1, keepdim=True)
    dist = torch.cdist(pix, mu_hat) ** 2
    ref = dist.argmin(1)
    ok = _near_tie_free(-dist)
    assert ok.float().mean() > 0.99
    assert torch.equal(labels.reshape(-1)[ok], ref[ok])
    # class-embedding norms must not matter (scaled class 3 does not win everywhere)
    unnormalised = torch.cdist(pix, mu).argmin(1)
    assert not torch.equal(ref, unnormalised)


def test_predict_labels_without_normalisation_is_nearest_in_raw_l2():
    # method.normalize = false trains -|x - mu|^2 / tau on raw vectors: x = (2, 0) is nearer (L2) to
    # (1.9, 0.5) than to (3, 0), though (3, 0) has its direction
    emb = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)
    mu = torch.tensor([[3.0, 0.0], [1.9, 0.5]])
    assert predict_labels({"embeddings": emb, "class_embeddings": mu, "normalize": False}, (1, 1)).item() == 1
    assert predict_labels({"embeddings": emb, "class_embeddings": mu, "normalize": True}, (1, 1)).item() == 0
    head = build_model("resnet18", C, "ess", embed_dim=7, normalize=False).head
    assert head(torch.randn(1, 256, 2, 2))["normalize"] is False


def test_predict_labels_of_essnet_normalises_before_upsampling():
    # method.variant = "essnet" trains on unit vectors at stride 4, upsampled and not renormalised:
    # between (10, 0) and (0, 1) the middle pixel is (0.5, 0.5) there, nearest (0.707, 0.707); the
    # paper's order (upsample, then normalise) gives (0.995, 0.0995), nearest (1, 0)
    mu = torch.tensor([[1.0, 0.0], [0.6, 0.6]])  # not unit: essnet_loss normalises the class embeddings
    head = build_model("resnet18", C, "ess", embed_dim=2, variant="essnet").head
    head.proj.weight.data = torch.eye(2, 256)[:, :, None, None]
    head.proj.bias.data.zero_()
    head.class_embeddings.data = mu
    features = torch.zeros(1, 256, 1, 2)
    features[0, 0, 0, 0], features[0, 1, 0, 1] = 10.0, 1.0
    out = head(features)
    assert out["unit_at_stride"] is True and torch.allclose(out["embeddings"].norm(dim=1), torch.ones(1, 2))
    assert predict_labels(out, (1, 3))[0, 0, 1].item() == 1
    raw = {"embeddings": features[:, :2], "class_embeddings": mu}
    assert predict_labels(raw, (1, 3))[0, 0, 1].item() == 0
    assert build_model("resnet18", C, "ess", embed_dim=2).head(features)["unit_at_stride"] is False


@pytest.mark.parametrize("flags", [{}, {"normalize": False}, {"unit_at_stride": True}])
def test_bounded_prediction_is_the_nearest_class_search(flags, monkeypatch):
    """method.knn_at = "feature_exact" predicts through the bound at stride 4: the same labels as the
    search per pixel (ignoring fp32 near-ties), in the distance each variant trained."""
    g = torch.Generator().manual_seed(2)
    emb = F.avg_pool2d(torch.randn(2, 6, 9, 8, generator=g), 3, 1, 1, count_include_pad=False)
    if flags.get("unit_at_stride"):
        emb = F.normalize(emb, dim=1)
    out = {"embeddings": emb, "class_embeddings": torch.randn(300, 6, generator=g), **flags}
    exact = predict_labels(out, (35, 31))
    import esskit.models.heads as heads
    built = []
    monkeypatch.setattr(heads, "bounded_neighbours", lambda *a: built.append(a[-1]) or bounded_neighbours(*a))
    bounded = predict_labels(out, (35, 31), bounded=3)  # method.knn_bound_keys = 3
    assert built == [3]
    up = F.interpolate(emb.double(), size=(35, 31), mode="bilinear", align_corners=False)
    pix = up.permute(0, 2, 3, 1).reshape(-1, 6)
    mu = out["class_embeddings"].double()
    if flags.get("normalize", True):
        mu = mu / mu.norm(dim=1, keepdim=True)
        pix = pix if flags.get("unit_at_stride") else pix / pix.norm(dim=1, keepdim=True)
    ok = _near_tie_free(-torch.cdist(pix, mu) ** 2)
    assert ok.float().mean() > 0.99
    assert torch.equal(bounded.reshape(-1)[ok], exact.reshape(-1)[ok])
    # maps already at label size: the search per pixel, whatever `bounded` says
    full = {**out, "embeddings": up.float()}
    assert torch.equal(predict_labels(full, (35, 31), bounded=2), predict_labels(full, (35, 31))) and built == [3]
    # an empty batch: nothing to predict, as without the bound
    assert predict_labels({**out, "embeddings": emb[:0]}, (35, 31), bounded=2).shape == (0, 35, 31)


def test_bounded_prediction_keeps_the_chunk_budget(monkeypatch):
    import esskit.knn as knn
    seen, blocks = [], knn._knn_blocks
    monkeypatch.setattr(knn, "_knn_blocks", lambda q, keys, k, chunk: seen.append(chunk) or blocks(q, keys, k, chunk))
    g = torch.Generator().manual_seed(0)
    out = {"embeddings": torch.randn(1, 4, 16, 16, generator=g), "class_embeddings": torch.randn(300, 4, generator=g)}
    predict_labels(out, (64, 64), 2**16, bounded=2)
    assert seen and set(seen) == {2**16}


def test_predict_labels_baseline_is_argmax_of_upsampled_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, C, 8, 8, generator=g, dtype=torch.float64)
    labels = predict_labels({"logits": logits}, (30, 34))
    assert labels.shape == (2, 30, 34)
    up = F.interpolate(logits, size=(30, 34), mode="bilinear", align_corners=False)
    ref = up.argmax(1)
    flat = up.permute(0, 2, 3, 1).reshape(-1, C)
    ok = _near_tie_free(flat).view(2, 30, 34)
    assert ok.float().mean() > 0.99
    assert torch.equal(labels[ok], ref[ok])
    # argmax before upsampling is different: the test distinguishes the two
    assert not torch.equal(ref, F.interpolate(logits.argmax(1, keepdim=True).double(), size=(30, 34),
                                              mode="nearest").long()[:, 0])


def test_predict_labels_on_model_output():
    method = "ess"
    model = _model("mobilenetv2_100", method).eval()
    with torch.no_grad():
        out = model(_images())
    labels = predict_labels(out, (SIZE, SIZE))
    assert labels.shape == (2, SIZE, SIZE)
    assert labels.min() >= 0 and labels.max() < C
    if method == "ess":
        up = F.interpolate(out["embeddings"].double(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        pix = F.normalize(up.permute(0, 2, 3, 1).reshape(-1, 7), dim=1)
        dist = torch.cdist(pix, F.normalize(out["class_embeddings"].double(), dim=1)) ** 2
        ok = _near_tie_free(-dist, 1e-5)
        assert torch.equal(labels.reshape(-1)[ok], dist.argmin(1)[ok])


@pytest.mark.parametrize("backbone", ["hrnet_w18_small", "dla34", "vgg11", "ghostnet_100"])
def test_backbone_that_asserts_output_stride_32_raises_model_error(backbone):
    # timm refuses dilation in these with a bare `assert output_stride == 32`
    with pytest.raises(ModelError, match=backbone):
        build_model(backbone, C, "ess")
