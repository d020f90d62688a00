"""The Matryoshka loss: a weighted sum of cross-entropy over sizes."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class MatryoshkaLoss(nn.Module):
    """``sum_g weights[g] * CE(logits[g], target)`` over the G sizes.

    Args:
        num_sizes: G, the number of sizes the logits hold.
        weights: one non-negative weight per size (default: all 1, as in the MRL paper).
        label_smoothing: passed to cross-entropy (the reference recipe uses 0.1).

    ``forward(logits: [G, N, C], target: [N]) -> scalar``; ``target`` may also be class probabilities
    ``[N, C]`` (soft targets of Mixup/CutMix: :mod:`mrl_vision.mixup`). The weights are a buffer, so they
    follow the module to the logits' device (the reference builds them on the CPU).

    Example::

        loss_fn = MatryoshkaLoss(num_sizes=9, label_smoothing=0.1)
        loss = loss_fn(head(z), y)
    """

    weights: torch.Tensor

    def __init__(
        self, num_sizes: int, weights: Sequence[float] | None = None, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        if num_sizes < 1:
            raise ValueError(f"num_sizes must be >= 1, got {num_sizes}")
        if weights is None:
            weights = [1.0] * num_sizes
        weights = [float(w) for w in weights]
        if len(weights) != num_sizes:
            raise ValueError(
                f"loss weights must hold one value per size ({num_sizes}), "
                f"got {len(weights)}: {weights}"
            )
        bad = [w for w in weights if not math.isfinite(w) or w < 0]
        if bad:
            raise ValueError(f"loss weights must be finite and >= 0, got {bad[0]} in {weights}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.register_buffer("weights", torch.tensor(weights), persistent=False)

    def per_size(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of each size: ``[G, N, C], [N] -> [G]`` (one fused call)."""
        g, n, c = logits.shape
        if self.weights.numel() != g:
            raise ValueError(f"logits hold {g} sizes but the loss has {self.weights.numel()} weights")
        if target.dim() == 2:  # class probabilities (Mixup/CutMix)
            if tuple(target.shape) != (n, c):
                raise ValueError(f"soft targets must be [N, C] = [{n}, {c}], got {list(target.shape)}")
            target = target.float().repeat(g, 1)
        else:
            target = target.repeat(g)
        ce = F.cross_entropy(
            logits.reshape(g * n, c).float(),
            target,
            reduction="none",
            label_smoothing=self.label_smoothing,
        )
        return ce.view(g, n).mean(1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.per_size(logits, target) * self.weights.to(logits.device)).sum()

    def extra_repr(self) -> str:
        return f"weights={self.weights.tolist()}, label_smoothing={self.label_smoothing}"
