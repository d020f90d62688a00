"""Optimizers and per-iteration learning-rate schedules for the Lightning module."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("triangular", "cosine", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; biases, norm parameters and timm's ``no_weight_decay()``
    names (position embeddings, class tokens) without it.

    A parameter is "no decay" when it has fewer than two dimensions (biases, BatchNorm and
    LayerNorm scales) or when a module lists it in ``no_weight_decay()``.
    """
    skip: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            skip |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    name: str,
    groups: Iterable[dict],
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """``"sgd"`` (momentum, optional Nesterov) or ``"adamw"``; weight decay comes from the groups."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def lr_factor(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step ``t`` (for ``LambdaLR``, stepped per iteration).

    - ``triangular`` (the reference recipe): linear from 0 to 1 over ``warmup_steps`` (the
      peak epoch), then linear to 0 at ``total_steps``.
    - ``cosine``: linear warm-up, then half a cosine down to 0 at ``total_steps``.
    - ``constant``: linear warm-up, then 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; choose one of {SCHEDULES}")
    total = max(1, total_steps)
    warm = min(max(0, warmup_steps), total)

    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        if schedule == "constant":
            return 1.0
        progress = (t - warm) / max(1, total - warm)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "triangular":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
