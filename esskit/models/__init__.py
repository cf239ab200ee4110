"""Model creation: `build_model` (DeepLabV3+ on timm) and `predict_labels`."""

from esskit.models.deeplab import build_model
from esskit.models.heads import predict_labels

__all__ = ["build_model", "predict_labels"]
