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
    color_jitter: float = 0.0,
    grayscale: float = 0.0,
    normalize: bool = True,
) -> v2.Compose:
    """RandomResizedCrop + horizontal flip (+ colour jitter, grey scale, ``auto_augment``), then float and
    normalise (+ ``random_erasing``); PIL image or uint8 tensor in. The two options are spelled as in
    :mod:`mrl_vision.data.augment`; ``color_jitter`` is SimCLR's strength ``s`` (brightness, contrast and
    saturation ``0.8 s``, hue ``0.2 s``, applied with probability 0.8; SimCLR uses ``s = 1`` on ImageNet,
    0.5 on CIFAR), ``grayscale`` the probability of a grey copy (SimCLR: 0.2). ``normalize=False`` stops at the
    ``uint8`` crop, for data modules that normalise on the accelerator (no ``random_erasing`` then: it works
    on normalised values)."""
    from .augment import sample_transforms

    if not 0.0 <= float(color_jitter) <= 1.0:
        raise ValueError(f"color_jitter must be a strength in [0, 1], got {color_jitter!r}")
    if not 0.0 <= float(grayscale) <= 1.0:
        raise ValueError(f"grayscale must be a probability in [0, 1], got {grayscale!r}")
    before, after = sample_transforms(auto_augment, random_erasing)
    if after and not normalize:
        raise ValueError(f"random_erasing={random_erasing} works on normalised images; it needs normalize=True")
    ops = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=scale, ratio=ratio, antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if color_jitter > 0:
        s = float(color_jitter)
        ops.append(v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8))
    if grayscale > 0:
        ops.append(v2.RandomGrayscale(grayscale))
    ops += before
    if normalize:
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), *after]
    return v2.Compose(ops)


def eval_transform(
    image_size: int,
    crop_ratio: float = 224 / 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    normalize: bool = True,
) -> v2.Compose:
    """Resize the short side to ``image_size / crop_ratio``, center crop ``image_size``, normalise (unless
    ``normalize=False``: then the ``uint8`` crop)."""
    ops = [v2.ToImage(), v2.Resize(eval_resize(image_size, crop_ratio), antialias=True), v2.CenterCrop(image_size)]
    if normalize:
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


def check_views(views: int) -> int:
    """``views`` as an int >= 1; ``ValueError`` naming anything else."""
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"views must be an integer >= 1 (views of each training image), got {views!r}")
    return views


class MultiView:
    """``views`` independent draws of ``transform`` of one image, stacked: ``[V, 3, H, W]`` (the two views of
    SimCLR and supervised contrastive learning; a batch is then ``[N, V, 3, H, W]``)."""

    def __init__(self, transform, views: int = 2) -> None:
        self.transform, self.views = transform, check_views(views)

    def __call__(self, image):
        return torch.stack([self.transform(image) for _ in range(self.views)])

    def __repr__(self) -> str:
        return f"MultiView(views={self.views}, transform={self.transform!r})"


def multi_view(transform, views: int):
    """``transform`` itself for one view, :class:`MultiView` of it for more."""
    return transform if check_views(views) == 1 else MultiView(transform, views)
