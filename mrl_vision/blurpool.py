"""The BlurPool of the MRL / FFCV ResNet-50 recipe, as in the released MRL checkpoints.

The recipe (ffcv-imagenet, used by RAIVNLab/MRL for every released ResNet-50) anti-aliases a
network by wrapping each strided convolution in a :class:`BlurPoolConv2d`:

- every ``nn.Conv2d`` with ``stride > 1`` and ``in_channels >= 16`` is wrapped (in a ResNet-50:
  ``layer{2,3,4}.0.conv2`` and ``layer{2,3,4}.0.downsample.0``; the stem ``conv1`` reads 3 channels
  and stays as it is);
- the wrapper first runs a fixed depthwise 3x3 blur, ``[1, 2, 1] x [1, 2, 1] / 16`` (i.e.
  ``[[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16``, one copy per input channel, shape ``[C_in, 1, 3, 3]``)
  at stride 1, padding 1, ``groups=C_in``, no bias, then the original strided conv, unchanged;
- state dict keys: the wrapped conv is the attribute ``conv`` (``layer2.0.conv2.conv.weight``) and
  the filter is the persistent buffer ``blur_filter`` (``layer2.0.conv2.blur_filter``), so the
  reference checkpoints map onto a network built with :func:`apply_blurpool` key for key.

Cost: the blur adds one depthwise 3x3 pass over the inputs of the six wrapped convs, 0.038 GFLOPs
per 224 px image on a ResNet-50: 8.21 GFLOPs against 8.17 (+0.46 %,
``torch.utils.flop_counter.FlopCounterMode``); it adds no parameters (the filter is a buffer).

This is *not* timm's ``aa_layer=BlurPool2d`` (``backbone_kwargs: {aa_layer: blurpool}``), which
builds a different network: the stem max-pool runs at stride 1 followed by a blur-subsample, each
strided ``conv2`` runs at stride 1 and is followed by a blur-subsample, and the downsample path
is not blurred. That network costs 10.26 GFLOPs per 224 px image (+26 %), and its state dict does
not match the reference checkpoints. See ``benchmarks/flops.py``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# The binomial [1, 2, 1] filter's outer product, normalised to sum to 1.
_BLUR_1D = (1.0, 2.0, 1.0)


def blur_kernel(channels: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The depthwise blur filter ``[channels, 1, 3, 3]``: ``[1, 2, 1] x [1, 2, 1] / 16`` per channel."""
    k = torch.tensor(_BLUR_1D, dtype=dtype, device=device)
    k2d = torch.outer(k, k) / k.sum() ** 2
    return k2d.expand(channels, 1, 3, 3).contiguous()


class BlurPoolConv2d(nn.Module):
    """A strided ``nn.Conv2d`` that reads a blurred copy of its input (the recipe's BlurPool).

    ``forward(x) = conv(depthwise_blur(x))``: the blur runs at stride 1 with padding 1, so the
    spatial size and the wrapped conv's output are those of the conv alone.

    Attributes:
        conv: the wrapped convolution (its parameters keep their names under ``conv.``).
        blur_filter: persistent buffer ``[conv.in_channels, 1, 3, 3]``.

    Example::

        layer = BlurPoolConv2d(nn.Conv2d(64, 128, 3, stride=2, padding=1))
        layer(torch.randn(2, 64, 56, 56)).shape   # [2, 128, 28, 28]
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"BlurPoolConv2d wraps an nn.Conv2d, got {type(conv).__name__}")
        self.conv = conv
        w = conv.weight
        self.register_buffer("blur_filter", blur_kernel(conv.in_channels, dtype=w.dtype, device=w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x, self.blur_filter.to(x.dtype), bias=None, stride=1, padding=1, groups=self.conv.in_channels)
        return self.conv(blurred)

    def extra_repr(self) -> str:
        return "blur=[1,2,1]x[1,2,1]/16, depthwise, stride 1"


def _wants_blur(module: nn.Module, min_channels: int) -> bool:
    return isinstance(module, nn.Conv2d) and max(module.stride) > 1 and module.in_channels >= min_channels


def apply_blurpool(model: nn.Module, min_channels: int = 16) -> list[str]:
    """Wrap, in place, every strided ``nn.Conv2d`` of ``model`` in a :class:`BlurPoolConv2d`.

    A conv is wrapped when its stride is above 1 (in either dimension) and it reads at least
    ``min_channels`` channels (16 in the recipe, which leaves the RGB stem alone). Convs already
    inside a :class:`BlurPoolConv2d` are never wrapped again, so calling this twice changes nothing.

    Returns the names (as in ``model.named_modules()`` before wrapping) of the convs wrapped by
    this call; for timm's or torchvision's ``resnet50``::

        ['layer2.0.conv2', 'layer2.0.downsample.0', 'layer3.0.conv2', 'layer3.0.downsample.0',
         'layer4.0.conv2', 'layer4.0.downsample.0']

    Parameters keep their values (pretrained weights loaded before stay loaded); their names
    gain a ``.conv`` (``layer2.0.conv2.weight`` -> ``layer2.0.conv2.conv.weight``).
    """
    if isinstance(model, nn.Conv2d):
        raise TypeError("apply_blurpool wraps convs inside a model; wrap a lone conv with BlurPoolConv2d(conv)")
    inside_wrapper: set[int] = set()
    for module in model.modules():
        if isinstance(module, BlurPoolConv2d):
            inside_wrapper.update(id(m) for m in module.modules())
    targets = [
        name
        for name, module in model.named_modules()
        if name and id(module) not in inside_wrapper and _wants_blur(module, min_channels)
    ]
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, BlurPoolConv2d(getattr(parent, attr)))
    return targets
