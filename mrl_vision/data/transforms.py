"""torchvision transforms for the training and evaluation pipelines."""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_resize(image_size: int, crop_ratio: float) -> int:
    """Side of the resize before the center crop: 224 px at ratio 224/256 resizes to 256."""
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    return int(round(image_size / crop_ratio))


def train_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    auto_augment: str | None = None,
    random_erasing: float = 0.0,
) -> v2.Compose:
    """RandomResizedCrop + horizontal flip (+ ``auto_augment``), then float and normalise (+ ``random_erasing``);
    PIL image or uint8 tensor in. The two options are spelled as in :mod:`mrl_vision.data.augment`."""
    from .augment import sample_transforms

    before, after = sample_transforms(auto_augment, random_erasing)
    ops = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=scale, ratio=ratio, antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    ops += [*before, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), *after]
    return v2.Compose(ops)


def eval_transform(
    image_size: int,
    crop_ratio: float = 224 / 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Resize the short side to ``image_size / crop_ratio``, center crop ``image_size``, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(eval_resize(image_size, crop_ratio), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
