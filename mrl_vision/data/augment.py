"""Per-image augmentation beyond RandomResizedCrop and flip: RandAugment / TrivialAugment and random erasing.

One spelling for both data paths (``auto_augment``, ``random_erasing`` on ``ImageFolderDataModule`` and
``FFCVDataModule``), torchvision's v2 operations underneath:

* ``auto_augment``: ``"rand-m{M}-n{N}"`` (RandAugment: N operations of magnitude M out of 30 bins;
  ``"rand"`` is ``rand-m9-n2``, timm's usual ``rand-m9``), ``"trivial"`` (TrivialAugmentWide) or ``None``.
  timm's spelling, torchvision's semantics (its ``mstd``/``inc`` suffixes are not accepted).
* ``random_erasing``: the probability of erasing one random rectangle of a normalised image with
  per-pixel normal noise (timm's ``--reprob`` in its ``pixel`` mode).

Image folders apply them per image in the loader workers (:func:`sample_transforms`). FFCV decodes in
compiled code that cannot run them, so its training batches stay ``uint8`` until they reach the device,
where :class:`BatchAugment` applies them image by image (each image its own draw), before and after
normalisation.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torchvision.transforms import v2

_RAND = re.compile(r"rand(?:-m(\d+))?(?:-n(\d+))?")


def parse_auto_augment(spec: str | None) -> v2.Transform | None:
    """The torchvision transform of an ``auto_augment`` spec (on ``uint8`` images); ``ValueError`` naming a bad one."""
    if spec is None or spec == "" or str(spec).lower() == "none":
        return None
    spec = str(spec).strip().lower()
    if spec == "trivial":
        return v2.TrivialAugmentWide()
    match = _RAND.fullmatch(spec)
    if match is None:
        raise ValueError(f"auto_augment={spec!r} is not understood; use 'rand-m9-n2' (RandAugment, magnitude "
                         "9 of 30, 2 operations), 'rand', 'trivial' (TrivialAugmentWide) or None")
    magnitude = int(match.group(1)) if match.group(1) else 9
    ops = int(match.group(2)) if match.group(2) else 2
    if not 0 <= magnitude <= 30:
        raise ValueError(f"auto_augment={spec!r}: the magnitude must be in [0, 30] (torchvision's bins), got {magnitude}")
    if ops < 1:
        raise ValueError(f"auto_augment={spec!r}: the number of operations must be >= 1, got {ops}")
    return v2.RandAugment(num_ops=ops, magnitude=magnitude, num_magnitude_bins=31)


def check_erasing(probability: float) -> float:
    """``random_erasing`` as a float in [0, 1]; ``ValueError`` naming anything else."""
    p = float(probability)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_erasing must be a probability in [0, 1], got {probability!r}")
    return p


def random_eraser(probability: float) -> v2.RandomErasing | None:
    """Random erasing of a normalised image with normal noise (timm's ``pixel`` mode), or ``None`` at 0."""
    p = check_erasing(probability)
    return v2.RandomErasing(p=p, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value="random") if p > 0 else None


def sample_transforms(auto_augment: str | None, random_erasing: float) -> tuple[list, list]:
    """The per-image operations of a training pipeline: those before normalisation (on ``uint8``) and after."""
    before = parse_auto_augment(auto_augment)
    after = random_eraser(random_erasing)
    return ([before] if before is not None else []), ([after] if after is not None else [])


class BatchAugment(nn.Module):
    """``auto_augment`` and ``random_erasing`` on a batch, image by image (each its own draw), on its device.

    ``forward(images uint8 [N, 3, H, W], normalize) -> float [N, 3, H, W]``: augments, normalises with
    ``normalize`` (a callable from ``uint8`` to float), then erases. Random numbers come from torch's
    global generator (seeded by ``seed_everything``, saved by :class:`mrl_vision.rng.RNGStateCheckpoint`).

    Example::

        augment = BatchAugment("rand-m9-n2", random_erasing=0.25)
        x = augment(uint8_batch, lambda im: (im.float() - 127.5) / 64)
    """

    def __init__(self, auto_augment: str | None = None, random_erasing: float = 0.0) -> None:
        super().__init__()
        self.spec = auto_augment
        self.before, self.after = sample_transforms(auto_augment, random_erasing)

    @property
    def active(self) -> bool:
        return bool(self.before or self.after)

    def forward(self, images: torch.Tensor, normalize) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"BatchAugment takes uint8 [N, 3, H, W] images, got {images.dtype} {list(images.shape)}")
        if self.before:
            op = self.before[0]
            images = torch.stack([op(im) for im in images])
        out = normalize(images)
        if self.after:
            op = self.after[0]
            out = torch.stack([op(im) for im in out])
        return out

    def extra_repr(self) -> str:
        return f"auto_augment={self.spec!r}, ops={self.before + self.after}"
