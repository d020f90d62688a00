"""Load the official MRL ResNet-50 checkpoints (RAIVNLab/MRL) into this project's modules.

The released files (``r50_mrl{0|1}_e{0|1}_ff{dim}.pt``) are state dicts of a torchvision
``resnet50`` with the recipe's BlurPool (:mod:`mrl_vision.blurpool`), saved from DDP, so every key
starts with ``module.``. timm's ``resnet50`` has the same module and parameter names and shapes as
torchvision's (stride on ``conv2``, ``downsample.0``/``downsample.1``, BN ``num_batches_tracked``),
so the backbone keys map one to one onto ``create_backbone("resnet50", blurpool=True)``. The head
depends on the model the file holds, which the user states:

==========  ==================================================  ==========================
head        keys in the file                                    keys here
==========  ==================================================  ==========================
``mrl``     ``fc.nesting_classifier_{i}.weight/bias`` [C, m_i]  ``head.linears.{i}.*``
``mrl_e``   ``fc.nesting_classifier_0.*`` [C, 2048], or in      ``head.linear.*``
            older files ``fc.weight/bias`` [C, 2048]
``ff``      ``fc.weight`` [C, m], ``fc.bias`` [C]               ``head.classifier.*``
==========  ==================================================  ==========================

``fc.weight [C, 2048]`` is ambiguous: MRL-E in the old notation (``head="mrl_e"``) or a standard
model, FF-2048 (``head="ff"``); the two compute different logits, so the head must be stated.

Example::

    sd = load_reference_state_dict("r50_mrl1_e0_ff2048.pt")
    converted = convert_reference(sd, head="mrl")
    # {"backbone": "resnet50", "blurpool": True, "head": "mrl", "dims": [8, ..., 2048],
    #  "num_classes": 1000, "state_dict": {"backbone.conv1.weight": ..., "head.linears.0.weight": ...}}
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

HEADS = ("mrl", "mrl_e", "ff")
REFERENCE_BACKBONE = "resnet50"
_DDP_PREFIX = "module."
_NESTING_KEY = re.compile(r"^fc\.nesting_classifier_(\d+)\.(weight|bias)$")
_SHOW = 5  # how many keys an error message lists


def _strip_ddp(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {(k[len(_DDP_PREFIX):] if k.startswith(_DDP_PREFIX) else k): v for k, v in state_dict.items()}


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _SHOW else shown


def load_reference_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a reference checkpoint, on the CPU, with any leading ``module.`` removed.

    Reads with ``torch.load(..., map_location="cpu", weights_only=True)``: a raw state dict (the
    reference's format) or a dict that wraps one under ``"state_dict"`` or ``"model"``.
    ``FileNotFoundError`` for a missing path, ``ValueError`` for a file holding something else.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference checkpoint {path!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping) and not isinstance(obj.get(wrapper), torch.Tensor):
            obj = obj[wrapper]
            break
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{path!r} is not a state dict of tensors: {_few([str(k) for k in not_tensors])} "
            "hold other values (a raw state dict, or one under 'state_dict' or 'model', is expected)"
        )
    return _strip_ddp(obj)


@functools.lru_cache(maxsize=2)
def _backbone_shapes(blurpool: bool) -> tuple[dict[str, tuple[int, ...]], int]:
    """Key -> shape of ``create_backbone("resnet50", blurpool=...)``'s state dict, and its width."""
    from .backbones import create_backbone

    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model, width = create_backbone(REFERENCE_BACKBONE, blurpool=blurpool)
    except Exception:  # a timm version that cannot build on the meta device
        model, width = create_backbone(REFERENCE_BACKBONE, blurpool=blurpool)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, width


def _powers_of_two(width: int, smallest: int = 8) -> list[int]:
    dims, m = [], smallest
    while m < width:
        dims.append(m)
        m *= 2
    return dims + [width]


def _describe_fc(fc: dict[str, torch.Tensor], width: int) -> str:
    """What the file's ``fc.*`` keys hold and which head they suggest, for error messages."""
    if not fc:
        return "no fc.* keys (a backbone without a classifier)"
    nesting = sorted({int(m.group(1)) for k in fc if (m := _NESTING_KEY.match(k))})
    if nesting:
        shapes = [list(fc[f"fc.nesting_classifier_{i}.weight"].shape) for i in nesting if f"fc.nesting_classifier_{i}.weight" in fc]
        what = f"{len(nesting)} nesting classifier(s) fc.nesting_classifier_{{{','.join(map(str, nesting))}}} with weights {shapes}"
        if len(nesting) == 1 and shapes and shapes[0][1] == width:
            return f"{what}: one full-width weight, which suggests head='mrl_e'"
        return f"{what}: which suggests head='mrl'"
    if "fc.weight" in fc:
        w = fc["fc.weight"]
        shape = list(w.shape)
        if w.dim() == 2 and shape[1] == width:
            return (
                f"fc.weight {shape} and fc.bias: one Linear on all {width} dims, which suggests "
                "head='mrl_e' (MRL-E in the old notation) or head='ff' (a standard model, FF-2048)"
            )
        return f"fc.weight {shape} and fc.bias: one Linear on the first {shape[-1]} dims, which suggests head='ff'"
    return f"fc keys {_few(sorted(fc))}, which match no reference head"


def _linear_pair(fc: dict[str, torch.Tensor], prefix: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [C, m], bias [C])`` of ``prefix``, checked."""
    w, b = fc.get(f"{prefix}.weight"), fc.get(f"{prefix}.bias")
    if w is None or b is None:
        missing = [f"{prefix}.{n}" for n, t in (("weight", w), ("bias", b)) if t is None]
        raise ValueError(f"the checkpoint lacks {', '.join(missing)}")
    if w.dim() != 2 or b.dim() != 1 or b.shape[0] != w.shape[0]:
        raise ValueError(f"{prefix}.weight {list(w.shape)} and {prefix}.bias {list(b.shape)} are not a Linear's [C, m] and [C]")
    if not 1 <= w.shape[1] <= width:
        raise ValueError(f"{prefix}.weight {list(w.shape)} reads {w.shape[1]} dims; the {REFERENCE_BACKBONE} embedding has {width}")
    return w, b


def _convert_head(fc: dict[str, torch.Tensor], head: str, width: int) -> tuple[list[int], int, dict[str, torch.Tensor]]:
    """``(dims, num_classes, head state dict)`` from the file's ``fc.*`` keys, for the stated head."""
    nesting_keys = [k for k in fc if _NESTING_KEY.match(k)]
    plain_keys = [k for k in fc if k in ("fc.weight", "fc.bias")]
    other = sorted(set(fc) - set(nesting_keys) - set(plain_keys))
    found = _describe_fc(fc, width)
    if other:
        raise ValueError(f"unexpected classifier keys {_few(other)} in the checkpoint; it holds {found}")
    if nesting_keys and plain_keys:
        raise ValueError(f"the checkpoint holds both fc.weight/fc.bias and fc.nesting_classifier_* keys; it holds {found}")

    if head == "mrl":
        if not nesting_keys:
            raise ValueError(f"head='mrl' needs fc.nesting_classifier_{{i}}.weight/bias, but the checkpoint holds {found}")
        indices = sorted({int(_NESTING_KEY.match(k).group(1)) for k in nesting_keys})
        if indices != list(range(len(indices))):
            gaps = sorted(set(range(indices[-1] + 1)) - set(indices))
            raise ValueError(f"fc.nesting_classifier_{gaps[0]} is missing: the checkpoint has nesting classifiers {indices}")
        pairs = [_linear_pair(fc, f"fc.nesting_classifier_{i}", width) for i in indices]
        if len(pairs) == 1 and pairs[0][0].shape[1] == width:
            raise ValueError(f"head='mrl' needs one classifier per nesting size, but the checkpoint holds {found}")
        classes = [w.shape[0] for w, _ in pairs]
        if len(set(classes)) > 1:
            detail = ", ".join(f"fc.nesting_classifier_{i}: {c}" for i, c in zip(indices, classes))
            raise ValueError(f"the nesting classifiers disagree on the number of classes ({detail})")
        dims = [int(w.shape[1]) for w, _ in pairs]
        if any(b <= a for a, b in zip(dims, dims[1:])):
            raise ValueError(f"MRL nesting sizes must be strictly increasing, but the classifiers read {dims} dims")
        sd = {}
        for i, (w, b) in zip(indices, pairs):
            sd[f"head.linears.{i}.weight"], sd[f"head.linears.{i}.bias"] = w, b
        return dims, classes[0], sd

    if head == "mrl_e":
        if nesting_keys:
            indices = sorted({int(_NESTING_KEY.match(k).group(1)) for k in nesting_keys})
            if indices != [0]:
                raise ValueError(f"head='mrl_e' needs a single shared classifier, but the checkpoint holds {found}")
            prefix = "fc.nesting_classifier_0"
        elif plain_keys:
            prefix = "fc"
        else:
            raise ValueError(f"head='mrl_e' needs fc.nesting_classifier_0.weight/bias or fc.weight/bias, but the checkpoint holds {found}")
        w, b = _linear_pair(fc, prefix, width)
        if w.shape[1] != width:
            raise ValueError(
                f"head='mrl_e' needs a classifier on all {width} dims, but the checkpoint holds {found}"
            )
        return _powers_of_two(width), int(w.shape[0]), {"head.linear.weight": w, "head.linear.bias": b}

    # head == "ff"
    if not plain_keys:
        raise ValueError(f"head='ff' needs fc.weight [C, m] and fc.bias [C], but the checkpoint holds {found}")
    w, b = _linear_pair(fc, "fc", width)
    return [int(w.shape[1])], int(w.shape[0]), {"head.classifier.weight": w, "head.classifier.bias": b}


def _is_blurpool(keys: list[str]) -> bool:
    return any(k.endswith(".blur_filter") or k.endswith("conv2.conv.weight") or k.endswith("downsample.0.conv.weight") for k in keys)


def _convert_backbone(body: dict[str, torch.Tensor]) -> tuple[bool, int, dict[str, torch.Tensor]]:
    """``(blurpool, width, backbone state dict)``, checked against timm's resnet50."""
    if not body:
        raise ValueError(f"the checkpoint holds no backbone keys (only fc.*); a {REFERENCE_BACKBONE} state dict is expected")
    blurpool = _is_blurpool(list(body))
    expected, width = _backbone_shapes(blurpool)
    body = dict(body)
    # Files saved without these buffers still describe the network: fill in their fixed values.
    from .blurpool import blur_kernel

    for key, shape in expected.items():
        if key in body:
            continue
        if key.endswith(".num_batches_tracked") and key.rsplit(".", 1)[0] + ".running_mean" in body:
            body[key] = torch.tensor(0, dtype=torch.long)
        elif key.endswith(".blur_filter") and key.rsplit(".", 1)[0] + ".conv.weight" in body:
            body[key] = blur_kernel(shape[0])
    # In network order, so the first keys listed show where the two networks part.
    missing = [k for k in expected if k not in body]
    unexpected = [k for k in body if k not in expected]
    wrong = [k for k in body if k in expected and tuple(body[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        problems = []
        if not any(k.startswith("layer4.") for k in body):
            problems.append("it has no layer4 keys")
        if missing:
            problems.append(f"it lacks {_few(missing)}")
        if unexpected:
            problems.append(f"timm's {REFERENCE_BACKBONE} has no {_few(unexpected)}")
        if wrong:
            problems.append(
                "shapes differ for "
                + _few([f"{k} {list(body[k].shape)} (expected {list(expected[k])})" for k in wrong])
            )
        raise ValueError(f"not a {REFERENCE_BACKBONE} state dict: " + "; ".join(problems))
    return blurpool, width, {f"backbone.{k}": v for k, v in body.items()}


def convert_reference(state_dict: Mapping[str, torch.Tensor], head: str) -> dict[str, Any]:
    """Map a reference ResNet-50 state dict onto this project's ``backbone`` and ``head`` modules.

    Args:
        state_dict: from :func:`load_reference_state_dict` (a leading ``module.`` is also removed here).
        head: the model the file holds: ``"mrl"``, ``"mrl_e"`` or ``"ff"`` (see the module docstring;
            ``fc.weight [C, 2048]`` reads as MRL-E with ``"mrl_e"`` and as FF-2048 with ``"ff"``).

    Returns ``{"backbone": "resnet50", "blurpool": bool, "head": head, "dims": [...],
    "num_classes": C, "state_dict": {...}}``. ``state_dict`` loads strictly into a module whose
    ``backbone`` is ``create_backbone("resnet50", blurpool=blurpool)[0]`` and whose ``head`` is
    ``MatryoshkaHead(2048, C, dims, efficient=head == "mrl_e")`` (``head.linears.{i}.*`` /
    ``head.linear.*``) or ``FixedFeatureHead(2048, C, dims[0])`` (``head.classifier.*``).
    ``blurpool`` is True when the file has the recipe's BlurPool (``blur_filter`` keys).

    ``ValueError`` naming the problem for an unknown ``head``, classifier keys missing or of
    another head's form (the message says what the file holds and which head it suggests), MRL
    sizes that do not increase, class counts that disagree, or a backbone that is not timm's
    ``resnet50`` (missing or extra keys, wrong shapes).
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {list(HEADS)} (the model the checkpoint holds)")
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"convert_reference needs a state dict (a mapping of key -> tensor), got {type(state_dict).__name__}")
    sd = _strip_ddp(state_dict)
    fc = {k: v for k, v in sd.items() if k.startswith("fc.")}
    body = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    blurpool, width, backbone_sd = _convert_backbone(body)
    dims, num_classes, head_sd = _convert_head(fc, head, width)
    return {
        "backbone": REFERENCE_BACKBONE,
        "blurpool": blurpool,
        "head": head,
        "dims": dims,
        "num_classes": num_classes,
        "state_dict": {**backbone_sd, **head_sd},
    }
