"""2D Matryoshka: early-exit depth x nested width (Li et al., 2024) for transformer backbones.

The MRL loss makes every prefix ``z[:, :m]`` of the last block's embedding a representation; 2D
Matryoshka also trains the embeddings of earlier blocks (each through the backbone's own final norm
and pooling, :meth:`MatryoshkaModel.layer_features`), scored by the same Matryoshka head, so a model
cut after ``k`` blocks (:meth:`MatryoshkaModel.truncate`) still classifies and embeds at every size.

Per training step (the options of sentence-transformers' ``AdaptiveLayerLoss``, the loss of its
``Matryoshka2dLoss``):

    loss = last_layer_weight * MRL(last block)
         + prior_layers_weight * sum_{l in S} w(l) * MRL(block l) / |S|
         + kl_weight * sum_{l in S} T * KL(softmax(t / T) || softmax(s_l / T))

``S``: ``n_layers_per_step`` earlier blocks drawn per step (or fixed ``pairs`` of (block, size)
trained every step); ``w(l)``: :func:`layer_weight`; ``s_l`` / ``t``: the student (block ``l``) and
the teacher (the last block, detached), their pooled embeddings (as sentence-transformers) or their
logits at every size (``kl_on``). Everything comes from one forward pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .losses import MatryoshkaLoss
from .options import options_from_mapping

LAYER_WEIGHTINGS = ("uniform", "linear", "log")
KL_TARGETS = ("embeddings", "logits")


@dataclass
class Matryoshka2d:
    """The options of 2D Matryoshka training (``model.matryoshka_2d`` in a config; every field optional).

    Args:
        n_layers_per_step: earlier blocks trained per step, drawn without replacement from
            ``prior_layers``; -1 trains all of them (the 2DMSE paper and sentence-transformers: 1).
        last_layer_weight: weight of the MRL loss at the last block.
        prior_layers_weight: weight of the earlier blocks' MRL losses (averaged over the blocks drawn).
        layer_weighting: ``uniform`` (w = 1), ``linear`` (w = 1 / (1 + l)) or ``log``
            (w = 1 / (1 + ln(1 + l))) for the output of block ``l``. sentence-transformers always divides
            by 1 + its hidden-state index, which counts the embedding layer as 0: its weighting is ``linear``.
        kl_weight: weight of the distillation term (0 turns it off); one term per block drawn, summed, as
            in sentence-transformers.
        kl_temperature: T (> 0).
        kl_on: ``embeddings`` (the pooled embeddings, as sentence-transformers) or ``logits`` (the head's
            logits of the block and of the last block at every size, averaged over sizes).
        prior_layers: the earlier blocks that can be drawn (block counts below the depth); default all.
        pairs: instead of drawing blocks, train these ``[block, size]`` pairs every step (the cross-entropy
            at that size, with its Matryoshka weight); the KL term applies to each block listed.
        seed: seeds the draw of step ``(epoch, batch)``, so every DDP rank and a resumed run draw the same
            blocks; default the process's torch seed when the model is built (``seed_everything``).
    """

    n_layers_per_step: int = 1
    last_layer_weight: float = 1.0
    prior_layers_weight: float = 1.0
    layer_weighting: Literal["uniform", "linear", "log"] = "uniform"
    kl_weight: float = 1.0
    kl_temperature: float = 0.3
    kl_on: Literal["embeddings", "logits"] = "embeddings"
    prior_layers: list[int] | None = None
    pairs: list[list[int]] | None = None
    seed: int | None = None

    @classmethod
    def from_any(cls, value: "Matryoshka2d | dict[str, Any] | None") -> "Matryoshka2d | None":
        """The options from a dataclass, a mapping (a checkpoint's hyperparameters) or ``None``."""
        return options_from_mapping(cls, value, "matryoshka_2d")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_weight(layer: int, weighting: str) -> float:
    """The weight ``w(l)`` of block ``l``'s MRL loss (see :class:`Matryoshka2d`)."""
    if weighting == "uniform":
        return 1.0
    if weighting == "linear":
        return 1.0 / (1 + layer)
    if weighting == "log":
        return 1.0 / (1 + math.log1p(layer))
    raise ValueError(f"unknown layer_weighting {weighting!r}; choose one of {LAYER_WEIGHTINGS}")


def kl_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T * KL(softmax(teacher / T) || softmax(student / T))`` over the last axis, averaged over every
    other axis (for ``[N, d]``, torch's ``batchmean``); no gradient reaches the teacher."""
    log_p = F.log_softmax(student.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    return temperature * kl.mean()


class Matryoshka2dLoss(nn.Module):
    """The 2D Matryoshka loss over the outputs of several blocks of one forward pass.

    Args:
        base: the (1D) Matryoshka cross-entropy, applied at each block.
        depth: the backbone's number of blocks.
        dims: the Matryoshka sizes (to place ``pairs``).
        options: :class:`Matryoshka2d` (or its mapping).

    ``step_layers(epoch, batch)`` says which blocks a step embeds (ascending, ending at ``depth``);
    ``forward(logits [K, G, N, C], embeddings [K, N, d], layers, target) -> (loss, parts)`` with the
    K blocks of ``layers`` and ``parts = {"last", "prior", "kl"}`` (detached, for logging).

    Example::

        loss_fn = Matryoshka2dLoss(MatryoshkaLoss(len(dims)), depth=12, dims=dims)
        layers = loss_fn.step_layers(epoch, batch_idx)          # e.g. [7, 12]
        z = model.layer_features(x, layers)                     # [2, N, d]
        loss, parts = loss_fn(model.head(z.flatten(0, 1)).unflatten(1, (2, -1)).transpose(0, 1), z, layers, y)
    """

    def __init__(self, base: MatryoshkaLoss, depth: int, dims: Sequence[int],
                 options: "Matryoshka2d | dict[str, Any] | None" = None) -> None:
        super().__init__()
        opts = Matryoshka2d.from_any(options) or Matryoshka2d()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
            raise ValueError(f"2D Matryoshka needs a backbone of at least 2 blocks, got depth {depth!r}")
        n = opts.n_layers_per_step
        if isinstance(n, bool) or not isinstance(n, int) or not (n == -1 or n >= 1):
            raise ValueError(f"n_layers_per_step must be -1 (all earlier blocks) or >= 1, got {n!r}")
        for name in ("last_layer_weight", "prior_layers_weight", "kl_weight"):
            value = getattr(opts, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if not isinstance(opts.kl_temperature, (int, float)) or not math.isfinite(opts.kl_temperature) or opts.kl_temperature <= 0:
            raise ValueError(f"kl_temperature must be finite and > 0, got {opts.kl_temperature!r}")
        layer_weight(1, opts.layer_weighting)  # names a bad weighting now
        if opts.kl_on not in KL_TARGETS:
            raise ValueError(f"unknown kl_on {opts.kl_on!r}; choose one of {KL_TARGETS}")
        self.dims = [int(m) for m in dims]
        if opts.pairs is not None and opts.prior_layers is not None:
            raise ValueError("give either pairs (fixed [block, size] pairs) or prior_layers (blocks to draw from), not both")
        self.pairs: dict[int, list[int]] | None = None
        if opts.pairs is not None:
            self.pairs = {}
            for pair in opts.pairs:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise ValueError(f"each of pairs must be [block, size], got {pair!r}")
                layer, dim = pair
                _check_prior_layer(layer, depth, "pairs")
                if dim not in self.dims:
                    raise ValueError(f"size {dim!r} in pairs is not one of the model's sizes {self.dims}")
                if dim in self.pairs.setdefault(int(layer), []):
                    raise ValueError(f"pair {list(pair)} is listed twice")
                self.pairs[int(layer)].append(int(dim))
            if not self.pairs:
                raise ValueError("pairs is empty: list at least one [block, size], or leave it out to draw blocks")
            candidates = sorted(self.pairs)
            # each paired block's Matryoshka weights with its unlisted sizes zeroed, built once (not per step)
            self.pair_weights = {layer: base.weights * torch.tensor([float(m in sizes) for m in self.dims])
                                 for layer, sizes in self.pairs.items()}
        else:
            candidates = list(range(1, depth)) if opts.prior_layers is None else list(opts.prior_layers)
            for layer in candidates:
                _check_prior_layer(layer, depth, "prior_layers")
            if not candidates or len(set(candidates)) != len(candidates):
                raise ValueError(f"prior_layers must list distinct blocks in [1, {depth - 1}], got {opts.prior_layers}")
            candidates = sorted(candidates)
        if opts.seed is None:
            opts.seed = int(torch.initial_seed()) % (2**31)
        self.options, self.depth, self.base = opts, depth, base
        self.candidates = candidates

    def sample_layers(self, epoch: int, batch: int) -> list[int]:
        """The earlier blocks trained at step ``(epoch, batch)``, ascending: ``pairs``' blocks, or
        ``n_layers_per_step`` of ``prior_layers`` drawn by a generator seeded with (seed, epoch, batch)."""
        n = self.options.n_layers_per_step
        if self.pairs is not None or n == -1 or n >= len(self.candidates):
            return list(self.candidates)
        key = ((self.options.seed * 1_000_003 + int(epoch)) * 1_000_003 + int(batch)) % (2**63)
        pick = torch.randperm(len(self.candidates), generator=torch.Generator().manual_seed(key))[:n]
        return sorted(self.candidates[i] for i in pick.tolist())

    def step_layers(self, epoch: int, batch: int) -> list[int]:
        """The blocks a training step embeds: :meth:`sample_layers` and the last block."""
        return [*self.sample_layers(epoch, batch), self.depth]

    def forward(
        self, logits: torch.Tensor, embeddings: torch.Tensor, layers: Sequence[int], target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        layers = list(layers)
        if logits.ndim != 4 or embeddings.ndim != 3 or not logits.shape[0] == embeddings.shape[0] == len(layers):
            raise ValueError(f"expected logits [K, G, N, C] and embeddings [K, N, d] of K={len(layers)} blocks "
                             f"{layers}, got {tuple(logits.shape)} and {tuple(embeddings.shape)}")
        if layers[-1] != self.depth:
            raise ValueError(f"the last of layers must be the last block ({self.depth}), got {layers}")
        opts = self.options
        last = self.base(logits[-1], target)
        zero = last.new_zeros(())
        prior, kl = zero, zero
        for k, layer in enumerate(layers[:-1]):
            if self.pairs is None:
                ce = self.base(logits[k], target)
            else:
                weights = self.pair_weights.get(layer, torch.zeros(len(self.dims)))  # a block not paired: nothing
                ce = (self.base.per_size(logits[k], target) * weights.to(logits.device)).sum()
            prior = prior + ce * layer_weight(layer, opts.layer_weighting)
            if opts.kl_weight > 0:
                student, teacher = (embeddings[k], embeddings[-1]) if opts.kl_on == "embeddings" else (logits[k], logits[-1])
                kl = kl + kl_distillation(student, teacher, opts.kl_temperature)
        if len(layers) > 1:
            prior = prior / (len(layers) - 1)
        total = opts.last_layer_weight * last + opts.prior_layers_weight * prior + opts.kl_weight * kl
        return total, {"last": last.detach(), "prior": prior.detach(), "kl": kl.detach()}

    def extra_repr(self) -> str:
        return f"depth={self.depth}, options={self.options}"


def _check_prior_layer(layer: Any, depth: int, where: str) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < depth:
        raise ValueError(f"block {layer!r} in {where} is out of range: earlier blocks are 1..{depth - 1} "
                         f"(the last block, {depth}, is always trained)")


def resolve_eval_layers(eval_layers: Sequence[int] | None, depth: int) -> list[int]:
    """The blocks of the evaluation grid, ascending and ending at ``depth`` (added when missing);
    ``None``: every block."""
    if eval_layers is None:
        return list(range(1, depth + 1))
    layers = list(eval_layers)
    bad = [n for n in layers if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= depth]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"eval_layers must be distinct block counts in [1, {depth}], got {list(eval_layers)}")
    return sorted(set(layers) | {depth})


def grid_key(layer: int, dim: int) -> str:
    """The name of a (block, size) cell in logged metrics: ``L6/64`` (``val/top1@L6/64``)."""
    return f"L{layer}/{dim}"
