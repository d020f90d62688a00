"""mrl-vision: Matryoshka Representation Learning for vision, on timm and PyTorch Lightning.

- :class:`MatryoshkaModel`: the network (a timm backbone + a Matryoshka head), with no Trainer;
- :class:`MatryoshkaClassifier`: the Lightning task that trains it;
- :mod:`mrl_vision.heads`, :mod:`mrl_vision.losses`, :mod:`mrl_vision.metrics`: the MRL idea itself.
"""

from .heads import ClassifierHead, FixedFeatureHead, MatryoshkaHead, build_head, default_dims, validate_dims
from .losses import MatryoshkaLoss
from .metrics import MatryoshkaAccuracy
from .model import MatryoshkaModel
from .task import MatryoshkaClassifier

__version__ = "0.1.0"

__all__ = [
    "ClassifierHead",
    "FixedFeatureHead",
    "MatryoshkaAccuracy",
    "MatryoshkaClassifier",
    "MatryoshkaHead",
    "MatryoshkaLoss",
    "MatryoshkaModel",
    "build_head",
    "default_dims",
    "validate_dims",
]
