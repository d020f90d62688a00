"""Mixup and CutMix with soft targets for the Matryoshka loss (timm's ``Mixup``, one draw per batch).

``BatchMixing(mixup_alpha, cutmix_alpha, prob, switch_prob, num_classes)`` mixes a batch on its device and
returns the mixed images with their class probabilities ``[N, C]``; :class:`mrl_vision.losses.MatryoshkaLoss`
takes those soft targets at every size (label smoothing is the loss's, applied on top as cross-entropy
does), while the per-size accuracies stay against the hard labels. timm mixes a batch with its mirror
(``x.flip(0)``) and needs an even batch: an odd one mixes all but its last image, which keeps its own label.
"""

from __future__ import annotations

import math

import torch


class BatchMixing:
    """Mixup (``mixup_alpha``) and/or CutMix (``cutmix_alpha``) on a batch, as timm's training script does.

    Args:
        mixup_alpha / cutmix_alpha: Beta(alpha, alpha) concentration of the mixing weight; 0 turns one off.
        prob: probability of mixing a batch at all.
        switch_prob: when both are on, the probability of CutMix rather than Mixup for a batch.
        num_classes: C.

    ``__call__(x [N, ...], y [N]) -> (x mixed, probabilities [N, C])``. Draws come from NumPy's global
    generator, as in timm (``seed_everything`` seeds it).
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float, num_classes: int) -> None:
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, value in (("mixup_prob", prob), ("mixup_switch_prob", switch_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError("BatchMixing needs mixup_alpha > 0 or cutmix_alpha > 0")
        from timm.data import Mixup

        # label_smoothing=0: MatryoshkaLoss smooths (the same targets as timm's smoothed mixup)
        self.mix = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                         mode="batch", label_smoothing=0.0, num_classes=num_classes)
        self.num_classes = num_classes

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.clone()  # timm mixes in place; a loader may reuse the batch's memory
        n = x.shape[0] - x.shape[0] % 2
        target = torch.nn.functional.one_hot(y, self.num_classes).float()
        if n >= 2:
            x[:n], target[:n] = self.mix(x[:n], y[:n])
        return x, target
