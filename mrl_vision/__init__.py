"""mrl-vision: Matryoshka Representation Learning for vision, on timm and PyTorch Lightning."""

from .heads import FixedFeatureHead, MatryoshkaHead, default_nesting, validate_nesting
from .losses import MatryoshkaLoss
from .metrics import MatryoshkaAccuracy
from .model import MatryoshkaClassifier

__version__ = "0.1.0"

__all__ = [
    "FixedFeatureHead",
    "MatryoshkaAccuracy",
    "MatryoshkaClassifier",
    "MatryoshkaHead",
    "MatryoshkaLoss",
    "default_nesting",
    "validate_nesting",
]
