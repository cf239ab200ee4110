"""DeepLabV3+ on a timm `features_only` backbone (output stride 16), with a baseline or ESS head."""

from __future__ import annotations

import difflib

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from esskit.errors import ModelError
from esskit.models.heads import ClassifierHead, EmbeddingHead

ASPP_RATES = (6, 12, 18)
ASPP_CHANNELS = 256
LOW_LEVEL_CHANNELS = 48


def norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "gn":
        return nn.GroupNorm(_gn_groups(channels), channels)
    return nn.BatchNorm2d(channels)


GN_GROUP_CHANNELS = 16  # Table 5 caption: "groups of 16-channels for both methods"


def _gn_groups(channels: int) -> int:
    """Groups of 16 channels (paper Table 5); the nearest divisor when 16 does not divide."""
    return next(g for g in range(max(1, channels // GN_GROUP_CHANNELS), 0, -1) if channels % g == 0)


def conv_norm_act(cin: int, cout: int, kernel: int, norm: str, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
                         norm_layer(norm, cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three 3x3 atrous convs and image pooling."""

    def __init__(self, cin: int, norm: str):
        super().__init__()
        self.branches = nn.ModuleList([conv_norm_act(cin, ASPP_CHANNELS, 1, norm)] + [
            conv_norm_act(cin, ASPP_CHANNELS, 3, norm, dilation=r) for r in ASPP_RATES])
        # No norm after the pooled 1x1 conv: BatchNorm over a 1x1 map fails for batch 1 in training.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, ASPP_CHANNELS, 1),
                                  nn.ReLU(inplace=True))
        self.project = conv_norm_act(ASPP_CHANNELS * (len(ASPP_RATES) + 2), ASPP_CHANNELS, 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3Plus(nn.Module):
    def __init__(self, backbone: nn.Module, low_index: int, head: nn.Module, norm: str, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.low_index = low_index
        channels = backbone.feature_info.channels()
        self.aspp = ASPP(channels[-1], norm)
        self.low_proj = conv_norm_act(channels[low_index], LOW_LEVEL_CHANNELS, 1, norm)
        self.decoder = nn.Sequential(
            conv_norm_act(ASPP_CHANNELS + LOW_LEVEL_CHANNELS, ASPP_CHANNELS, 3, norm),
            conv_norm_act(ASPP_CHANNELS, ASPP_CHANNELS, 3, norm),
            nn.Dropout2d(dropout))
        self.head = head

    @property
    def class_embeddings(self) -> nn.Parameter:
        """ESS's learnable class embeddings [C, d] (the head's parameter; DESIGN.md's public name)."""
        return self.head.class_embeddings

    def forward(self, images: torch.Tensor) -> dict:
        """Head outputs at stride 4 (the loss and prediction upsample to label size)."""
        feats = self.backbone(images)
        low = self.low_proj(feats[self.low_index])
        high = F.interpolate(self.aspp(feats[-1]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.decoder(torch.cat([high, low], dim=1)))


def create_backbone(name: str, pretrained: bool) -> nn.Module:
    """timm's `name` as a dilated (output stride 16) feature extractor; its failures as one-line errors."""
    try:
        return timm.create_model(name, features_only=True, output_stride=16, pretrained=pretrained)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
            raise ModelError(f"model.backbone = {name!r} is not a timm model{hint}") from None
        if pretrained and "No pretrained weights" in str(e):
            raise ModelError(f"model.pretrained: timm has no pretrained weights for {name!r}; set model.pretrained "
                             f"= false or pick a backbone that has them (timm.list_pretrained())") from None
        raise ModelError(f"model.backbone = {name!r} cannot build a dilated features_only model: {e}") from None
    except TypeError as e:
        raise ModelError(f"model.backbone = {name!r} does not support features_only with "
                         f"output_stride=16 ({e}); use a CNN such as resnet50 or mobilenetv2_100") from None
    except AssertionError as e:  # timm's `assert output_stride == 32` (hrnet, dla, vgg, dpn, vovnet, ghostnet...)
        raise ModelError(f"model.backbone = {name!r} does not support a dilated output_stride=16 in timm"
                         f"{f' ({e})' if str(e) else ''}; use a CNN such as resnet50 or mobilenetv2_100") from None
    except Exception as e:  # download / hub / checkpoint failures
        if not pretrained:
            raise
        raise ModelError(f"model.pretrained: could not load weights for {name!r} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); set model.pretrained = false or "
                         f"put the weights in the Hugging Face cache (HF_HUB_OFFLINE=1)") from None


def _set_bn_momentum(module: nn.Module, momentum: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (timm's BatchNormAct2d keeps its activation) by GroupNorm."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            gn = nn.GroupNorm(_gn_groups(child.num_features), child.num_features, eps=child.eps)
            if child.affine:
                gn.weight.data.copy_(child.weight.data)
                gn.bias.data.copy_(child.bias.data)
            extra = [getattr(child, a) for a in ("drop", "act") if isinstance(getattr(child, a, None), nn.Module)]
            setattr(module, name, nn.Sequential(gn, *extra) if extra else gn)
        else:
            batchnorm_to_groupnorm(child)
    return module


def build_model(backbone: str, num_classes: int, method: str, embed_dim: int = 12, norm: str = "bn",
                pretrained: bool = False, backbone_bn_momentum: float | None = None,
                normalize: bool = True, variant: str = "paper") -> DeepLabV3Plus:
    """DeepLabV3+ (output stride 16, ASPP 6/12/18, 48-ch stride-4 projection, two 3x3 256 convs)
    ending in a 1x1 conv to C (`method="baseline"`) or to `embed_dim` with class embeddings
    (`"ess"`, `"ess_full"`; `normalize`, `variant`: method.normalize and method.variant, which set
    the distance prediction uses)."""
    body = create_backbone(backbone, pretrained)
    reductions = body.feature_info.reduction()
    if 4 not in reductions or reductions[-1] != 16:
        raise ModelError(f"model.backbone = {backbone!r} gives feature strides {reductions}; DeepLabV3+ needs "
                         f"a stride-4 and a (dilated) stride-16 feature")
    if norm == "gn":
        batchnorm_to_groupnorm(body)
    elif backbone_bn_momentum is not None:
        _set_bn_momentum(body, backbone_bn_momentum)
    if method == "baseline":
        head = ClassifierHead(ASPP_CHANNELS, num_classes)
    elif method in ("ess", "ess_full"):  # ess_full: same head and inference, full-softmax loss
        head = EmbeddingHead(ASPP_CHANNELS, num_classes, embed_dim, normalize,
                             unit_at_stride=method == "ess" and variant == "essnet")
    else:
        raise ModelError(f"method {method!r} is not one of 'baseline', 'ess', 'ess_full'")
    return DeepLabV3Plus(body, reductions.index(4), head, norm)
