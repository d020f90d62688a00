"""Matryoshka training with any embedding loss: metric learning and self-supervised learning.

:class:`MatryoshkaLoss` sums cross-entropy over the prefixes' classifiers; :class:`MatryoshkaEmbeddingLoss`
applies an embedding loss (``loss(embeddings [N, m], labels [N]) -> scalar``) to every prefix ``z[:, :m]``
and sums the results, weighted per size, as sentence-transformers' ``MatryoshkaLoss(model, base_loss, dims)``
does for text. The losses are pytorch-metric-learning's (supervised contrastive, NT-Xent, ArcFace, CosFace,
multi-similarity with its miner, ...), named by their class::

    loss = MatryoshkaEmbeddingLoss("SupConLoss", dims=[8, 16, 32, 64], loss_kwargs={"temperature": 0.1})
    loss = MatryoshkaEmbeddingLoss("ArcFaceLoss", dims=[8, 64, 512], num_classes=100)  # one per size
    loss = MatryoshkaEmbeddingLoss("MultiSimilarityLoss", dims, miner="MultiSimilarityMiner")
    value = loss(model(images), labels)

A loss with parameters of its own (ArcFace's class centres ``W [m, C]``) gets one instance per size, each
built for its embedding size; they are sub-modules, so their parameters reach the optimizer. A loss given
as an instance is shared by every size, and must therefore have no parameters.

Under DDP (``gather=True``, the default) the full-width embeddings and labels of every rank are gathered,
with their gradients, before the loss: each rank computes the loss of the global batch, so contrastive
losses see every rank's negatives. The gradient that reaches each rank's embeddings is the global loss's
gradient summed over the ranks (the all-gather's backward), which DDP's average over ranks turns back into
the single-process gradient of the global batch.

The options are data (:class:`EmbeddingLoss`, ``model.embedding_loss`` in a config), as for
:class:`mrl_vision.matryoshka2d.Matryoshka2d`.
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from .heads import validate_dims
from .options import options_from_mapping

TARGETS = ("labels", "views")

LossSpec = Union[str, type, Callable[[int], nn.Module], nn.Module]


def _pml(kind: str):
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError("Matryoshka embedding losses need pytorch-metric-learning: pip install "
                          "pytorch-metric-learning") from err
    return losses if kind == "loss" else miners


def _resolve_class(spec: str | type, kind: str) -> type:
    """A pytorch-metric-learning loss or miner class from its name (``"SupConLoss"``), or the class itself."""
    if isinstance(spec, type):
        return spec
    module = _pml(kind)
    cls = getattr(module, str(spec), None)
    if not isinstance(cls, type):
        known = sorted(n for n in dir(module) if n.endswith("Loss" if kind == "loss" else "Miner"))
        raise ValueError(f"unknown {kind} {spec!r}: not a pytorch-metric-learning {kind} class; choose one of {known}")
    return cls


def init_parameters(cls: type) -> set[str]:
    """The argument names of ``cls``'s ``__init__`` and of those it passes ``*args``/``**kwargs`` on to (its MRO)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            names.update(p for p in inspect.signature(init).parameters if p != "self")
        except (TypeError, ValueError):  # pragma: no cover - builtins
            pass
    return names


def needs_class_labels(loss: nn.Module | type) -> bool:
    """Whether a loss learns something per class (``num_classes`` among its arguments: ArcFace, CosFace,
    ProxyAnchor, NormalizedSoftmax, ...), so that its labels must be classes, not instance ids."""
    return "num_classes" in init_parameters(loss if isinstance(loss, type) else type(loss))


@dataclass
class EmbeddingLoss:
    """The options of Matryoshka training with an embedding loss (``model.embedding_loss`` in a config).

    Args:
        loss: a pytorch-metric-learning loss class name (``SupConLoss``, ``NTXentLoss``, ``ArcFaceLoss``,
            ``CosFaceLoss``, ``MultiSimilarityLoss``, ``TripletMarginLoss``, ...).
        loss_kwargs: its arguments (``temperature``, ``margin``, ...); ``embedding_size`` and ``num_classes``
            are filled in (the size, the data's classes) for the losses that take them.
        miner / miner_kwargs: an optional pytorch-metric-learning miner (``MultiSimilarityMiner``) run on each
            prefix, its pairs or triplets passed to the loss.
        weights: one per size (default all 1).
        n_dims_per_step: train this many sizes per step, drawn at random (sentence-transformers' option);
            -1 trains all of them every step.
        normalize: L2-normalise each prefix after truncation, before the loss.
        weight: the weight of the embedding loss beside the classifier's cross-entropy (a model with a head).
        targets: what the loss's labels are: ``labels`` (the data's classes: supervised contrastive, metric
            learning) or ``views`` (instance ids, every view of an image one positive set: SimCLR's NT-Xent,
            with data that gives several views of each image).
        gather: under DDP, compute the loss on every rank's embeddings (see the module docstring).
        seed: seeds the draw of sizes at each step (every DDP rank and a resumed run draw the same); default
            the process's torch seed when the task is built.
    """

    loss: str = "SupConLoss"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    miner: str | None = None
    miner_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: list[float] | None = None
    n_dims_per_step: int = -1
    normalize: bool = True
    weight: float = 1.0
    targets: Literal["labels", "views"] = "labels"
    gather: bool = True
    seed: int | None = None

    @classmethod
    def from_any(cls, value: "EmbeddingLoss | dict[str, Any] | str | None") -> "EmbeddingLoss | None":
        """The options from a dataclass, a mapping (a checkpoint's hyperparameters), a loss name, or ``None``."""
        if isinstance(value, str):
            return cls(loss=value)
        return options_from_mapping(cls, value, "embedding_loss")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def build(self, dims: Sequence[int], width: int | None = None, num_classes: int | None = None
              ) -> "MatryoshkaEmbeddingLoss":
        """The loss module these options describe, for ``dims`` of an embedding ``width`` wide."""
        if not math.isfinite(float(self.weight)) or self.weight < 0:
            raise ValueError(f"embedding_loss weight must be finite and >= 0, got {self.weight!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"embedding_loss targets must be one of {TARGETS}, got {self.targets!r}")
        loss = MatryoshkaEmbeddingLoss(
            self.loss, dims, self.weights, self.n_dims_per_step, self.normalize, loss_kwargs=self.loss_kwargs,
            miner=self.miner, miner_kwargs=self.miner_kwargs, num_classes=num_classes, width=width,
            gather=self.gather, seed=self.seed)
        if self.targets == "views" and loss.needs_class_labels:
            raise ValueError(f"{loss.loss_name} learns one centre per class, so it needs class labels, but "
                             "targets='views' gives it instance ids: use targets='labels', or a pair loss "
                             "(NTXentLoss, SupConLoss, ...)")
        return loss


class MatryoshkaEmbeddingLoss(nn.Module):
    """``sum_m weights[m] * loss(normalize(z[:, :m]), labels)`` over the sizes ``m`` of ``dims``.

    Args:
        loss: a pytorch-metric-learning loss: its class name or class (built once per size when it takes an
            ``embedding_size``, with ``embedding_size=m``; once for all sizes otherwise), a factory
            ``size -> loss``, or an instance without parameters (shared by every size).
        dims: the sizes, ascending.
        weights: one non-negative weight per size (default all 1).
        n_dims_per_step: sizes trained per step, drawn without replacement (-1: all; sentence-transformers'
            ``n_dims_per_step``); the draw of step ``s`` depends on ``seed`` and ``s`` only.
        normalize: L2-normalise each prefix after truncation.
        loss_kwargs: arguments of a loss built from its name or class.
        miner / miner_kwargs: a pytorch-metric-learning miner (name, class or instance) run on each prefix.
        num_classes: C, for losses that learn per-class parameters (ArcFace, CosFace, ProxyAnchor, ...).
        width: the embedding's width, when known: sizes above it fail here, not at the first step.
        gather: under DDP, gather every rank's embeddings (with gradients) and labels before the loss.
        seed: the seed of the sizes' draw.

    ``forward(embeddings [N, >= max(dims)], labels [N], step=None) -> scalar``; :meth:`per_size` gives the
    unweighted loss of each size trained at that step.
    """

    def __init__(
        self,
        loss: LossSpec,
        dims: Sequence[int],
        weights: Sequence[float] | None = None,
        n_dims_per_step: int = -1,
        normalize: bool = True,
        *,
        loss_kwargs: dict[str, Any] | None = None,
        miner: str | type | nn.Module | None = None,
        miner_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        width: int | None = None,
        gather: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        # (without a width, sizes above the embedding's fail at the first step)
        self.dims = validate_dims(dims, sys.maxsize if width is None else width)
        g = len(self.dims)
        weights = [1.0] * g if weights is None else [float(w) for w in weights]
        if len(weights) != g:
            raise ValueError(f"embedding loss weights must hold one value per size ({g}: {self.dims}), "
                             f"got {len(weights)}: {weights}")
        negative = [w for w in weights if not math.isfinite(w) or w < 0]
        if negative:
            raise ValueError(f"embedding loss weights must be finite and >= 0, got {negative[0]} in {weights}")
        if isinstance(n_dims_per_step, bool) or not isinstance(n_dims_per_step, int) or \
                not (n_dims_per_step == -1 or 1 <= n_dims_per_step):
            raise ValueError(f"n_dims_per_step must be -1 (all sizes) or an integer >= 1, got {n_dims_per_step!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.weights = weights  # on the host: no device sync to weigh a size or skip one of weight 0
        self.n_dims_per_step = n_dims_per_step
        self.normalize = bool(normalize)
        self.gather = bool(gather)
        self.seed = int(torch.initial_seed() % (2**31)) if seed is None else int(seed)
        self._calls = 0
        self.losses, self.shared = self._build_losses(loss, dict(loss_kwargs or {}), num_classes)
        self.miner = self._build_miner(miner, dict(miner_kwargs or {}))
        first = self.losses[0]
        self.loss_name = type(first).__name__
        self.needs_class_labels = needs_class_labels(first)

    # ----------------------------------------------------------------- construction
    def _build_losses(self, spec: LossSpec, kwargs: dict[str, Any], num_classes: int | None
                      ) -> tuple[nn.ModuleList, bool]:
        if isinstance(spec, nn.Module):
            if kwargs:
                raise ValueError(f"loss_kwargs {sorted(kwargs)} cannot apply to a loss given as an instance "
                                 f"({type(spec).__name__}); give its class name instead")
            params = [n for n, _ in spec.named_parameters()]
            if params:
                raise ValueError(
                    f"{type(spec).__name__} has parameters of its own ({', '.join(params[:3])}), sized for one "
                    "embedding size: give its class name (or a factory size -> loss) so each size gets its own")
            return nn.ModuleList([spec]), True
        if isinstance(spec, str) or isinstance(spec, type):
            cls = _resolve_class(spec, "loss")
            accepted = init_parameters(cls)
            if "embedding_size" in kwargs:
                raise ValueError("loss_kwargs must not set embedding_size: each size's loss gets its own")
            if "num_classes" in accepted and "num_classes" not in kwargs:
                if num_classes is None:
                    raise ValueError(f"{cls.__name__} learns per-class parameters: it needs num_classes")
                kwargs["num_classes"] = num_classes
            try:
                if "embedding_size" in accepted:
                    return nn.ModuleList([cls(embedding_size=m, **kwargs) for m in self.dims]), False
                return nn.ModuleList([cls(**kwargs)]), True
            except TypeError as err:
                raise ValueError(f"cannot build {cls.__name__} with loss_kwargs {kwargs}: {err}") from None
        if callable(spec):
            built = []
            for m in self.dims:
                item = spec(m)
                if not isinstance(item, nn.Module):
                    raise ValueError(f"the loss factory returned {type(item).__name__} for size {m}, not an nn.Module")
                built.append(item)
            return nn.ModuleList(built), False
        raise ValueError(f"loss must be a pytorch-metric-learning loss name, class, instance or a factory "
                         f"size -> loss, got {spec!r}")

    def _build_miner(self, spec, kwargs: dict[str, Any]) -> nn.Module | None:
        if spec is None:
            if kwargs:
                raise ValueError(f"miner_kwargs {sorted(kwargs)} given without a miner")
            return None
        if isinstance(spec, nn.Module):
            return spec
        cls = _resolve_class(spec, "miner")
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ValueError(f"cannot build {cls.__name__} with miner_kwargs {kwargs}: {err}") from None

    # ----------------------------------------------------------------- steps
    def step_sizes(self, step: int) -> list[int]:
        """Indices (ascending) of the sizes trained at ``step``: all, or ``n_dims_per_step`` drawn from
        a generator seeded by ``(seed, step)``."""
        g = len(self.dims)
        if self.n_dims_per_step == -1 or self.n_dims_per_step >= g:
            return list(range(g))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        return sorted(torch.randperm(g, generator=gen)[: self.n_dims_per_step].tolist())

    def _loss_at(self, index: int) -> nn.Module:
        return self.losses[0] if self.shared else self.losses[index]

    def per_size(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int | None = None,
                 every_size: bool = False, gather: bool | None = None) -> dict[int, torch.Tensor]:
        """The unweighted loss of each size trained at ``step`` (default: a counter of calls; ``every_size``:
        all sizes, as in evaluation), ``{m: loss}``, on the global batch under DDP with ``gather`` (default
        the module's; evaluation passes False, as its ranks may run different numbers of batches)."""
        if not torch.is_tensor(embeddings) or embeddings.ndim != 2:
            shape = tuple(embeddings.shape) if torch.is_tensor(embeddings) else type(embeddings).__name__
            raise ValueError(f"embeddings must be a 2-D tensor [N, d], got {shape}")
        if embeddings.shape[1] < self.dims[-1]:
            raise ValueError(f"embeddings have width {embeddings.shape[1]}, below the largest size {self.dims[-1]}")
        if labels is None:
            raise ValueError(f"{self.loss_name} needs labels (class labels, or instance ids for views)")
        labels = torch.as_tensor(labels, device=embeddings.device)
        if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels must be [N] = [{embeddings.shape[0]}], got {list(labels.shape)}")
        if step is None and not every_size:
            step = self._calls
            self._calls += 1
        if self.gather if gather is None else gather:
            embeddings, labels = gather_batch(embeddings, labels)
        out = {}
        sizes = range(len(self.dims)) if every_size else [i for i in self.step_sizes(step) if self.weights[i] > 0]
        for i in sizes:  # (a size of weight 0 is not computed in training: the plain model of a comparison)
            m = self.dims[i]
            z = embeddings[:, :m].float()
            if self.normalize:
                z = F.normalize(z, dim=-1)
            pairs = self.miner(z, labels) if self.miner is not None else None
            out[m] = self._loss_at(i)(z, labels, pairs) if pairs is not None else self._loss_at(i)(z, labels)
        return out

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int | None = None,
                every_size: bool = False, gather: bool | None = None) -> torch.Tensor:
        parts = self.per_size(embeddings, labels, step, every_size, gather)
        weight = dict(zip(self.dims, self.weights))
        return sum(weight[m] * v for m, v in parts.items())

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, weights={self.weights}, n_dims_per_step={self.n_dims_per_step}, "
                f"normalize={self.normalize}, gather={self.gather}, shared={self.shared}")


# ----------------------------------------------------------------------------- DDP
def gather_batch(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's embeddings (with autograd through the gather) and labels, concatenated in rank order;
    the inputs themselves outside DDP. Ranks may hold batches of different sizes (a last batch): each is
    padded to the largest for the collective and cut back after it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embeddings, labels
    from torch.distributed.nn.functional import all_gather

    world = dist.get_world_size()
    n = torch.tensor([embeddings.shape[0]], device=embeddings.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    pad = top - embeddings.shape[0]
    z = F.pad(embeddings, (0, 0, 0, pad)) if pad else embeddings
    y = F.pad(labels, (0, pad)) if pad else labels
    zs = all_gather(z.contiguous())
    ys = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(ys, y.contiguous())
    return (torch.cat([t[:s] for t, s in zip(zs, sizes)]), torch.cat([t[:s] for t, s in zip(ys, sizes)]))


def view_ids(batch: int, views: int, rank: int = 0, world: int = 1, device=None) -> torch.Tensor:
    """Instance ids of ``batch`` images of ``views`` views each, flattened image-major (``[N * V]``), unique
    across ranks (``i * world + rank``): the labels of a self-supervised loss's positives."""
    ids = torch.arange(batch, device=device) * world + rank
    return ids.repeat_interleave(views)
