"""Matryoshka heads: one classifier per nested prefix of the embedding.

Every head maps an embedding ``z: [N, d]`` to logits stacked over the sizes ``dims``
``[G, N, C]`` (G = number of sizes, ascending), so losses, metrics and the adaptive cascade treat
MRL, MRL-E and the fixed-feature baselines alike. :class:`ClassifierHead` declares that interface.

- ``mrl``: :class:`MatryoshkaHead`, an independent ``Linear(m, C)`` on each prefix ``z[:, :m]``.
- ``mrl_e``: :class:`MatryoshkaHead` with ``efficient=True``, one weight ``W: [C, d]`` and one bias
  shared by every size, ``logits_m = z[:, :m] @ W[:, :m].T + b``.
- ``ff`` / ``ff_projection``: :class:`FixedFeatureHead`, a model trained at a single size ``m``
  (``dims=[m]``; ``m`` = the width is a standard model).

:func:`build_head` makes one from its kind, the single spelling used by configs and checkpoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

HeadKind = Literal["mrl", "mrl_e", "ff", "ff_projection"]
HEAD_KINDS: tuple[str, ...] = ("mrl", "mrl_e", "ff", "ff_projection")
HEAD_LABELS = {"mrl": "MRL", "mrl_e": "MRL-E", "ff": "FF", "ff_projection": "FF-proj"}  # in tables and plots


def default_dims(width: int, smallest: int = 8) -> list[int]:
    """Powers of two from ``smallest`` below ``width``, always ending at ``width``.

    >>> default_dims(2048)
    [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    >>> default_dims(384)
    [8, 16, 32, 64, 128, 256, 384]
    """
    if width < 1:
        raise ValueError(f"embedding width must be >= 1, got {width}")
    if smallest < 1:
        raise ValueError(f"smallest size must be >= 1, got {smallest}")
    sizes = []
    m = smallest
    while m < width:
        sizes.append(m)
        m *= 2
    sizes.append(width)
    return sizes


def validate_dims(dims: Sequence[int], width: int) -> list[int]:
    """Check a list of sizes against the embedding width and return it as a list of ints.

    Raises ``ValueError`` naming the bad value when the list is empty, holds a size
    ``<= 0``, a duplicate, a size out of ascending order, or a size above ``width``.
    """
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence):
        raise ValueError(f"dims must be a list of sizes, got {dims!r}")
    sizes = list(dims)
    if not sizes:
        raise ValueError("dims must hold at least one size, got an empty list")
    for i, m in enumerate(sizes):
        if isinstance(m, bool) or not isinstance(m, int):
            raise ValueError(f"dims must be integers, got {m!r} at position {i} of {sizes}")
        if m <= 0:
            raise ValueError(f"dims must be > 0, got {m} at position {i} of {sizes}")
        if m > width:
            raise ValueError(f"size {m} is larger than the embedding width {width} (dims={sizes})")
        if i and m == sizes[i - 1]:
            raise ValueError(f"size {m} appears twice in dims={sizes}")
        if i and m < sizes[i - 1]:
            raise ValueError(f"dims must be strictly increasing: {m} follows {sizes[i - 1]} in {sizes}")
    return sizes


class ClassifierHead(nn.Module, ABC):
    """The interface every head offers (what the model, loss, metrics and cascade rely on).

    Attributes: ``kind`` (one of :data:`HEAD_KINDS`), ``in_features`` (d), ``num_classes`` (C),
    ``dims`` (the G sizes, ascending).
    """

    kind: str
    in_features: int
    num_classes: int
    dims: list[int]

    @abstractmethod
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of every size: ``z: [N, d] -> [G, N, C]``."""

    @abstractmethod
    def logits_at(self, z: torch.Tensor, dim: int) -> torch.Tensor:
        """Logits of one size only: ``z: [N, d] -> [N, C]``."""

    @abstractmethod
    def embed(self, z: torch.Tensor, dim: int) -> torch.Tensor:
        """The embedding that size ``dim`` classifies: ``z: [N, d] -> [N, dim]``."""

    def block_logits(self, z: torch.Tensor, g: int, previous: torch.Tensor | None) -> torch.Tensor:
        """Logits of size index ``g`` given those of size ``g - 1`` (a head may reuse them)."""
        return self.logits_at(z, self.dims[g])

    def index_of(self, dim: int) -> int:
        """Position of ``dim`` in ``dims``, with a clear error when absent."""
        try:
            return self.dims.index(dim)
        except ValueError:
            raise ValueError(f"dim {dim} is not one of this {self.kind} head's sizes {self.dims}") from None

    def _check_classes(self, num_classes: int) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")


class NestedLinear(torch.autograd.Function):
    """MRL-E logits of every size in one pass: ``z: [N, d], W: [C, m_G], b: [C] -> [G, N, C]``.

    Block k holds dims ``[n_{k-1}, n_k)``; ``logits_k = logits_{k-1} + z_k @ W_k.T``, so each
    block's product is computed once and accumulated (the FLOPs of one full-width linear). The
    backward uses the reverse cumulative sum ``S_k = sum_{g >= k} dL/dlogits_g``: block k's
    gradients are ``S_k @ W_k`` (for z) and ``S_k.T @ z_k`` (for W), written straight into their
    columns instead of autograd's per-slice zero-filled buffers.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        ctx.save_for_backward(z, weight)
        ctx.dims = dims
        out = z.new_empty(len(dims), z.shape[0], weight.shape[0])
        torch.addmm(bias, z[:, : dims[0]], weight[:, : dims[0]].T, out=out[0])
        for g in range(1, len(dims)):
            a, m = dims[g - 1], dims[g]
            torch.addmm(out[g - 1], z[:, a:m], weight[:, a:m].T, out=out[g])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, weight = ctx.saved_tensors
        dims = ctx.dims
        s = grad.clone(memory_format=torch.contiguous_format)  # S_k = sum over g >= k, in place
        for g in range(len(dims) - 2, -1, -1):
            s[g] += s[g + 1]
        grad_z = grad_w = grad_b = None
        bounds = list(zip((0, *dims[:-1]), dims))
        if ctx.needs_input_grad[0]:
            grad_z = z.new_zeros(z.shape)  # dims beyond the largest size get no gradient
            for g, (a, m) in enumerate(bounds):
                grad_z[:, a:m] = s[g] @ weight[:, a:m]
        if ctx.needs_input_grad[1]:
            grad_w = torch.cat([s[g].T @ z[:, a:m] for g, (a, m) in enumerate(bounds)], dim=1)
        if ctx.needs_input_grad[2]:
            grad_b = s[0].sum(0)
        return grad_z, grad_w, grad_b, None


class MatryoshkaHead(ClassifierHead):
    """Linear classifiers on nested prefixes of an embedding (MRL, or MRL-E with ``efficient``).

    Args:
        in_features: embedding width ``d``.
        num_classes: number of classes ``C``.
        dims: ascending prefix sizes, each in ``[1, d]``.
        efficient: MRL-E (one shared weight and bias) instead of MRL (one ``Linear`` per size).

    ``forward(z: [N, d]) -> logits: [G, N, C]``.

    Example::

        head = MatryoshkaHead(2048, 1000, [8, 16, 32, 64, 128, 256, 512, 1024, 2048])
        logits = head(torch.randn(4, 2048))      # [9, 4, 1000]
        top1_at_64 = logits[3].argmax(-1)
    """

    def __init__(self, in_features: int, num_classes: int, dims: Sequence[int], efficient: bool = False) -> None:
        super().__init__()
        self._check_classes(num_classes)
        self.in_features, self.num_classes = in_features, num_classes
        self.dims = validate_dims(dims, in_features)
        self.efficient = efficient
        self.kind = "mrl_e" if efficient else "mrl"
        if efficient:
            # Sized to the largest size: columns beyond it would never be read.
            self.linear = nn.Linear(self.dims[-1], num_classes)
        else:
            self.linears = nn.ModuleList(nn.Linear(m, num_classes) for m in self.dims)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.efficient:
            return self._efficient_logits(z)
        return torch.stack([lin(z[:, :m]) for m, lin in zip(self.dims, self.linears)])

    def _efficient_logits(self, z: torch.Tensor) -> torch.Tensor:
        w, b = self.linear.weight, self.linear.bias
        device = z.device.type
        if torch.is_autocast_enabled(device):  # the Function runs outside autocast: cast here
            dtype = torch.get_autocast_dtype(device)
            z, w, b = z.to(dtype), w.to(dtype), b.to(dtype)
        else:
            w, b = w.to(z.dtype), b.to(z.dtype)
        with torch.autocast(device, enabled=False):
            return NestedLinear.apply(z, w, b, tuple(self.dims))

    def logits_at(self, z: torch.Tensor, dim: int) -> torch.Tensor:
        g = self.index_of(dim)
        if self.efficient:
            return F.linear(z[:, :dim], self.linear.weight[:, :dim], self.linear.bias)
        return self.linears[g](z[:, :dim])

    def embed(self, z: torch.Tensor, dim: int) -> torch.Tensor:
        self.index_of(dim)
        return z[:, :dim]

    def block_logits(self, z: torch.Tensor, g: int, previous: torch.Tensor | None) -> torch.Tensor:
        """With MRL-E, ``logits_g = logits_{g-1} + z[:, n_{g-1}:n_g] @ W[:, n_{g-1}:n_g].T``, so a
        cascade that already computed a smaller size pays only for the new block."""
        m = self.dims[g]
        if not self.efficient or previous is None or g == 0:
            return self.logits_at(z, m)
        a = self.dims[g - 1]
        return previous + z[:, a:m] @ self.linear.weight[:, a:m].T

    def extra_repr(self) -> str:
        kind = "MRL-E" if self.efficient else "MRL"
        return f"{kind}, in_features={self.in_features}, num_classes={self.num_classes}, dims={self.dims}"


class FixedFeatureHead(ClassifierHead):
    """Fixed-feature (FF) baseline: a classifier trained at a single size ``m``.

    Two forms, both returning logits ``[1, N, C]`` so they slot in where a
    :class:`MatryoshkaHead` does:

    - ``projection=False`` (kind ``ff``, the reference implementation's FF): a ``Linear(m, C)``
      reading ``z[:, :m]`` of the full-width backbone; the other ``d - m`` features get no gradient.
    - ``projection=True`` (kind ``ff_projection``, a true ``m``-dimensional embedding): a learned
      ``Linear(d, m)`` projection, then ``Linear(m, C)``; :meth:`embed` returns the projected features.

    Example::

        head = FixedFeatureHead(512, 10, dim=64)                   # reference FF-64
        head = FixedFeatureHead(512, 10, dim=64, projection=True)  # 64-d bottleneck
        head(torch.randn(4, 512)).shape                            # [1, 4, 10]
    """

    def __init__(self, in_features: int, num_classes: int, dim: int, projection: bool = False) -> None:
        super().__init__()
        self._check_classes(num_classes)
        self.in_features, self.num_classes = in_features, num_classes
        self.dims = validate_dims([dim], in_features)
        self.dim = dim
        self.kind = "ff_projection" if projection else "ff"
        self.projection = nn.Linear(in_features, dim) if projection else None
        self.classifier = nn.Linear(dim, num_classes)

    def embed(self, z: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        if dim is not None:
            self.index_of(dim)
        return self.projection(z) if self.projection is not None else z[:, : self.dim]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(z)).unsqueeze(0)

    def logits_at(self, z: torch.Tensor, dim: int) -> torch.Tensor:
        self.index_of(dim)
        return self.classifier(self.embed(z))

    def extra_repr(self) -> str:
        form = "projection" if self.projection is not None else "prefix"
        return f"FF-{self.dim} ({form}), in_features={self.in_features}, num_classes={self.num_classes}"


def build_head(kind: str, in_features: int, num_classes: int, dims: Sequence[int] | None = None) -> ClassifierHead:
    """The head of ``kind`` (one of :data:`HEAD_KINDS`) on a ``in_features``-wide embedding.

    ``dims`` defaults to :func:`default_dims` for MRL/MRL-E and to ``[in_features]`` (a standard
    model) for the fixed-feature heads, which take exactly one size (FF-m is ``dims=[m]``).
    """
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head {kind!r}; choose one of {HEAD_KINDS}")
    if kind in ("ff", "ff_projection"):
        sizes = validate_dims(dims if dims is not None else [in_features], in_features)
        if len(sizes) != 1:
            raise ValueError(f"a fixed-feature head ({kind}) trains one size; got dims={sizes} (FF-m is dims=[m])")
        return FixedFeatureHead(in_features, num_classes, sizes[0], projection=kind == "ff_projection")
    sizes = dims if dims is not None else default_dims(in_features)
    return MatryoshkaHead(in_features, num_classes, sizes, efficient=kind == "mrl_e")
