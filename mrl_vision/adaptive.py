"""Adaptive classification: a confidence cascade from small to large embedding sizes.

Each sample starts at the smallest size; when its max softmax probability at size ``g`` reaches
``thresholds[g]`` the cascade answers there, otherwise it moves to the next size; the largest size
always answers. Everything here works on plain tensors (no Lightning), so the callback, the CLI, the
notebooks and the benchmark call the same functions.

Shapes: ``G`` sizes, ``N`` samples, ``C`` classes, ``K`` candidate cascades.

- ``confidences(logits [G, N, C]) -> conf [G, N], preds [G, N]``
- ``evaluate_cascade(conf, preds, labels, dims, thresholds [G-1]) -> CascadeResult``
- ``fit_pairwise``: the reference method (one threshold per consecutive pair of sizes).
- ``fit_tolerance`` / ``fit_budget``: the cheapest cascade within a tolerance of the largest size's
  accuracy / the most accurate cascade under an expected-dimension budget, chosen from a family of
  cascades traced by coordinate descent on ``accuracy - lambda * expected_dims`` for many lambdas.
  With ``confidence`` (e.g. 0.95), ``fit_tolerance`` asks the tolerance of a lower confidence bound
  on the accuracy difference (``paired_lower_bound``), so that it also holds on new data.
- ``tradeoff_curve``: the (expected dims, accuracy) frontier of that family, beside the fixed sizes.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Sequence

import torch

METHODS = ("pairwise", "tolerance", "budget")


# ----------------------------------------------------------------------------- basics
def confidences(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max softmax probability and argmax class per size: ``[G, N, C] -> ([G, N], [G, N])``."""
    if logits.ndim != 3:
        raise ValueError(f"expected logits [G, N, C], got shape {tuple(logits.shape)}")
    conf, preds = logits.float().softmax(-1).max(-1)
    return conf, preds


def validate_thresholds(thresholds: Sequence[float] | torch.Tensor, num_sizes: int) -> torch.Tensor:
    """Thresholds as a float tensor ``[G-1]``: one per size but the last, finite, within [0, 1]."""
    t = torch.as_tensor(thresholds, dtype=torch.float32).flatten().cpu()
    if t.numel() != num_sizes - 1:
        raise ValueError(
            f"need one threshold per size but the last ({num_sizes - 1}), got {t.numel()}: {t.tolist()}"
        )
    for i, v in enumerate(t.tolist()):
        if not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"thresholds must be finite and within [0, 1]; got {v} at position {i}")
    return t


def exit_index(conf: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The size index each sample exits at: ``conf [G, N], thresholds [..., G-1] -> [..., N]``.

    The first ``g < G-1`` with ``conf[g] >= thresholds[g]``, else ``G-1``.
    """
    thr = thresholds.to(conf.device, conf.dtype)
    unsure = ~(conf[:-1] >= thr.unsqueeze(-1))  # [..., G-1, N] (a NaN threshold is never met)
    # the exit is the number of leading unsure sizes (G-1 when all are): a running product counts them
    # (5x faster on the CPU than an argmax over the size axis, which the threshold search calls ~1,000 times)
    return unsure.to(torch.uint8).cumprod(dim=-2).sum(dim=-2, dtype=torch.int64)


@dataclass
class CascadeResult:
    """What a cascade does on a data set (accuracy in [0, 1], cost in embedding dimensions)."""

    thresholds: list[float]
    accuracy: float
    expected_dims: float  # sum over sizes of size x fraction exiting there
    expected_head_cost: float  # sum over sizes of size x fraction that evaluated that size
    exit_fractions: list[float] = field(default_factory=list)
    dims: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_cascade(
    conf: torch.Tensor,
    preds: torch.Tensor,
    labels: torch.Tensor,
    dims: Sequence[int],
    thresholds: Sequence[float] | torch.Tensor,
) -> CascadeResult:
    """Accuracy, expected dims, expected head cost and exit fractions of one cascade.

    ``expected_head_cost`` counts every size a sample passed through (the cost with independent
    MRL heads; with MRL-E, whose larger sizes reuse the smaller ones' logits, it equals
    ``expected_dims``).
    """
    nest = torch.tensor(list(dims), dtype=torch.float64)
    t = validate_thresholds(thresholds, len(nest))
    ex = exit_index(conf, t)
    correct = preds.gather(0, ex.unsqueeze(0)).squeeze(0).eq(labels.to(preds.device))
    frac = torch.bincount(ex.cpu(), minlength=len(nest)).double() / max(1, ex.numel())
    passed = frac.flip(0).cumsum(0).flip(0)  # fraction that evaluated size g
    return CascadeResult(
        thresholds=t.tolist(),
        accuracy=float(correct.double().mean()) if correct.numel() else float("nan"),
        expected_dims=float((frac * nest).sum()),
        expected_head_cost=float((passed * nest).sum()),
        exit_fractions=frac.tolist(),
        dims=[int(m) for m in dims],
    )


# ----------------------------------------------------------------------------- fitting
def _check_inputs(conf: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor, dims: Sequence[int]) -> None:
    if conf.shape != preds.shape or conf.ndim != 2:
        raise ValueError(f"conf and preds must both be [G, N]; got {tuple(conf.shape)} and {tuple(preds.shape)}")
    if labels.ndim != 1 or labels.shape[0] != conf.shape[1]:
        raise ValueError(f"labels must be [N={conf.shape[1]}], got {tuple(labels.shape)}")
    if len(dims) != conf.shape[0]:
        raise ValueError(f"dims has {len(dims)} sizes but conf has {conf.shape[0]}")
    if len(dims) < 2:
        raise ValueError("a cascade needs at least two sizes")
    if conf.shape[1] == 0:
        raise ValueError("cannot fit thresholds on an empty calibration set")


def fit_pairwise(
    conf: torch.Tensor,
    preds: torch.Tensor,
    labels: torch.Tensor,
    dims: Sequence[int],
    grid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference method: for each consecutive pair (g, g+1), the threshold on size g's
    confidence that maximises the accuracy of the two-size cascade (g answers when confident, g+1
    otherwise), the smallest such threshold on ties. ``grid`` defaults to 0.00, 0.01, ..., 1.00.
    Returns thresholds ``[G-1]``."""
    _check_inputs(conf, preds, labels, dims)
    grid = torch.linspace(0, 1, 101) if grid is None else grid.float().cpu()
    correct = preds.eq(labels.to(preds.device)).cpu()
    conf = conf.float().cpu()
    out = []
    for g in range(conf.shape[0] - 1):
        use_small = conf[g].unsqueeze(0) >= grid.unsqueeze(1)  # [T, N]
        acc = torch.where(use_small, correct[g], correct[g + 1]).double().mean(1)
        out.append(grid[int(torch.nonzero(acc == acc.max())[0])])  # first (smallest) best
    return torch.stack(out)


def _candidate_grid(conf: torch.Tensor, points: int) -> torch.Tensor:
    """Per-size threshold candidates ``[G-1, T]``: quantiles of that size's confidence, plus 0 and 1
    (confidences pile up near 1 on easy data, where a uniform grid would be too coarse)."""
    q = torch.linspace(0, 1, points)
    cands = torch.quantile(conf[:-1].float(), q, dim=1).T  # [G-1, T]
    return torch.cat([torch.zeros_like(cands[:, :1]), cands, torch.ones_like(cands[:, :1])], dim=1)


def cascade_family(
    conf: torch.Tensor,
    preds: torch.Tensor,
    labels: torch.Tensor,
    dims: Sequence[int],
    lambdas: Sequence[float] | None = None,
    points: int = 64,
    sweeps: int = 2,
) -> torch.Tensor:
    """Candidate cascades ``[K, G-1]`` spanning cheap to accurate.

    For each trade-off weight ``lam`` (default: 0 and 40 values log-spaced from 1e-4 to 10), coordinate
    descent over the sizes' thresholds maximises ``accuracy - lam * expected_dims / d`` on the given
    data (``d`` the largest size), each threshold chosen from confidence quantiles; the solution
    of one ``lam`` starts the next. Plus, for reference, the cascades with one shared threshold.
    """
    _check_inputs(conf, preds, labels, dims)
    conf = conf.float().cpu()
    correct = preds.eq(labels.to(preds.device)).cpu()
    nest = torch.tensor(list(dims), dtype=torch.float64)
    lambdas = [0.0, *torch.logspace(-4, 1, 40).tolist()] if lambdas is None else list(lambdas)
    cands = _candidate_grid(conf, points)  # [G-1, T]
    g1, t_count = cands.shape
    thr = torch.ones(g1)  # start from "always the largest size"
    found = []
    for lam in lambdas:
        for _ in range(sweeps):
            for g in range(g1):
                trial = thr.repeat(t_count, 1)
                trial[:, g] = cands[g]
                acc, cost = _family_metrics(conf, correct, nest, trial)
                score = acc - lam * cost / float(nest[-1])
                best = torch.nonzero(score >= score.max() - 1e-12).flatten()
                thr = trial[best[cost[best].argmin()]].clone()  # cheapest among the best
        found.append(thr.clone())
    shared = torch.linspace(0, 1, 101).unsqueeze(1).repeat(1, g1)
    return torch.cat([torch.stack(found), shared])


def _family_metrics(conf: torch.Tensor, correct: torch.Tensor, nest: torch.Tensor, thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and expected dims of K cascades at once: ``thr [K, G-1] -> ([K], [K])``."""
    ex = exit_index(conf, thr)  # [K, N]
    return correct.gather(0, ex).double().mean(1), nest[ex].mean(1)


def scored_family(
    conf: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor, dims: Sequence[int], **family_kw
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cascade_family`` with each cascade's accuracy and expected dims on the same data, and the
    per-size correctness ``[G, N]``: ``(family [K, G-1], acc [K], cost [K], correct)``."""
    fam = cascade_family(conf, preds, labels, dims, **family_kw)
    correct = preds.eq(labels.to(preds.device)).cpu()
    acc, cost = _family_metrics(conf.float().cpu(), correct, torch.tensor(list(dims), dtype=torch.float64), fam)
    return fam, acc, cost, correct


def pareto_front(acc: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """Indices of the points no other point beats on both accuracy (higher) and dims (lower),
    sorted by expected dims."""
    order = sorted(range(len(acc)), key=lambda i: (float(cost[i]), -float(acc[i])))
    keep, best = [], -math.inf
    for i in order:
        if float(acc[i]) > best + 1e-12:
            keep.append(i)
            best = float(acc[i])
    return torch.tensor(keep, dtype=torch.long)


def validate_confidence(confidence: float | None) -> float | None:
    """``confidence`` as given when it is ``None`` or a number strictly between 0 and 1."""
    if confidence is None:
        return None
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be a number in (0, 1), e.g. 0.95, or None; got confidence={confidence!r}")
    return float(confidence)


def paired_lower_bound(correct: torch.Tensor, reference: torch.Tensor, confidence: float) -> torch.Tensor:
    """One-sided lower confidence bound on ``accuracy(correct) - accuracy(reference)`` from paired
    samples: ``correct [..., N]``, ``reference [N]`` (bool, right or wrong per sample) -> ``[...]``
    (a fraction; the true difference is at least this with probability about ``confidence``).

    With ``d_i = correct_i - reference_i`` in {-1, 0, 1}, the bound is ``mean - z * sd / sqrt(n)``
    (``z`` the standard normal quantile of ``confidence``) computed on the sample plus the pseudo-counts
    of Agresti and Min (2005): half a sample added to each cell of the 2 x 2 table of (right, wrong)
    pairs, so ``n + 2`` samples in all. Without them a set where the two never disagree would give a
    bound of exactly 0 at any ``n`` (sd = 0: certainty from 20 samples as from 20,000); with them such
    a set gives ``-z / (n + 2)``, a margin that shrinks with the set's size (at 2,500 samples and
    ``confidence=0.95``: -0.066 points, so a smaller tolerance leaves only the largest size).
    """
    confidence = validate_confidence(confidence)
    if confidence is None:
        raise ValueError("paired_lower_bound needs a confidence in (0, 1), got None")
    correct, reference = correct.bool(), reference.bool().to(correct.device)
    n = correct.shape[-1]
    if reference.shape != (n,):
        raise ValueError(f"reference must be [N={n}], got {tuple(reference.shape)}")
    wins = (correct & ~reference).sum(-1).double() + 0.5  # right where the reference is wrong
    losses = (~correct & reference).sum(-1).double() + 0.5
    total = n + 2.0
    p_win, p_loss = wins / total, losses / total
    mean = p_win - p_loss
    var = (p_win + p_loss - mean**2) / total  # the variance of d (mean of d^2 minus mean^2), over n + 2
    return mean - NormalDist().inv_cdf(confidence) * var.sqrt()


def fit_tolerance(
    conf: torch.Tensor,
    preds: torch.Tensor,
    labels: torch.Tensor,
    dims: Sequence[int],
    tolerance: float = 0.005,
    confidence: float | None = None,
    **family_kw,
) -> torch.Tensor:
    """The cascade with the fewest expected dims whose accuracy on the given data is at least the
    largest size's accuracy minus ``tolerance`` (a fraction: 0.005 = half a point).

    ``confidence=None``: the accuracies on the given data are compared as they are, so the chosen
    cascade sits at the edge of the tolerance there, and new data (a test set) will often see it
    lose more. ``confidence`` (e.g. 0.95): a cascade qualifies only when the lower confidence bound
    of :func:`paired_lower_bound` on (cascade accuracy - largest size's accuracy), from the per-sample
    differences on the given data, is at least ``-tolerance``: a margin for the calibration set's
    sampling error that shrinks as it grows (about ``z * sqrt(disagreement rate / n)``). When no cascade
    qualifies (a tolerance below what ``n`` samples can vouch for), the largest size alone (thresholds 1).
    """
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance}")
    confidence = validate_confidence(confidence)
    fam, acc, cost, correct = scored_family(conf, preds, labels, dims, **family_kw)
    if confidence is None:
        target = float(correct[-1].double().mean()) - tolerance
        ok = torch.nonzero(acc >= target - 1e-12).flatten()
    else:
        right = correct.gather(0, exit_index(conf.float().cpu(), fam))  # [K, N]: each cascade's answers
        ok = torch.nonzero(paired_lower_bound(right, correct[-1], confidence) >= -tolerance - 1e-12).flatten()
    if not len(ok):  # without confidence unreachable in practice: "always the largest" meets any tolerance
        return torch.ones(len(dims) - 1)
    return fam[ok[cost[ok].argmin()]]


def fit_budget(
    conf: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor, dims: Sequence[int], budget: float, **family_kw
) -> torch.Tensor:
    """The most accurate cascade whose expected dims on the given data stay within ``budget``."""
    if not math.isfinite(budget) or budget < min(dims):
        raise ValueError(f"budget must be at least the smallest size {min(dims)}, got {budget}")
    fam, acc, cost, correct = scored_family(conf, preds, labels, dims, **family_kw)
    ok = torch.nonzero(cost <= budget + 1e-9).flatten()
    if not len(ok):
        return torch.zeros(len(dims) - 1)  # everything exits at the smallest size
    best = torch.nonzero(acc[ok] >= acc[ok].max() - 1e-12).flatten()
    return fam[ok[best[cost[ok][best].argmin()]]]


def fit_thresholds(
    conf: torch.Tensor,
    preds: torch.Tensor,
    labels: torch.Tensor,
    dims: Sequence[int],
    method: str = "tolerance",
    tolerance: float = 0.005,
    budget: float | None = None,
    confidence: float | None = None,
    **family_kw,
) -> torch.Tensor:
    """Dispatch to ``fit_pairwise``, ``fit_tolerance`` or ``fit_budget`` by name (``confidence``: see
    :func:`fit_tolerance`; the other methods do not take it)."""
    if confidence is not None and method != "tolerance":
        raise ValueError(f"confidence={confidence!r} applies to method='tolerance' only, not {method!r}")
    if method == "pairwise":
        return fit_pairwise(conf, preds, labels, dims)
    if method == "tolerance":
        return fit_tolerance(conf, preds, labels, dims, tolerance, confidence, **family_kw)
    if method == "budget":
        if budget is None:
            raise ValueError("method='budget' needs a budget (expected dimensions)")
        return fit_budget(conf, preds, labels, dims, budget, **family_kw)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


# ----------------------------------------------------------------------------- inference
def cascade_predict(head, embeddings: Sequence[torch.Tensor], thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the cascade on embeddings: ``head`` is a Matryoshka head (``dims``, ``block_logits``),
    ``embeddings`` one ``[N, d]`` tensor per view (their logits are summed, e.g. image and mirror
    image), ``thresholds [G-1]``. Returns ``(preds [N], exit_size [N])``.

    Size ``g`` is computed only for the samples still undecided; with MRL-E ``block_logits`` adds
    the new block's contribution to the previous size's logits instead of starting over.
    """
    dims = list(head.dims)
    z0 = embeddings[0]
    n, device = z0.shape[0], z0.device
    thr = validate_thresholds(thresholds, len(dims)).to(device)
    preds = torch.empty(n, dtype=torch.long, device=device)
    sizes = torch.empty(n, dtype=torch.long, device=device)
    pending = torch.arange(n, device=device)
    zs = list(embeddings)
    prev: list[torch.Tensor | None] = [None] * len(zs)
    for g, m in enumerate(dims):
        prev = [head.block_logits(z, g, p) for z, p in zip(zs, prev)]
        conf, p = torch.stack(prev).sum(0).float().softmax(-1).max(-1)
        done = conf >= thr[g] if g < len(dims) - 1 else torch.ones_like(conf, dtype=torch.bool)
        preds[pending[done]] = p[done]
        sizes[pending[done]] = m
        keep = ~done
        pending = pending[keep]
        if not len(pending):
            break
        zs = [z[keep] for z in zs]
        prev = [q[keep] for q in prev]
    return preds, sizes


# ----------------------------------------------------------------------------- curves and splits
def tradeoff_curve(
    conf_fit: torch.Tensor,
    preds_fit: torch.Tensor,
    labels_fit: torch.Tensor,
    conf_eval: torch.Tensor,
    preds_eval: torch.Tensor,
    labels_eval: torch.Tensor,
    dims: Sequence[int],
    **family_kw,
) -> list[dict]:
    """The cascade's trade-off: the family fitted on the ``fit`` data, its Pareto front there,
    evaluated on the ``eval`` data, beside each fixed size. Rows:
    ``{"kind": "cascade"|"fixed", "expected_dims", "accuracy", "thresholds"}`` sorted by expected dims."""
    fam, acc, cost, _ = scored_family(conf_fit, preds_fit, labels_fit, dims, **family_kw)
    nest = torch.tensor(list(dims), dtype=torch.float64)
    front = fam[pareto_front(acc, cost)]
    correct_eval = preds_eval.eq(labels_eval.to(preds_eval.device)).cpu()
    acc_e, dims_e = _family_metrics(conf_eval.float().cpu(), correct_eval, nest, front)
    rows = [
        {"kind": "cascade", "expected_dims": float(d), "accuracy": float(a), "thresholds": t.tolist()}
        for d, a, t in zip(dims_e, acc_e, front)
    ]
    rows += [
        {"kind": "fixed", "expected_dims": float(m), "accuracy": float(correct_eval[g].double().mean()), "thresholds": []}
        for g, m in enumerate(dims)
    ]
    return sorted(rows, key=lambda r: (r["kind"], r["expected_dims"]))


def calibration_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of ``range(n)`` into (calibration, evaluation) indices."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"calibration fraction must be in (0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(fraction * n))
    return perm[:k].sort().values, perm[k:].sort().values
