"""timm backbones that return pooled embeddings, with the mistakes caught up front."""

from __future__ import annotations

import difflib
import os
import socket
from typing import Any

import timm
from torch import nn

HF_HOST = "huggingface.co"


def _hub_reachable(host: str = HF_HOST, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` for a name timm does not know, suggesting close names."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean one of {close}?" if close else " See timm.list_models()."
    raise ValueError(f"unknown timm model {name!r}.{hint}")


AA_LAYERS = ("blurpool", "avgpool")


def anti_aliasing_layer(name: str) -> type[nn.Module]:
    """timm's anti-aliasing layer class for ``aa_layer: blurpool`` or ``aa_layer: avgpool``.

    ``aa_layer: blurpool`` is timm's ``BlurPool2d`` placement, *not* the FFCV / MRL recipe's:
    timm blurs after the stem max-pool (run at stride 1) and after each ``conv2`` (run at
    stride 1), leaves the downsample path unblurred, and costs 10.26 GFLOPs per 224 px
    ResNet-50 image instead of 8.17. For the recipe's network (and to load its checkpoints)
    use ``create_backbone(name, blurpool=True)``; see :mod:`mrl_vision.blurpool`.
    """
    from timm.layers import BlurPool2d

    layers = {"blurpool": BlurPool2d, "avgpool": nn.AvgPool2d}
    if name not in layers:
        raise ValueError(f"unknown aa_layer {name!r}; choose one of {AA_LAYERS}")
    return layers[name]


def create_backbone(
    name: str,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    blurpool: bool = False,
    input_size: int | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, int]:
    """A timm model without its classifier, and the width of the features it returns.

    Args:
        name: any ``timm.list_models()`` name, e.g. ``"resnet50"`` or ``"vit_small_patch16_224"``.
        pretrained: load timm's pretrained weights. They are downloaded from the Hugging Face
            Hub, so without network access this fails at once with a clear message, unless
            ``pretrained_file`` points at the weights on disk or ``HF_HUB_OFFLINE=1`` is set
            and they are in the local cache.
        pretrained_file: a local ``.safetensors``/``.pth`` file of timm weights for ``name``.
        blurpool: the FFCV / MRL recipe's BlurPool (:func:`mrl_vision.blurpool.apply_blurpool`):
            every strided conv reading >= 16 channels (in a ResNet-50 ``layer{2,3,4}.0.conv2``
            and ``layer{2,3,4}.0.downsample.0``) gets a fixed depthwise 3x3 blur before it.
            Applied after the model is built and any pretrained weights are loaded. This is the
            network of the released MRL ResNet-50 checkpoints (same state dict keys) and costs
            under 1 % more FLOPs. ``ValueError`` when the model has no such conv (e.g. a ViT)
            or when ``aa_layer`` is also given.
        input_size: the side of the images it will see: checked against the smallest the network
            takes (its total stride; a ViT's patch grid), and given to ViTs as ``img_size`` when
            ``kwargs`` has none, so ``vit_tiny_patch16_224`` trains at 32 px as it is.
        kwargs: passed to ``timm.create_model`` (``img_size``, ``drop_path_rate``, ``in_chans``...).
            ``aa_layer: blurpool`` / ``aa_layer: avgpool`` select timm's own anti-aliasing of
            ResNets (see :func:`anti_aliasing_layer`), a different and 26 % costlier network
            than the recipe's ``blurpool=True``.

    Returns ``(model, width)``: ``model(x)`` gives pooled features ``[N, width]``.

    Example::

        backbone, width = create_backbone("resnet50")  # width == 2048
        backbone, width = create_backbone("resnet50", blurpool=True)  # the MRL recipe's network
    """
    check_model_name(name)
    if blurpool and kwargs.get("aa_layer") is not None:
        raise ValueError(
            f"blurpool=True and aa_layer={kwargs['aa_layer']!r} are two different anti-aliasing "
            "schemes; choose one (blurpool=True is the FFCV / MRL recipe's)"
        )
    if isinstance(kwargs.get("aa_layer"), str):  # YAML can name timm's anti-aliasing layer
        kwargs["aa_layer"] = anti_aliasing_layer(kwargs["aa_layer"])
    if pretrained_file is not None:
        if not os.path.isfile(pretrained_file):
            raise FileNotFoundError(f"pretrained_file {pretrained_file!r} does not exist")
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = dict(file=os.path.abspath(pretrained_file))
    elif pretrained and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "") and not _hub_reachable():
        raise RuntimeError(
            f"pretrained=True needs timm's weights for {name!r} from {HF_HOST}, which cannot be "
            "reached from this machine. Set pretrained=False to train from scratch, pass "
            "pretrained_file=PATH with weights downloaded elsewhere, or set HF_HUB_OFFLINE=1 if "
            "they are already in the Hugging Face cache."
        )
    model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    if input_size is not None:
        model = _fit_input_size(model, name, input_size, pretrained, kwargs)
    if blurpool:
        from .blurpool import apply_blurpool

        if not apply_blurpool(model):
            raise ValueError(
                f"blurpool=True found no strided nn.Conv2d with >= 16 input channels to blur in "
                f"timm model {name!r}; the recipe's BlurPool applies to CNNs such as ResNets"
            )
    width = getattr(model, "head_hidden_size", None) or model.num_features
    return model, int(width)


def _fit_input_size(model: nn.Module, name: str, size: int, pretrained: bool, kwargs: dict) -> nn.Module:
    """``model`` checked against images of side ``size`` (rebuilt at that size when it is a ViT
    built for another and ``img_size`` was not given): ``ValueError`` naming the smallest size."""
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if patch is not None:
        step = max(patch)
        if size < step or size % step:
            smallest = max(step, size // step * step)
            raise ValueError(f"input size {size} px does not fit {name!r}: its {step} px patches need a multiple of "
                             f"{step} (e.g. {smallest} or {smallest + step})")
        if tuple(getattr(patch_embed, "img_size", ())) != (size, size) and "img_size" not in kwargs:
            model = timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=size, **kwargs)
        return model
    info = getattr(model, "feature_info", None)
    reduction = info[-1].get("reduction") if isinstance(info, list) and info else None
    if reduction and size < reduction:
        raise ValueError(f"input size {size} px is smaller than the smallest {name!r} takes: {reduction} px (its total "
                         f"stride; smaller images end as a single blurred pixel): use an image size >= {reduction}")
    return model

