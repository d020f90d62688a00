"""Optimizers (timm's factory and parameter groups) and per-iteration learning-rate schedules."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("triangular", "cosine", "constant")


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    layer_decay: float | None = None,
) -> torch.optim.Optimizer:
    """``sgd`` (momentum, optional Nesterov) or ``adamw`` through timm's ``create_optimizer_v2``.

    timm's parameter groups: no weight decay on parameters with fewer than two dimensions (biases,
    norm scales) or named by the model's ``no_weight_decay()`` (ViT position embeddings, class
    tokens); with ``layer_decay``, one group per block of the model's ``group_matcher()``, whose LR
    is ``lr * layer_decay ** (depth from the top)``. That scale is folded into each group's ``lr``,
    so any ``torch.optim.lr_scheduler`` (which multiplies the groups' initial LRs) keeps it.
    """
    from timm.optim import create_optimizer_v2

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    timm_name = {"sgd": "sgd" if nesterov else "momentum", "adamw": "adamw"}[name]
    kwargs = {"momentum": momentum} if name == "sgd" else {}
    opt = create_optimizer_v2(model, opt=timm_name, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay, **kwargs)
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return opt


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
