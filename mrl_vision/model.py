"""``MatryoshkaModel``: a timm backbone and a Matryoshka head, usable with no Trainer.

The network alone: it embeds, classifies at any of its sizes, runs the adaptive cascade, and
saves and loads itself. Training wraps it (:class:`mrl_vision.task.MatryoshkaClassifier`), as do
export, retrieval and notebooks. Everything a user needs at inference travels with it: the class
names, the input size, the normalisation and the fitted cascade thresholds.

Files:

- ``save_pretrained(dir)`` / ``from_pretrained(dir)``: ``model.safetensors`` + ``config.json``
  (the convention of timm and the Hugging Face ecosystem);
- ``from_checkpoint(path)``: any checkpoint that ``mrl-vision fit`` writes;
- ``from_reference(path, head)``: the official RAIVNLab/MRL ResNet-50 checkpoints.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from .adaptive import cascade_predict
from .backbones import create_backbone
from .files import atomic_path, atomic_write_text
from .heads import HEAD_KINDS, ClassifierHead, HeadKind, build_head, default_dims, validate_dims

ModelHead = Literal[HeadKind, "none"]
"""The heads a model can have: a classifier of :data:`mrl_vision.heads.HEAD_KINDS`, or ``none`` (an embedder)."""
MODEL_HEADS: tuple[str, ...] = (*HEAD_KINDS, "none")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "mrl-vision-model"


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A model configuration in today's spelling: ``nesting`` becomes ``dims``, and ``ff_dim: m``
    (checkpoints written before the rename) becomes ``head: ff`` with ``dims: [m]``."""
    config = dict(config)
    if "nesting" in config:
        config.setdefault("dims", config.pop("nesting"))
        config.pop("nesting", None)
    ff_dim = config.pop("ff_dim", None)
    if ff_dim is not None:
        config["head"] = "ff_projection" if config.get("head") == "ff_projection" else "ff"
        config["dims"] = [int(ff_dim)]
    return config


def inference(method):
    """Run a model method as inference: eval mode (BatchNorm's running statistics, no dropout) and no
    autograd, then the mode the model was in. Predictions then do not depend on the batch, and
    calling them never changes the model."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return method(self, *args, **kwargs)
        finally:
            self.train(was_training)

    return wrapper


def _float_triple(name: str, value: Sequence[float] | None) -> list[float] | None:
    if value is None:
        return None
    values = [float(v) for v in value]
    if len(values) not in (1, 3):
        raise ValueError(f"{name} must hold 1 or 3 values (per channel), got {list(value)}")
    return values


class MatryoshkaModel(nn.Module):
    """A timm backbone whose pooled embedding is trained so that every prefix ``z[:, :m]``,
    ``m`` in ``dims``, is a representation by itself; with a classifier head on each size, or none.

    Args:
        backbone: a timm model name (``timm.list_models()``).
        num_classes: C; ``None`` makes a pure embedder (``forward`` returns the embedding).
        head: ``mrl`` (a classifier per prefix), ``mrl_e`` (one shared weight), ``ff`` (the
            reference's fixed-feature baseline: a classifier on ``z[:, :m]``, ``dims=[m]``),
            ``ff_projection`` (a learned projection to ``m`` dims, then a classifier) or ``none``: a pure
            embedder (trained with an embedding loss: :mod:`mrl_vision.embedding_loss`) that still records
            the ``num_classes`` and ``class_names`` it was trained on.
        dims: the sizes, ascending; default powers of two from 8 to the width, ending at the
            width (for ``ff``/``ff_projection``: ``[width]``, a standard model).
        backbone_kwargs: passed to ``timm.create_model`` (``img_size``, ``drop_path_rate``, ...).
        blurpool: the MRL/FFCV recipe's BlurPool (:mod:`mrl_vision.blurpool`) on strided convs.
        layers: keep only the first ``layers`` blocks of a transformer backbone (a shallow model that
            really costs ``layers / depth`` of the blocks; see :meth:`truncate`); ``None`` keeps all.
        pretrained / pretrained_file: timm weights for the backbone (see
            :func:`mrl_vision.backbones.create_backbone`); not needed to load a saved model.
        channels_last: run the backbone in channels-last memory format.
        class_names: the class of each label (kept with the model).
        input_size: the side of the square images the model expects (checked against the smallest the
            backbone takes; ViTs are built for it).
        mean / std: the normalisation of its inputs, in [0, 1] units, per channel.

    Example::

        model = MatryoshkaModel("resnet50", num_classes=1000, head="mrl")
        logits = model(images)                   # [9, N, 1000], sizes 8..2048
        emb = model.embed(images, dim=64)        # [N, 64]
        preds = model.predict(images, dim=16)    # [N]
        model.save_pretrained("runs/my_model")
        same = MatryoshkaModel.from_pretrained("runs/my_model")
    """

    adaptive_thresholds: torch.Tensor

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int | None = None,
        head: ModelHead = "mrl",
        dims: Sequence[int] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        blurpool: bool = False,
        layers: int | None = None,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        channels_last: bool = False,
        class_names: Sequence[str] | None = None,
        input_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if head not in MODEL_HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {MODEL_HEADS}")
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if num_classes is None or len(class_names) != num_classes:
                raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}: give one name per class")
        if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
            raise ValueError(f"input_size must be a positive integer (the image side), got {input_size!r}")
        kwargs = dict(backbone_kwargs or {})
        if blurpool:
            kwargs["blurpool"] = True
        self.backbone_name = backbone
        self.backbone, self.width = create_backbone(
            backbone, pretrained=pretrained, pretrained_file=pretrained_file, input_size=input_size, **kwargs
        )
        self._config = {"layers": None}
        if layers is not None:
            self.truncate(layers)
        self.head: ClassifierHead | None
        if num_classes is None or head == "none":
            self.head = None
            self.dims = validate_dims(dims if dims is not None else default_dims(self.width), self.width)
        else:
            self.head = build_head(head, self.width, num_classes, dims)
            self.dims = list(self.head.dims)
        self.head_kind = head if self.head is not None else None
        self.num_classes = num_classes
        self.class_names = class_names
        self.input_size = input_size
        self.mean, self.std = _float_triple("mean", mean), _float_triple("std", std)
        self.channels_last = channels_last
        self._config = {
            "backbone": backbone, "backbone_kwargs": dict(backbone_kwargs or {}), "blurpool": bool(blurpool),
            "layers": self._config["layers"],
            "num_classes": num_classes, "head": head, "dims": list(self.dims), "channels_last": channels_last,
            "class_names": class_names, "input_size": input_size, "mean": self.mean, "std": self.std,
        }
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        # The confidence cascade's thresholds [G-1] (NaN until fitted): a buffer, so saved with the weights.
        self.register_buffer("adaptive_thresholds", torch.full((max(0, len(self.dims) - 1),), float("nan")))
        self.weights_origin: dict[str, Any] | None = None
        """Where the weights came from when it is not plain training: ``{"ema": {"decay": ..., "updates": ...}}``
        for an exponential moving average (:class:`mrl_vision.callbacks.EMA`); saved in ``config.json``."""

    @property
    def config(self) -> dict[str, Any]:
        """What rebuilds this model (``MatryoshkaModel(**config)``); saved as ``config.json``."""
        return json.loads(json.dumps(self._config))

    # ----------------------------------------------------------------- inference
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled embedding ``[N, d]`` of images ``[N, 3, H, W]``."""
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        z = self.backbone(x)
        if z.ndim != 2 or z.shape[1] != self.width:
            raise RuntimeError(
                f"backbone {self.backbone_name!r} returned features of shape {tuple(z.shape)}, expected [N, {self.width}]"
            )
        return z

    @property
    def depth(self) -> int | None:
        """How many blocks of the embedding's width the backbone stacks (a ViT, DeiT, EVA: its
        transformer blocks), each of whose outputs :meth:`layer_features` embeds; ``None`` for backbones
        whose stages differ in width (CNNs) or that cannot return intermediate blocks."""
        b = self.backbone
        info = getattr(b, "feature_info", None)
        if not hasattr(b, "forward_intermediates") or not hasattr(b, "blocks") or not isinstance(info, list) or not info:
            return None
        if {f.get("num_chs") for f in info} != {self.width}:  # (timm keeps feature_info when blocks are pruned)
            return None
        return len(b.blocks)

    def truncate(self, layers: int) -> "MatryoshkaModel":
        """Keep only the first ``layers`` blocks of the backbone (with its final norm, pooling and this
        model's head), in place; returns the model. Its embedding is then what :meth:`layer_features`
        gives after block ``layers``, at ``layers / depth`` of the blocks' cost; ``config`` records it, so
        a saved model is rebuilt shallow. ``ValueError`` for backbones without blocks of one width."""
        depth = self.depth
        if depth is None:
            raise ValueError(f"backbone {self.backbone_name!r} has no stack of blocks of one width to truncate "
                             "(a ViT, DeiT or EVA has; CNN stages differ in width)")
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= depth:
            raise ValueError(f"layers must be a block count in [1, {depth}] (the depth of {self.backbone_name!r}), "
                             f"got {layers!r}")
        if layers < depth:
            self.backbone.prune_intermediate_layers(indices=[layers - 1], prune_norm=False, prune_head=False)
        self._config["layers"] = layers
        return self

    def layer_features(self, x: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Pooled embeddings ``[L, N, d]`` after each of ``layers`` (block counts, 1..``depth``, increasing;
        default every block) from one forward pass: each block's tokens get the backbone's own final norm
        and pooling (timm's ``forward_intermediates(norm=True)``, then ``forward_head(pre_logits=True)``),
        so a shallow embedding is comparable with the last one, which equals :meth:`features`.
        The ground of 2D Matryoshka (depth x width); ``ValueError`` for backbones without blocks of one width."""
        depth = self.depth
        if depth is None:
            raise ValueError(f"backbone {self.backbone_name!r} has no stack of blocks of its embedding width "
                             f"({self.width}) to embed after each block: layer_features needs a transformer such "
                             "as a ViT, DeiT or EVA (CNN stages differ in width)")
        layers = list(range(1, depth + 1)) if layers is None else list(layers)
        bad = [n for n in layers if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= depth]
        if bad or not layers or any(a >= b for a, b in zip(layers, layers[1:])):
            raise ValueError(f"layers must be increasing block counts in [1, {depth}] (the depth of "
                             f"{self.backbone_name!r}), got {layers}")
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        outputs = self.backbone.forward_intermediates(x, indices=[n - 1 for n in layers], norm=True, output_fmt="NLC",
                                                      intermediates_only=True, return_prefix_tokens=True,
                                                      stop_early=True)  # no block after the deepest asked runs
        pooled = []
        for item in outputs:
            tokens, prefix = item if isinstance(item, tuple) else (item, None)
            sequence = tokens if prefix is None or prefix.shape[1] == 0 else torch.cat([prefix, tokens], 1)
            pooled.append(self.backbone.forward_head(sequence, pre_logits=True))
        return torch.stack(pooled)

    def layer_outputs(self, x: torch.Tensor, layers: Sequence[int], flip_tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [K, G, N, C], embeddings [K, N, d])`` after each of the K blocks in ``layers``, from one
        forward pass (:meth:`layer_features`), the head scoring every (block, size); with ``flip_tta`` the
        logits of ``x`` plus those of its mirror image (the embeddings are of ``x`` itself)."""
        head = self._require_head("layer_outputs")
        n = x.shape[0]
        z = self.layer_features(torch.cat([x, x.flip(-1)]) if flip_tta else x, layers)  # [K, N', d]
        k = z.shape[0]
        logits = head(z.flatten(0, 1)).unflatten(1, (k, -1)).transpose(0, 1)  # [K, G, N', C]
        if flip_tta:
            logits = logits.unflatten(2, (2, n)).sum(2)
        return logits, z[:, :n]

    def _features_at(self, x: torch.Tensor, layers: int | None) -> torch.Tensor:
        """The pooled embedding after ``layers`` blocks (``None``: all the model has)."""
        if layers is None or layers == self.depth:
            return self.features(x)
        return self.layer_features(x, [layers])[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every size ``[G, N, C]``; a model without a head returns the embedding ``[N, d]``."""
        z = self.features(x)
        return z if self.head is None else self.head(z)

    def eval_logits(self, x: torch.Tensor, flip_tta: bool = False) -> torch.Tensor:
        """Logits ``[G, N, C]``; with ``flip_tta`` those of ``x`` plus those of its mirror image."""
        return self.eval_outputs(x, flip_tta)[0]

    def eval_outputs(self, x: torch.Tensor, flip_tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [G, N, C], embedding [N, d])`` of one backbone pass: the logits of :meth:`eval_logits`
        and the pooled embedding of ``x`` itself (with ``flip_tta``, not of its mirror image)."""
        head = self._require_head("eval_logits")
        n = x.shape[0]
        z = self.features(torch.cat([x, x.flip(-1)]) if flip_tta else x)
        logits = head(z)
        if flip_tta:
            logits = logits.unflatten(1, (2, n)).sum(1)
        return logits, z[:n]

    @inference
    def embed(self, x: torch.Tensor, dim: int | None = None, normalize: bool = False, layers: int | None = None) -> torch.Tensor:
        """The embedding at size ``dim`` (one of ``dims``; default the largest): ``[N, dim]``, in eval
        mode without autograd (as :meth:`predict` and :meth:`predict_adaptive`); with ``layers=k``, that
        of the first k blocks (2D Matryoshka; :meth:`truncate` makes the shallow model itself).

        For an ``ff_projection`` head this is the learned ``m``-dimensional projection.
        """
        dim = self.dims[-1] if dim is None else dim
        if dim not in self.dims:
            raise ValueError(f"dim {dim} is not one of this model's sizes {self.dims}")
        z = self._features_at(x, layers)
        e = z[:, :dim] if self.head is None else self.head.embed(z, dim)
        return nn.functional.normalize(e, dim=-1) if normalize else e

    @inference
    def predict(self, x: torch.Tensor, dim: int | None = None, layers: int | None = None) -> torch.Tensor:
        """Class predictions ``[N]`` from size ``dim`` (default the largest; one head size only) of the
        first ``layers`` blocks (default all)."""
        head = self._require_head("predict")
        return head.logits_at(self._features_at(x, layers), self.dims[-1] if dim is None else dim).argmax(-1)

    @inference
    def predict_adaptive(
        self, x: torch.Tensor, thresholds: Sequence[float] | torch.Tensor | None = None, flip_tta: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify with as few dimensions as each image needs: ``x -> (preds [N], exit_dim [N])``.

        The backbone runs once; size ``g`` is evaluated only for the images still undecided (max
        softmax probability below ``thresholds[g]`` at every smaller size); the largest size always
        answers. With MRL-E each size's logits reuse the previous size's. ``thresholds`` default to
        the fitted ones (``adaptive_thresholds``); with ``flip_tta`` the logits of the image and its
        mirror image are summed, as in evaluation.
        """
        head = self._require_head("predict_adaptive")
        if thresholds is None:
            if len(self.dims) > 1 and bool(torch.isnan(self.adaptive_thresholds).any()):
                raise ValueError(
                    "no adaptive thresholds: fit them with AdaptiveClassificationCallback during "
                    "validation or pass thresholds=[...] (one per size but the last)"
                )
            thresholds = self.adaptive_thresholds
        views = [x, x.flip(-1)] if flip_tta else [x]
        return cascade_predict(head, [self.features(v) for v in views], thresholds)

    def _require_head(self, what: str) -> ClassifierHead:
        if self.head is None:
            raise ValueError(f"{what} needs a classifier head; this model is a pure embedder (num_classes=None)")
        return self.head

    # ----------------------------------------------------------------- optimisation (timm's factory)
    def no_weight_decay(self) -> set[str]:
        """The backbone's ``no_weight_decay()`` names (position embeddings, class tokens), prefixed."""
        fn = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in fn()} if callable(fn) else set()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The backbone's parameter groups (for layer-wise LR decay) with the ``backbone.`` prefix;
        the head and the thresholds follow the last block."""
        fn = getattr(self.backbone, "group_matcher", None)
        if not callable(fn):
            raise ValueError(f"layer-wise LR decay needs a timm backbone with group_matcher(); {self.backbone_name!r} has none")
        return {k: _prefix_matcher(v, r"^backbone\.") for k, v in fn(coarse=coarse).items()}

    # ----------------------------------------------------------------- files
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (each to a temporary
        name, then renamed); returns the directory. :meth:`from_pretrained` reads it back."""
        from safetensors.torch import save_file

        out = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(out / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        origin = {"weights": self.weights_origin} if self.weights_origin else {}
        atomic_write_text(out / CONFIG_NAME, json.dumps({"format": FORMAT, **self.config, **origin}, indent=2) + "\n")
        if self.weights_origin and "ema" in self.weights_origin:
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"{out}: saved the EMA weights ({_describe_ema(self.weights_origin['ema'])})")
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "MatryoshkaModel":
        """The model saved by :meth:`save_pretrained` in ``directory``, in eval mode."""
        config = read_pretrained_config(directory, keep_record=True)
        origin = config.pop("weights", None)
        model = cls(**config)
        load_pretrained_weights(model, directory)
        model.weights_origin = origin
        return model.to(map_location).eval()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu",
                        weights: str = "auto") -> "MatryoshkaModel":
        """The model of a Lightning checkpoint written by ``mrl-vision fit`` (this version's or an
        earlier one's, where the network sat directly on the task), in eval mode.

        ``weights``: a checkpoint of a run with :class:`mrl_vision.callbacks.EMA` holds the averaged weights
        (``ema``; ``auto``, the default, takes them and says so) and the live ones (``live``)."""
        if weights not in ("auto", "ema", "live"):
            raise ValueError(f"weights must be 'auto', 'ema' or 'live', got {weights!r}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
            raise ValueError(f"{str(path)!r} is not a Lightning checkpoint of mrl-vision (no state_dict/hyper_parameters)")
        state = ckpt["state_dict"]
        averaged = "current_model_state" in ckpt
        if weights != "auto" and not averaged:
            raise ValueError(f"weights={weights!r}, but {str(path)!r} holds one set of weights (trained without EMA)")
        if weights == "live":  # (the cascade's thresholds are never averaged: both states hold the fitted ones)
            state = ckpt["current_model_state"]
        elif averaged:
            from lightning.pytorch.utilities import rank_zero_info

            ema = ckpt.get("ema", {})
            rank_zero_info(f"{os.fspath(path)}: loading the EMA weights ({_describe_ema(ema)}); weights='live' loads "
                           "the training weights")
        model = cls(**model_kwargs(ckpt["hyper_parameters"]))
        model.load_state_dict(model_state(state))
        if averaged and weights != "live":
            model.weights_origin = {"ema": dict(ckpt.get("ema", {}))}
        return model.to(map_location).eval()

    @classmethod
    def from_reference(cls, path: str | os.PathLike, head: str = "mrl") -> "MatryoshkaModel":
        """An official RAIVNLab/MRL ResNet-50 checkpoint (``r50_mrl1_e0_ff2048.pt`` and its
        siblings): ``head`` says what it holds (``mrl``, ``mrl_e`` or ``ff``). Its logits equal the
        reference network's; ImageNet's normalisation and 224 px input are recorded."""
        from .reference import convert_reference, load_reference_state_dict

        converted = convert_reference(load_reference_state_dict(path), head)
        model = cls(
            backbone=converted["backbone"], num_classes=converted["num_classes"], head=converted["head"],
            dims=converted["dims"], blurpool=converted["blurpool"], input_size=224,
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        )
        state = dict(converted["state_dict"])
        state.setdefault("adaptive_thresholds", model.adaptive_thresholds)
        model.load_state_dict(state)
        return model.eval()

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "MatryoshkaModel":
        """:meth:`from_pretrained` for a folder, :meth:`from_checkpoint` for a file."""
        if os.path.isdir(path):
            return cls.from_pretrained(path, map_location)
        return cls.from_checkpoint(path, map_location)


def _prefix_matcher(matcher: Any, prefix: str) -> Any:
    """A timm group matcher (a regex, or a list of ``(regex, key)``) with its regexes under ``prefix``."""
    if isinstance(matcher, str):  # timm matches from the start: each alternative gets the prefix
        return prefix + "(?:" + re.sub(r"(^|\|)\^", r"\1", matcher) + ")"
    if isinstance(matcher, (list, tuple)):
        return [(_prefix_matcher(m[0], prefix), *m[1:]) if isinstance(m, (list, tuple)) else _prefix_matcher(m, prefix)
                for m in matcher]
    return matcher


MODEL_ARGS = tuple(p for p in inspect.signature(MatryoshkaModel.__init__).parameters if p != "self")


def weights_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` of a model's parameters and buffers (names, dtypes, shapes and values): equal
    for the same weights however they were loaded, so files computed from a model can be matched."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()


def model_kwargs(hparams: dict[str, Any]) -> dict[str, Any]:
    """The :class:`MatryoshkaModel` arguments in a task's hyperparameters (any version's spelling),
    without those that fetch weights (the checkpoint has them)."""
    config = upgrade_config(hparams)
    kwargs = {k: config[k] for k in MODEL_ARGS if k in config}
    kwargs.update(pretrained=False, pretrained_file=None)
    return kwargs


def model_state(task_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A task checkpoint's ``state_dict`` as the model's: ``model.*`` keys (or, written before the
    model was split from the task, ``backbone.*``/``head.*``/``adaptive_thresholds``)."""
    if any(k.startswith("model.") for k in task_state):
        return {k[len("model."):]: v for k, v in task_state.items() if k.startswith("model.")}
    return {k: v for k, v in task_state.items() if k.split(".", 1)[0] in ("backbone", "head", "adaptive_thresholds")}


def load_pretrained_weights(model: MatryoshkaModel, directory: str | os.PathLike) -> None:
    """Load the ``model.safetensors`` of a saved model folder into ``model`` (strictly)."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no {WEIGHTS_NAME}")
    model.load_state_dict(load_file(str(path)))


def check_same_classes(num_classes: int | None, class_names: Sequence[str] | None, data_names: Sequence[str]) -> None:
    """``ValueError`` unless a model's classes (count, and names where it has them) are the data's,
    in the same order: "the checkpoint has 3 classes, the data 2", or the names that differ."""
    if num_classes is not None and num_classes != len(data_names):
        raise ValueError(f"the checkpoint has {num_classes} classes, the data {len(data_names)}")
    if class_names is not None and list(class_names) != list(data_names):
        only_model = [c for c in class_names if c not in data_names]
        only_data = [c for c in data_names if c not in class_names]
        detail = (f"only in the checkpoint: {only_model[:5]}; only in the data: {only_data[:5]}"
                  if only_model or only_data else "the same names in another order")
        raise ValueError(f"the checkpoint's classes are not the data's ({detail})")


def _describe_ema(ema: dict) -> str:
    return f"decay {ema.get('decay', '?')}, {ema.get('updates', '?')} updates"


def read_pretrained_config(directory: str | os.PathLike, keep_record: bool = False) -> dict[str, Any]:
    """The ``config.json`` of a :meth:`MatryoshkaModel.save_pretrained` folder, as model arguments (with
    ``keep_record``, plus the ``weights`` record of where the weights came from, when there is one)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a saved model: no {CONFIG_NAME} (write one with save_pretrained)")
    config = json.loads(path.read_text())
    if config.pop("format", None) != FORMAT:
        raise ValueError(f"{str(path)!r} is not an mrl-vision model config (format != {FORMAT!r})")
    record = config.pop("weights", None)  # where the weights came from (EMA): a record, not an argument
    unknown = sorted(set(config) - set(MODEL_ARGS))
    if unknown:
        raise ValueError(f"{str(path)!r} has unknown keys {unknown}")
    config = upgrade_config(config)
    if keep_record and record is not None:
        config["weights"] = record
    return config
