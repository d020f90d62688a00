"""The 2D cascade: early exit over (block, size) points of a 2D Matryoshka model, ordered by FLOPs.

A 2D Matryoshka model (:mod:`mrl_vision.matryoshka2d`) classifies after any block ``k`` of its
backbone at any size ``m``. The cascade runs a *chain* of such points in order of cost: the blocks
once each, in order, and at each chain point the head of that size; a sample whose max softmax
probability reaches the point's threshold answers there, the others go on; the last point always
answers. The thresholds are fitted with the 1D cascade's methods (:mod:`mrl_vision.adaptive`:
``pairwise``, ``tolerance``, ``budget``), the exit costs in FLOPs standing in for its dimensions.

Costs (one image, :func:`block_flops`, :func:`head_flops`, counted by
``torch.utils.flop_counter.FlopCounterMode``; a multiply-add is 2 FLOPs):

- fixed point (k, m): ``block_flops[k] + head_flops[m]``;
- exit at chain point j: the blocks up to the deepest block among points 0..j, plus the heads of
  every point 0..j (each evaluated once).

The default chain is the Pareto front of the fixed points on the calibration data (accuracy rising
with cost, :func:`pareto_chain`). Plain tensors, no Lightning, so the callback
(:class:`mrl_vision.callbacks.DepthWidthCascade`), the benchmark and notebooks share it.

Shapes: ``K`` blocks (``layers``, ascending), ``G`` sizes, ``N`` samples, ``C`` classes, ``J`` chain points.

Example::

    grid = CostGrid.from_model(model, layers=[3, 6, 9, 12])
    conf, preds = grid_confidences(layer_logits)              # [K, G, N] each
    fitted = fit_cascade(conf[:, :, cal], preds[:, :, cal], labels[cal], grid, method="budget", budget=0.5)
    result = evaluate_cascade(conf[:, :, rest], preds[:, :, rest], labels[rest], grid, fitted.chain, fitted.thresholds)
    result.accuracy, result.expected_flops, result.flops_fraction
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import adaptive as A
from .files import atomic_path, atomic_write_text
from .matryoshka2d import grid_key

Point = tuple[int, int]  # (block, size)


# ----------------------------------------------------------------------------- FLOPs
def _image_side(model, input_size: int | Sequence[int] | None) -> tuple[int, int]:
    size = model.input_size if input_size is None else input_size
    if size is None:
        raise ValueError("block_flops needs the image size: pass input_size, or build the model with input_size=...")
    hw = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
    if len(hw) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in hw):
        raise ValueError(f"input_size must be a positive integer (or [height, width]), got {size!r}")
    return hw


def _count_flops(fn, *args) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def block_flops(model, layers: Sequence[int], input_size: int | Sequence[int] | None = None) -> list[int]:
    """FLOPs of one image through the backbone up to and including block ``k`` (patch embedding, k
    blocks, final norm, pooling; no head), for each ``k`` in ``layers``: counted on a copy of the
    model cut with :meth:`MatryoshkaModel.truncate`, in eval mode, on a ``[1, 3, H, W]`` image of
    ``input_size`` (default the model's ``input_size``). The model itself is left as it was."""
    hw = _image_side(model, input_size)
    depth = model.depth
    if depth is None:
        raise ValueError(f"backbone {model.backbone_name!r} has no stack of blocks of one width: block FLOPs need a "
                         "transformer such as a ViT, DeiT or EVA")
    layers = list(layers)
    bad = [k for k in layers if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= depth]
    if bad or not layers:
        raise ValueError(f"layers must be block counts in [1, {depth}], got {layers}")
    param = next(model.parameters())
    x = torch.zeros(1, 3, *hw, device=param.device, dtype=param.dtype)
    shallow = copy.deepcopy(model).eval()
    counts: dict[int, int] = {}
    for k in sorted(set(layers), reverse=True):  # cut deeper first: one copy serves every k
        shallow.truncate(k)
        counts[k] = _count_flops(shallow.features, x)
    return [counts[k] for k in layers]


def head_flops(model) -> list[int]:
    """FLOPs of the head at each of ``model.dims`` for one image (``head.logits_at``; 2 x m x C for a
    linear head on m dims)."""
    head = model._require_head("head_flops")
    param = next(head.parameters())
    z = torch.zeros(1, head.in_features, device=param.device, dtype=param.dtype)
    return [_count_flops(head.logits_at, z, m) for m in head.dims]


# ----------------------------------------------------------------------------- the grid of points
@dataclass(frozen=True)
class CostGrid:
    """The (block, size) points and their costs: ``layers`` (K blocks, ascending), ``dims`` (G sizes,
    ascending), ``block_flops`` (per block) and ``head_flops`` (per size), per image.

    Example::

        grid = CostGrid.from_model(model, [3, 6, 9, 12])
        grid.point_flops()          # [K, G]: block_flops[k] + head_flops[m]
        grid.exit_flops([(3, 8), (6, 64), (12, 192)])
    """

    layers: tuple[int, ...]
    dims: tuple[int, ...]
    block_flops: tuple[float, ...]
    head_flops: tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("layers", "dims"):
            values = list(getattr(self, name))
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values) \
                    or any(a >= b for a, b in zip(values, values[1:])):
                raise ValueError(f"{name} must be increasing positive integers, got {values}")
        for name, ref in (("block_flops", "layers"), ("head_flops", "dims")):
            values, n = list(getattr(self, name)), len(getattr(self, ref))
            if len(values) != n:
                raise ValueError(f"{name} must hold one value per entry of {ref} ({n}), got {len(values)}: {values}")
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0]
            if bad:
                raise ValueError(f"{name} must be finite and >= 0, got {bad[0]!r} in {values}")
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "block_flops", tuple(self.block_flops))
        object.__setattr__(self, "head_flops", tuple(self.head_flops))

    @classmethod
    def from_model(cls, model, layers: Sequence[int], input_size: int | Sequence[int] | None = None,
                   views: int = 1) -> "CostGrid":
        """The grid of ``model`` over ``layers``, costs measured by :func:`block_flops` and
        :func:`head_flops`, times ``views`` (2 under flip test-time augmentation: each image is run twice)."""
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be an integer >= 1, got {views!r}")
        return cls(tuple(layers), tuple(model.dims), tuple(views * f for f in block_flops(model, layers, input_size)),
                   tuple(views * f for f in head_flops(model)))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.layers), len(self.dims)

    @property
    def full_point(self) -> Point:
        """The full model: the last block at the largest size."""
        return self.layers[-1], self.dims[-1]

    @property
    def full_flops(self) -> float:
        """FLOPs of the full model (the last block at the largest size): the reference of ``flops_fraction``."""
        return self.block_flops[-1] + self.head_flops[-1]

    def point_flops(self) -> torch.Tensor:
        """Cost of every fixed point ``[K, G]`` (float64)."""
        return torch.tensor(self.block_flops, dtype=torch.float64)[:, None] + torch.tensor(self.head_flops, dtype=torch.float64)

    def index(self, point: Sequence[int]) -> tuple[int, int]:
        """Positions ``(k, g)`` of a ``(block, size)`` point, with a clear error when it is not on the grid."""
        if isinstance(point, (str, bytes)) or not isinstance(point, Sequence) or len(point) != 2:
            raise ValueError(f"a chain point is (block, size), got {point!r}")
        block, size = point
        if block not in self.layers:
            raise ValueError(f"block {block!r} of point {tuple(point)} is not one of the evaluated blocks {list(self.layers)}")
        if size not in self.dims:
            raise ValueError(f"size {size!r} of point {tuple(point)} is not one of the model's sizes {list(self.dims)}")
        return self.layers.index(block), self.dims.index(size)

    def check_chain(self, chain: Sequence[Sequence[int]]) -> list[Point]:
        """The chain as ``(block, size)`` tuples: at least two distinct points of the grid."""
        if isinstance(chain, (str, bytes)) or not isinstance(chain, Sequence):
            raise ValueError(f"chain must be a list of (block, size) points, got {chain!r}")
        if len(chain) < 2:
            raise ValueError(f"a cascade needs at least 2 chain points, got {len(chain)}: {list(chain)}")
        points: list[Point] = []
        for p in chain:
            k, g = self.index(p)
            point = (self.layers[k], self.dims[g])
            if point in points:
                raise ValueError(f"point {point} appears twice in the chain {[tuple(q) for q in chain]}")
            points.append(point)
        return points

    def exit_flops(self, chain: Sequence[Sequence[int]]) -> list[float]:
        """The cost of answering at each chain point: the blocks up to the deepest block so far (each
        run once, in order) plus the heads of every point so far."""
        points = self.check_chain(chain)
        out, deepest, heads = [], -1, 0.0
        for p in points:
            k, g = self.index(p)
            deepest = max(deepest, k)
            heads += self.head_flops[g]
            out.append(self.block_flops[deepest] + heads)
        return out


# ----------------------------------------------------------------------------- confidences and chains
def grid_confidences(layer_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max softmax probability and argmax class of every (block, size): ``[K, G, N, C] -> ([K, G, N], [K, G, N])``."""
    if layer_logits.ndim != 4:
        raise ValueError(f"expected layer logits [K, G, N, C], got shape {tuple(layer_logits.shape)}")
    conf, preds = layer_logits.float().softmax(-1).max(-1)
    return conf, preds


def _check_grid_inputs(conf: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor, grid: CostGrid) -> None:
    if conf.ndim != 3 or conf.shape != preds.shape:
        raise ValueError(f"conf and preds must both be [K, G, N]; got {tuple(conf.shape)} and {tuple(preds.shape)}")
    if tuple(conf.shape[:2]) != grid.shape:
        raise ValueError(f"conf is [K={conf.shape[0]}, G={conf.shape[1]}, N] but the grid has {grid.shape[0]} blocks "
                         f"{list(grid.layers)} and {grid.shape[1]} sizes {list(grid.dims)}")
    if labels.ndim != 1 or labels.shape[0] != conf.shape[2]:
        raise ValueError(f"labels must be [N={conf.shape[2]}], got {tuple(labels.shape)}")
    if conf.shape[2] == 0:
        raise ValueError("no samples: the cascade needs at least one (conf, preds, label)")


def point_accuracy(preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of every fixed point ``[K, G]`` (float64): ``preds [K, G, N], labels [N]``."""
    return preds.eq(labels.to(preds.device)).double().mean(-1).cpu()


def pareto_chain(conf: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor, grid: CostGrid) -> list[Point]:
    """The default chain: the fixed points no cheaper point matches in accuracy on the given data, by
    cost (:func:`mrl_vision.adaptive.pareto_front`), then always the full model (the last block at the
    largest size), as the 1D cascade always ends at the largest size: ``tolerance`` is measured against
    it. (Ending at the most accurate point of a small calibration set instead picks a shallow point that
    won by chance: on 250 validation digits a 6-block point, 2 points below the full model on test.)"""
    _check_grid_inputs(conf, preds, labels, grid)
    acc, cost = point_accuracy(preds, labels).flatten(), grid.point_flops().flatten()
    g = grid.shape[1]
    chain = [(grid.layers[i // g], grid.dims[i % g]) for i in A.pareto_front(acc, cost).tolist()]
    return [p for p in chain if p != grid.full_point] + [grid.full_point]


def chain_confidences(conf: torch.Tensor, preds: torch.Tensor, grid: CostGrid,
                      chain: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the chain's points, in order: ``[K, G, N] -> ([J, N], [J, N])``, the 1D cascade's inputs."""
    idx = [grid.index(p) for p in grid.check_chain(chain)]
    ks, gs = torch.tensor([k for k, _ in idx]), torch.tensor([g for _, g in idx])
    return conf[ks.to(conf.device), gs.to(conf.device)], preds[ks.to(preds.device), gs.to(preds.device)]


# ----------------------------------------------------------------------------- fitting and evaluating
@dataclass
class Cascade2dResult:
    """A 2D cascade and what it does on a data set (accuracy in [0, 1], costs in FLOPs per image).

    ``chain``: its (block, size) points in order; ``thresholds``: one per point but the last;
    ``exit_flops``: the cost of answering at each point; ``exit_fractions``: the share answering there;
    ``flops_fraction``: ``expected_flops / full_flops`` (the last block at the largest size).
    """

    chain: list[Point]
    thresholds: list[float]
    accuracy: float
    expected_flops: float
    flops_fraction: float
    full_flops: float
    exit_flops: list[float] = field(default_factory=list)
    exit_fractions: list[float] = field(default_factory=list)

    @property
    def expected_gflops(self) -> float:
        return self.expected_flops / 1e9

    def as_dict(self) -> dict:
        out = asdict(self)
        out["chain"] = [list(p) for p in self.chain]
        return out


def evaluate_cascade(
    conf: torch.Tensor,
    preds: torch.Tensor,
    labels: torch.Tensor,
    grid: CostGrid,
    chain: Sequence[Sequence[int]],
    thresholds: Sequence[float] | torch.Tensor,
) -> Cascade2dResult:
    """Accuracy, expected FLOPs and exit fractions of the cascade ``chain`` with ``thresholds`` on
    ``conf, preds [K, G, N]`` and ``labels [N]`` (:func:`mrl_vision.adaptive.evaluate_cascade` along the chain)."""
    _check_grid_inputs(conf, preds, labels, grid)
    chain = grid.check_chain(chain)
    costs = grid.exit_flops(chain)
    c, p = chain_confidences(conf, preds, grid, chain)
    res = A.evaluate_cascade(c, p, labels, costs, thresholds)
    return Cascade2dResult(
        chain=chain, thresholds=res.thresholds, accuracy=res.accuracy, expected_flops=res.expected_dims,
        flops_fraction=res.expected_dims / grid.full_flops, full_flops=grid.full_flops,
        exit_flops=costs, exit_fractions=res.exit_fractions,
    )


def check_budget(budget: float | None) -> float | None:
    """A 2D budget is the expected FLOPs as a fraction of the full model's, in (0, 1]."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or not 0 < budget <= 1:
        raise ValueError(f"budget is the expected FLOPs as a fraction of the full model's, in (0, 1]; got {budget!r}")
    return float(budget)


def check_method(method: str, tolerance: float, budget: float | None) -> None:
    """Name a bad method, tolerance or budget before any data is read."""
    if method not in A.METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {A.METHODS}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance!r}")
    check_budget(budget)
    if method == "budget" and budget is None:
        raise ValueError("method='budget' needs budget (expected FLOPs as a fraction of the full model's, e.g. 0.5)")


def fit_cascade(
    conf: torch.Tensor,
    preds: torch.Tensor,
    labels: torch.Tensor,
    grid: CostGrid,
    method: str = "tolerance",
    tolerance: float = 0.005,
    budget: float | None = None,
    chain: Sequence[Sequence[int]] | None = None,
    confidence: float | None = None,
    **family_kw,
) -> Cascade2dResult:
    """Fit a 2D cascade on ``conf, preds [K, G, N]``, ``labels [N]`` and return it, evaluated on the same data.

    ``chain``: default :func:`pareto_chain` of this data. ``method``: ``tolerance`` (the cheapest
    cascade whose accuracy is at least the last chain point's minus ``tolerance``; the last point of
    the default chain is the full model), ``budget`` (the most accurate cascade whose
    expected FLOPs are at most ``budget`` x the full model's) or ``pairwise`` (the reference's per-pair
    search); see :func:`mrl_vision.adaptive.fit_thresholds`. ``confidence`` (``tolerance`` only, e.g.
    0.95): the tolerance must hold for a lower confidence bound on the accuracy difference, not only on
    the calibration data (:func:`mrl_vision.adaptive.fit_tolerance`). ``family_kw`` (``lambdas``, ``points``,
    ``sweeps``) go to :func:`mrl_vision.adaptive.cascade_family`.
    """
    check_method(method, tolerance, budget)
    _check_grid_inputs(conf, preds, labels, grid)
    chain = pareto_chain(conf, preds, labels, grid) if chain is None else grid.check_chain(chain)
    costs = grid.exit_flops(chain)
    absolute = None
    if method == "budget":
        absolute = budget * grid.full_flops
        if absolute < costs[0]:
            raise ValueError(f"budget {budget} of the full model's FLOPs is below the cheapest exit of the chain "
                             f"({costs[0] / grid.full_flops:.4g} of them, at {grid_key(*chain[0])})")
    c, p = chain_confidences(conf, preds, grid, chain)
    thr = A.fit_thresholds(c, p, labels, costs, method=method, tolerance=tolerance, budget=absolute,
                           confidence=confidence, **family_kw)
    return evaluate_cascade(conf, preds, labels, grid, chain, thr)


def tradeoff_curve(
    conf_fit: torch.Tensor,
    preds_fit: torch.Tensor,
    labels_fit: torch.Tensor,
    conf_eval: torch.Tensor,
    preds_eval: torch.Tensor,
    labels_eval: torch.Tensor,
    grid: CostGrid,
    chain: Sequence[Sequence[int]] | None = None,
    **family_kw,
) -> list[dict]:
    """The 2D cascade's trade-off beside every fixed point: the family of cascades along ``chain``
    (default :func:`pareto_chain` of the fit data) traced on the ``fit`` data, its Pareto front there,
    evaluated on the ``eval`` data (:func:`mrl_vision.adaptive.tradeoff_curve`), and each fixed (block,
    size) on the ``eval`` data (``family_kw`` as in :func:`fit_cascade`). Rows ``{"kind": "cascade"|"fixed", "block", "size", "flops",
    "flops_fraction", "accuracy", "thresholds"}`` (``block``/``size`` ``None`` for cascades), by kind then FLOPs."""
    _check_grid_inputs(conf_fit, preds_fit, labels_fit, grid)
    _check_grid_inputs(conf_eval, preds_eval, labels_eval, grid)
    chain = pareto_chain(conf_fit, preds_fit, labels_fit, grid) if chain is None else grid.check_chain(chain)
    costs = grid.exit_flops(chain)
    cf, pf = chain_confidences(conf_fit, preds_fit, grid, chain)
    ce, pe = chain_confidences(conf_eval, preds_eval, grid, chain)
    rows = [
        {"kind": "cascade", "block": None, "size": None, "flops": r["expected_dims"],
         "flops_fraction": r["expected_dims"] / grid.full_flops, "accuracy": r["accuracy"], "thresholds": r["thresholds"]}
        for r in A.tradeoff_curve(cf, pf, labels_fit, ce, pe, labels_eval, costs, **family_kw) if r["kind"] == "cascade"
    ]
    acc, cost = point_accuracy(preds_eval, labels_eval), grid.point_flops()
    for k, block in enumerate(grid.layers):
        for g, size in enumerate(grid.dims):
            rows.append({"kind": "fixed", "block": block, "size": size, "flops": float(cost[k, g]),
                         "flops_fraction": float(cost[k, g]) / grid.full_flops, "accuracy": float(acc[k, g]), "thresholds": []})
    return sorted(rows, key=lambda r: (r["kind"], r["flops"]))


# ----------------------------------------------------------------------------- files
def write_curve(curve: list[dict], result: Cascade2dResult, out_dir: str | os.PathLike, stage: str) -> tuple[Path, Path]:
    """``adaptive2d_{stage}_curve.csv`` and ``.png`` in ``out_dir``, each written to a temporary name
    and renamed: the rows of :func:`tradeoff_curve` and the chosen cascade (kind ``chosen``, its chain
    in ``chain``); the plot has accuracy against GFLOPs per image (log axis), the fixed points as one
    line per block, the cascade's curve, the chosen cascade as a star."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    csv_path, png_path = out / f"adaptive2d_{stage}_curve.csv", out / f"adaptive2d_{stage}_curve.png"
    lines = ["kind,block,size,gflops,flops_fraction,top1,chain,thresholds"]

    def line(kind, block, size, flops, frac, acc, chain, thr):
        blank = "" if block is None else block
        return (f"{kind},{blank},{'' if size is None else size},{flops / 1e9:.9g},{frac:.6f},{100 * acc:.4f},"
                f"{' '.join(grid_key(*p) for p in chain)},{' '.join(f'{t:.6g}' for t in thr)}")

    for r in curve:
        lines.append(line(r["kind"], r["block"], r["size"], r["flops"], r["flops_fraction"], r["accuracy"],
                          result.chain if r["kind"] == "cascade" else [], r["thresholds"]))
    lines.append(line("chosen", None, None, result.expected_flops, result.flops_fraction, result.accuracy,
                      result.chain, result.thresholds))
    atomic_write_text(csv_path, "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    fixed = [r for r in curve if r["kind"] == "fixed"]
    for block in sorted({r["block"] for r in fixed}):
        pts = sorted((r for r in fixed if r["block"] == block), key=lambda r: r["flops"])
        ax.plot([r["flops"] / 1e9 for r in pts], [100 * r["accuracy"] for r in pts], "s-", markersize=3,
                linewidth=0.8, alpha=0.7, label=f"fixed, block {block}")
    casc = [r for r in curve if r["kind"] == "cascade"]
    if casc:
        ax.plot([r["flops"] / 1e9 for r in casc], [100 * r["accuracy"] for r in casc], "o-", color="black",
                markersize=3, label="2D cascade")
    ax.plot([result.expected_gflops], [100 * result.accuracy], "r*", markersize=13, label="chosen cascade")
    ax.set_xscale("log")
    ax.minorticks_off()  # ticks at each block's cost instead (the range may span less than a decade)
    ticks = sorted({min(r["flops"] for r in fixed if r["block"] == b) / 1e9 for b in {r["block"] for r in fixed}})
    ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks], fontsize=7)
    ax.set_xlabel("GFLOPs per image (ticks: each block's smallest size)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"2D cascade: blocks x sizes ({stage})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return csv_path, png_path
