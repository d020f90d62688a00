"""Matryoshka heads: one classifier per nested prefix of the embedding.

Every head maps an embedding ``z: [N, d]`` to logits stacked over nesting sizes
``[G, N, C]`` (G = number of sizes, ascending), so losses, metrics and the adaptive
cascade treat MRL, MRL-E and the fixed-feature baselines alike.

- :class:`MatryoshkaHead` (MRL): an independent ``Linear(m, C)`` on each prefix ``z[:, :m]``.
- :class:`MatryoshkaHead` with ``efficient=True`` (MRL-E): one weight ``W: [C, d]`` and one bias
  shared by every size, ``logits_m = z[:, :m] @ W[:, :m].T + b``.
- :class:`FixedFeatureHead` (FF): a model trained at a single size ``m``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def default_nesting(width: int, smallest: int = 8) -> list[int]:
    """Powers of two from ``smallest`` below ``width``, always ending at ``width``.

    >>> default_nesting(2048)
    [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    >>> default_nesting(384)
    [8, 16, 32, 64, 128, 256, 384]
    """
    if width < 1:
        raise ValueError(f"embedding width must be >= 1, got {width}")
    if smallest < 1:
        raise ValueError(f"smallest nesting size must be >= 1, got {smallest}")
    sizes = []
    m = smallest
    while m < width:
        sizes.append(m)
        m *= 2
    sizes.append(width)
    return sizes


def validate_nesting(nesting: Sequence[int], width: int) -> list[int]:
    """Check a nesting list against the embedding width and return it as a list of ints.

    Raises ``ValueError`` naming the bad value when the list is empty, holds a size
    ``<= 0``, a duplicate, a size out of ascending order, or a size above ``width``.
    """
    sizes = list(nesting)
    if not sizes:
        raise ValueError("nesting must hold at least one size, got an empty list")
    for i, m in enumerate(sizes):
        if isinstance(m, bool) or not isinstance(m, int):
            raise ValueError(f"nesting sizes must be integers, got {m!r} at position {i} of {sizes}")
        if m <= 0:
            raise ValueError(f"nesting sizes must be > 0, got {m} at position {i} of {sizes}")
        if m > width:
            raise ValueError(
                f"nesting size {m} is larger than the embedding width {width} (nesting={sizes})"
            )
        if i and m == sizes[i - 1]:
            raise ValueError(f"nesting size {m} appears twice in {sizes}")
        if i and m < sizes[i - 1]:
            raise ValueError(
                f"nesting sizes must be strictly increasing: {m} follows {sizes[i - 1]} in {sizes}"
            )
    return sizes


class NestedLinear(torch.autograd.Function):
    """MRL-E logits of every size in one pass: ``z: [N, d], W: [C, m_G], b: [C] -> [G, N, C]``.

    Block k holds dims ``[n_{k-1}, n_k)``; ``logits_k = logits_{k-1} + z_k @ W_k.T``, so each
    block's product is computed once and accumulated (the FLOPs of one full-width linear). The
    backward uses the reverse cumulative sum ``S_k = sum_{g >= k} dL/dlogits_g``: block k's
    gradients are ``S_k @ W_k`` (for z) and ``S_k.T @ z_k`` (for W), written straight into their
    columns instead of autograd's per-slice zero-filled buffers.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, nesting: tuple[int, ...]) -> torch.Tensor:
        ctx.save_for_backward(z, weight)
        ctx.nesting = nesting
        out = z.new_empty(len(nesting), z.shape[0], weight.shape[0])
        torch.addmm(bias, z[:, : nesting[0]], weight[:, : nesting[0]].T, out=out[0])
        for g in range(1, len(nesting)):
            a, m = nesting[g - 1], nesting[g]
            torch.addmm(out[g - 1], z[:, a:m], weight[:, a:m].T, out=out[g])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, weight = ctx.saved_tensors
        nesting = ctx.nesting
        s = grad.clone(memory_format=torch.contiguous_format)  # S_k = sum over g >= k, in place
        for g in range(len(nesting) - 2, -1, -1):
            s[g] += s[g + 1]
        grad_z = grad_w = grad_b = None
        bounds = list(zip((0, *nesting[:-1]), nesting))
        if ctx.needs_input_grad[0]:
            grad_z = z.new_zeros(z.shape)  # dims beyond the largest size get no gradient
            for g, (a, m) in enumerate(bounds):
                grad_z[:, a:m] = s[g] @ weight[:, a:m]
        if ctx.needs_input_grad[1]:
            grad_w = torch.cat([s[g].T @ z[:, a:m] for g, (a, m) in enumerate(bounds)], dim=1)
        if ctx.needs_input_grad[2]:
            grad_b = s[0].sum(0)
        return grad_z, grad_w, grad_b, None


class MatryoshkaHead(nn.Module):
    """Linear classifiers on nested prefixes of an embedding.

    Args:
        in_features: embedding width ``d``.
        num_classes: number of classes ``C``.
        nesting: ascending prefix sizes, each in ``[1, d]``.
        efficient: MRL-E (one shared weight and bias) instead of MRL (one ``Linear`` per size).

    ``forward(z: [N, d]) -> logits: [G, N, C]``.

    Example::

        head = MatryoshkaHead(2048, 1000, [8, 16, 32, 64, 128, 256, 512, 1024, 2048])
        logits = head(torch.randn(4, 2048))      # [9, 4, 1000]
        top1_at_64 = logits[3].argmax(-1)
    """

    def __init__(
        self, in_features: int, num_classes: int, nesting: Sequence[int], efficient: bool = False
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.nesting = validate_nesting(nesting, in_features)
        self.efficient = efficient
        if efficient:
            # Sized to the largest nesting size: columns beyond it would never be read.
            self.linear = nn.Linear(self.nesting[-1], num_classes)
        else:
            self.linears = nn.ModuleList(nn.Linear(m, num_classes) for m in self.nesting)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits for every nesting size: ``z: [N, d] -> [G, N, C]``."""
        if self.efficient:
            return self._efficient_logits(z)
        return torch.stack([lin(z[:, :m]) for m, lin in zip(self.nesting, self.linears)])

    def _efficient_logits(self, z: torch.Tensor) -> torch.Tensor:
        w, b = self.linear.weight, self.linear.bias
        device = z.device.type
        if torch.is_autocast_enabled(device):  # the Function runs outside autocast: cast here
            dtype = torch.get_autocast_dtype(device)
            z, w, b = z.to(dtype), w.to(dtype), b.to(dtype)
        else:
            w, b = w.to(z.dtype), b.to(z.dtype)
        with torch.autocast(device, enabled=False):
            return NestedLinear.apply(z, w, b, tuple(self.nesting))

    def logits_at(self, z: torch.Tensor, size: int) -> torch.Tensor:
        """Logits of one nesting size only: ``z: [N, d] -> [N, C]``."""
        g = self.index_of(size)
        if self.efficient:
            return F.linear(z[:, :size], self.linear.weight[:, :size], self.linear.bias)
        return self.linears[g](z[:, :size])

    def block_logits(self, z: torch.Tensor, g: int, previous: torch.Tensor | None) -> torch.Tensor:
        """Logits of size index ``g`` given those of size ``g - 1`` (MRL-E reuses them).

        With MRL-E, ``logits_g = logits_{g-1} + z[:, n_{g-1}:n_g] @ W[:, n_{g-1}:n_g].T``, so a
        cascade that already computed a smaller size pays only for the new block.
        """
        m = self.nesting[g]
        if not self.efficient or previous is None or g == 0:
            return self.logits_at(z, m)
        a = self.nesting[g - 1]
        return previous + z[:, a:m] @ self.linear.weight[:, a:m].T

    def index_of(self, size: int) -> int:
        """Position of ``size`` in the nesting list, with a clear error when absent."""
        try:
            return self.nesting.index(size)
        except ValueError:
            raise ValueError(f"size {size} is not a nesting size; choose one of {self.nesting}") from None

    def extra_repr(self) -> str:
        kind = "MRL-E" if self.efficient else "MRL"
        return f"{kind}, in_features={self.in_features}, num_classes={self.num_classes}, nesting={self.nesting}"


class FixedFeatureHead(nn.Module):
    """Fixed-feature (FF) baseline: a classifier trained at a single size ``m``.

    Two forms, both returning logits ``[1, N, C]`` so they slot in where a
    :class:`MatryoshkaHead` does:

    - ``projection=False`` (the reference implementation's FF): a ``Linear(m, C)`` reading
      ``z[:, :m]`` of the full-width backbone; the other ``d - m`` features get no gradient.
    - ``projection=True`` (a true ``m``-dimensional embedding): a learned ``Linear(d, m)``
      projection, then ``Linear(m, C)``; :meth:`embed` returns the projected ``m`` features.

    Example::

        head = FixedFeatureHead(512, 10, size=64)                   # reference FF-64
        head = FixedFeatureHead(512, 10, size=64, projection=True)  # 64-d bottleneck
        head(torch.randn(4, 512)).shape                             # [1, 4, 10]
    """

    efficient = False

    def __init__(self, in_features: int, num_classes: int, size: int, projection: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.nesting = validate_nesting([size], in_features)
        self.size = size
        self.projection = nn.Linear(in_features, size) if projection else None
        self.classifier = nn.Linear(size, num_classes)

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """The ``m``-dimensional embedding this baseline classifies: ``[N, d] -> [N, m]``."""
        return self.projection(z) if self.projection is not None else z[:, : self.size]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(z)).unsqueeze(0)

    def logits_at(self, z: torch.Tensor, size: int) -> torch.Tensor:
        self.index_of(size)
        return self.classifier(self.embed(z))

    def block_logits(self, z: torch.Tensor, g: int, previous: torch.Tensor | None) -> torch.Tensor:
        return self.logits_at(z, self.nesting[g])

    def index_of(self, size: int) -> int:
        if size != self.size:
            raise ValueError(f"size {size} is not a nesting size; this FF head has only {self.nesting}")
        return 0

    def extra_repr(self) -> str:
        form = "projection" if self.projection is not None else "prefix"
        return f"FF-{self.size} ({form}), in_features={self.in_features}, num_classes={self.num_classes}"
