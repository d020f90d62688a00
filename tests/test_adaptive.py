"""Tests of adaptive classification (the confidence cascade): the pure-tensor library
(``mrl_vision.adaptive``), ``MatryoshkaModel.predict_adaptive``, ``AdaptiveClassificationCallback``
and ``mrl-vision predict`` in adaptive mode, on hand-made confidences whose answers are worked out
by hand, on seeded structured data, and on the quickstart digits with timm's tiny ``test_resnet``
(width 96, dims 8..96)."""

from __future__ import annotations

import csv
import itertools
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from conftest import QUICKSTART_CONFIG, TEST_RESNET_DIMS
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from mrl_vision import adaptive as A
from mrl_vision.callbacks import AdaptiveClassificationCallback, PredictionWriter
from mrl_vision.cli import cli
from mrl_vision.data import QuickstartDataModule
from mrl_vision import MatryoshkaClassifier, MatryoshkaModel

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
    pytest.mark.filterwarnings("ignore:.*sync_dist=True.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]

Q = str(QUICKSTART_CONFIG)
NEST = TEST_RESNET_DIMS  # [8, 16, 32, 64, 96]
NEST3 = [8, 16, 32]
BUDGET = 24.0  # the fixture's callback: the most accurate cascade within 24 expected dims (a mix of sizes)


def _preds_from(correct: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """Predictions that are right exactly where ``correct`` says so."""
    return torch.where(correct, labels.expand_as(correct), (labels + 1).expand_as(correct) % num_classes)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ============================================================================= hand-made data
# Data set A: G = 3 (sizes 8, 16, 32), N = 10; every value is exact in binary.
CONF_A = torch.tensor([
    [0.875, 0.5, 0.625, 0.25, 0.75, 0.5, 0.125, 0.9375, 0.375, 0.625],
    [0.25, 0.75, 0.5, 0.875, 0.5, 0.625, 0.75, 0.5, 0.9375, 0.25],
    [0.5] * 10,
])
CORRECT_A = torch.tensor([
    [1, 0, 1, 0, 0, 1, 0, 1, 0, 1],
    [0, 1, 0, 1, 1, 0, 0, 1, 1, 0],
    [1, 1, 1, 1, 1, 0, 1, 1, 1, 1],
], dtype=torch.bool)
LABELS_A = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
PREDS_A = _preds_from(CORRECT_A, LABELS_A)
THR_A = [0.625, 0.75]
# With THR_A: sample 0 exits at size 0 (0.875 >= 0.625), 1 at size 1 (0.5 < 0.625, 0.75 >= 0.75),
# 2 at 0 (a tie exits), 3 at 1, 4 at 0, 5 at 2 (0.5, then 0.625 < 0.75), 6 at 1, 7 at 0, 8 at 1, 9 at 0.
EXIT_A = [0, 1, 0, 1, 0, 2, 1, 0, 1, 0]


def test_confidences_are_max_softmax_and_argmax():
    """confidences() is not the max softmax probability and argmax per size, or accepts non-3-D logits."""
    logits = torch.tensor([[[0.0, math.log(3.0)], [2.0, 0.0]], [[0.0, 0.0], [0.0, 5.0]]])
    conf, preds = A.confidences(logits)
    torch.testing.assert_close(conf, torch.tensor([[0.75, 1 / (1 + math.exp(-2))], [0.5, 1 / (1 + math.exp(-5))]]))
    assert preds.tolist() == [[1, 0], [0, 1]]
    with pytest.raises(ValueError, match=r"\[G, N, C\]"):
        A.confidences(torch.zeros(4, 3))


def test_exit_index_is_first_confident_size():
    """exit_index() does not exit at the first size reaching its threshold (ties exit), else the largest."""
    assert A.exit_index(CONF_A, torch.tensor(THR_A)).tolist() == EXIT_A
    # batched thresholds [K, G-1] give one row per cascade
    thr = torch.tensor([[0.0, 0.0], [1.0, 1.0], THR_A, [1.0, 0.5]])
    out = A.exit_index(CONF_A, thr)
    assert out.shape == (4, 10)
    assert out[0].tolist() == [0] * 10  # threshold 0: everything answers at the smallest size
    assert out[1].tolist() == [2] * 10  # no confidence reaches 1: the largest answers
    assert out[2].tolist() == EXIT_A
    assert out[3].tolist() == [2 if c < 0.5 else 1 for c in CONF_A[1].tolist()]
    # confidence exactly 1.0 with threshold 1.0 exits (>=); an exit never passes the largest size
    conf = torch.tensor([[1.0, 0.99, 0.2], [0.1, 0.2, 1.0]])
    assert A.exit_index(conf, torch.tensor([1.0])).tolist() == [0, 1, 1]


def test_evaluate_cascade_hand_computed():
    """evaluate_cascade()'s accuracy, expected dims, expected head cost or exit fractions are wrong."""
    res = A.evaluate_cascade(CONF_A, PREDS_A, LABELS_A, NEST3, THR_A)
    # exits [0,1,0,1,0,2,1,0,1,0] -> fractions 5/10, 4/10, 1/10; the answering size is right for
    # samples 0,1,2,3,7,8,9 (size 0 wrong for 4, size 2 wrong for 5, size 1 wrong for 6)
    assert res.accuracy == pytest.approx(0.7)
    assert res.exit_fractions == pytest.approx([0.5, 0.4, 0.1])
    assert res.expected_dims == pytest.approx(8 * 0.5 + 16 * 0.4 + 32 * 0.1)  # 13.6
    assert res.expected_head_cost == pytest.approx(8 * 1.0 + 16 * 0.5 + 32 * 0.1)  # 19.2
    assert res.thresholds == THR_A and res.dims == NEST3
    assert res.as_dict()["expected_dims"] == res.expected_dims
    # always the largest / always the smallest
    top = A.evaluate_cascade(CONF_A, PREDS_A, LABELS_A, NEST3, [1.0, 1.0])
    assert (top.accuracy, top.expected_dims, top.expected_head_cost) == pytest.approx((0.9, 32.0, 56.0))
    assert top.exit_fractions == [0.0, 0.0, 1.0]
    low = A.evaluate_cascade(CONF_A, PREDS_A, LABELS_A, NEST3, torch.zeros(2))
    assert (low.accuracy, low.expected_dims, low.expected_head_cost) == pytest.approx((0.5, 8.0, 8.0))


def test_fit_pairwise_hand_computed():
    """fit_pairwise() does not pick, per pair, the accuracy-maximising threshold, smallest on ties."""
    # Pair (0, 1), explicit grid: t=0 -> 5/10, .25 -> 5, .5 -> 7, .75 -> 5, 1 -> 5.
    # Pair (1, 2): t=0 -> 5, .25 -> 5, .5 -> 7, .75 -> 8, 1 -> 9.
    grid = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    assert A.fit_pairwise(CONF_A, PREDS_A, LABELS_A, NEST3, grid=grid).tolist() == [0.5, 1.0]
    # Default grid 0.00..1.00: pair (0, 1) reaches 7/10 for every t in (0.375, 0.625], so 0.38;
    # pair (1, 2) reaches 9/10 for every t in (0.75, 1], so 0.76.
    torch.testing.assert_close(A.fit_pairwise(CONF_A, PREDS_A, LABELS_A, NEST3), torch.tensor([0.38, 0.76]))
    # ties: thresholds 0.4 .. 1.0 all give 3/3; the smallest wins
    conf = torch.tensor([[0.9, 0.8, 0.3], [0.5, 0.5, 0.5]])
    correct = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    labels = torch.tensor([0, 1, 2])
    grid = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert A.fit_pairwise(conf, _preds_from(correct, labels), labels, [4, 8], grid=grid).tolist() == [pytest.approx(0.4)]
    # the pairwise method through fit_thresholds
    torch.testing.assert_close(
        A.fit_thresholds(CONF_A, PREDS_A, LABELS_A, NEST3, method="pairwise"), torch.tensor([0.38, 0.76])
    )


# Data set B (N = 20, sizes 8, 16, 32): 12 "easy" samples right at every size and confident at size 0
# (conf 0.80 .. 0.91); 5 "medium" right from size 16 on, unconfident at size 0 (0.1), confident at
# size 1 (0.9); 3 "hard" right only at size 32, conf 0.3 at sizes 0 and 1. The smallest size is
# right exactly when it is confident (>= 0.8).
#   - 100% accuracy (the largest size's): easy at 8, medium at 16, hard at 32 -> (12*8 + 5*16 + 3*32)/20 = 13.6
#   - >= 84%: easy and hard at 8 (3 wrong), medium at 16 -> (15*8 + 5*16)/20 = 10.0 (hard at 16: 11.2)
#   - everything at 8: 60%, 8 dims.
def _data_b() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    easy, med, hard = 12, 5, 3
    conf0 = torch.cat([0.80 + 0.01 * torch.arange(easy), torch.full((med,), 0.1), torch.full((hard,), 0.3)])
    conf1 = torch.cat([torch.full((easy,), 0.5), torch.full((med,), 0.9), torch.full((hard,), 0.3)])
    conf = torch.stack([conf0, conf1, torch.full((20,), 0.5)])
    correct = torch.stack([
        torch.tensor([1] * easy + [0] * med + [0] * hard),
        torch.tensor([1] * easy + [1] * med + [0] * hard),
        torch.ones(20, dtype=torch.long),
    ]).bool()
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))  # the order must not matter
    labels = torch.arange(20) % 7
    return conf[:, perm], _preds_from(correct[:, perm], labels), labels


def _brute_force(conf: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and expected dims of every distinct cascade (thresholds at each confidence value, 0 and 1)."""
    per_size = [sorted({0.0, 1.0, *conf[g].tolist()}) for g in range(conf.shape[0] - 1)]
    thr = torch.tensor(list(itertools.product(*per_size)))
    ex = A.exit_index(conf, thr)
    correct = preds.eq(labels)
    return correct.gather(0, ex).double().mean(1), torch.tensor(dims, dtype=torch.float64)[ex].mean(1)


def test_data_b_hand_answers_are_the_true_optima():
    """The hand-worked optima of data set B are wrong (checked by brute force over all cascades)."""
    conf, preds, labels = _data_b()
    acc, dims = _brute_force(conf, preds, labels, NEST3)
    assert float(dims[acc >= 1.0 - 1e-12].min()) == pytest.approx(13.6)
    assert float(dims[acc >= 0.84 - 1e-12].min()) == pytest.approx(10.0)
    assert float(acc[dims <= 10.0 + 1e-9].max()) == pytest.approx(0.85)
    assert float(acc[dims <= 9.5].max()) == pytest.approx(0.6)


@pytest.mark.parametrize("tolerance, acc, dims", [(0.0, 1.0, 13.6), (0.16, 0.85, 10.0), (0.5, 0.6, 8.0)])
def test_fit_tolerance_hand_computed(tolerance, acc, dims):
    """fit_tolerance() does not return the cheapest cascade within the tolerance on the given data."""
    conf, preds, labels = _data_b()
    thr = A.fit_tolerance(conf, preds, labels, NEST3, tolerance=tolerance)
    assert thr.shape == (2,)
    res = A.evaluate_cascade(conf, preds, labels, NEST3, thr)
    assert res.accuracy == pytest.approx(acc) and res.expected_dims == pytest.approx(dims)
    via = A.fit_thresholds(conf, preds, labels, NEST3, method="tolerance", tolerance=tolerance)
    torch.testing.assert_close(via, thr)


@pytest.mark.parametrize(
    "budget, acc, dims",
    [(8.0, 0.6, 8.0), (9.5, 0.6, 8.0), (10.0, 0.85, 10.0), (12.0, 0.85, 10.0), (13.6, 1.0, 13.6), (1000.0, 1.0, 13.6)],
)
def test_fit_budget_hand_computed(budget, acc, dims):
    """fit_budget() does not return the most accurate (then cheapest) cascade within the budget."""
    conf, preds, labels = _data_b()
    thr = A.fit_budget(conf, preds, labels, NEST3, budget)
    res = A.evaluate_cascade(conf, preds, labels, NEST3, thr)
    assert res.expected_dims <= budget + 1e-9
    assert res.accuracy == pytest.approx(acc) and res.expected_dims == pytest.approx(dims)
    torch.testing.assert_close(A.fit_thresholds(conf, preds, labels, NEST3, method="budget", budget=budget), thr)


def test_fit_budget_and_tolerance_reject_bad_values():
    """A budget below the smallest size, or a negative / non-finite tolerance, does not fail clearly."""
    conf, preds, labels = _data_b()
    for budget in (7.99, 0.0, float("nan"), float("inf") * -1):
        with pytest.raises(ValueError, match="budget must be at least the smallest size 8"):
            A.fit_budget(conf, preds, labels, NEST3, budget)
    for tol in (-0.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tolerance must be finite and >= 0"):
            A.fit_tolerance(conf, preds, labels, NEST3, tolerance=tol)



# Data set C (sizes 8, 64): 140 "easy" samples right at both sizes and confident at size 0 (0.9), and
# 60 "mid" samples unconfident at size 0 (0.5), where the two sizes disagree. On the calibration set the
# small size is lucky there (right on 27 of them, the large one on 30: 1.5 points overall, within a
# 2-point tolerance); on the "test" set drawn the same way it is right on 27 against 39 (6 points).
def _data_c(wins: int, losses: int, both_right: int, both_wrong: int, easy: int = 140):
    mid = wins + losses + both_right + both_wrong
    n = easy + mid
    conf = torch.stack([torch.cat([torch.full((easy,), 0.9), torch.full((mid,), 0.5)]), torch.full((n,), 0.5)])
    small = torch.tensor([1] * easy + [1] * wins + [0] * losses + [1] * both_right + [0] * both_wrong).bool()
    large = torch.tensor([1] * easy + [0] * wins + [1] * losses + [1] * both_right + [0] * both_wrong).bool()
    labels = torch.arange(n) % 7
    return conf, _preds_from(torch.stack([small, large]), labels), labels


def test_confidence_margin_picks_the_safer_cascade():
    """With confidence, fit_tolerance still takes a cascade that meets the tolerance on calibration only by
    luck (and loses 6 points on new data), or no longer takes the one that holds there."""
    cal, test = _data_c(12, 15, 15, 18), _data_c(8, 20, 19, 13)
    dims, tol = [8, 64], 0.02
    plain = A.fit_tolerance(*cal, dims, tol)
    safe = A.fit_tolerance(*cal, dims, tol, confidence=0.95)
    res_plain, res_safe = A.evaluate_cascade(*cal, dims, plain), A.evaluate_cascade(*cal, dims, safe)
    assert res_plain.expected_dims == pytest.approx(8.0) and res_plain.accuracy == pytest.approx(0.835)
    # easy samples at 8, mid ones at 64: (140 * 8 + 60 * 64) / 200, and the largest size's accuracy
    assert res_safe.expected_dims == pytest.approx(24.8) and res_safe.accuracy == pytest.approx(0.85)
    largest_test = float(test[1][-1].eq(test[2]).double().mean())
    assert largest_test - A.evaluate_cascade(*test, dims, plain).accuracy == pytest.approx(0.06)  # 3x the tolerance
    assert A.evaluate_cascade(*test, dims, safe).accuracy >= largest_test - tol
    # the bounds behind it: the all-small cascade's (wins 12, losses 15 of 200) and the safe one's (none)
    z = 1.6448536269514722
    p_win, p_loss = 12.5 / 202, 15.5 / 202
    hand = (p_win - p_loss) - z * math.sqrt((p_win + p_loss - (p_win - p_loss) ** 2) / 202)
    small, large = cal[1].eq(cal[2])
    assert float(A.paired_lower_bound(small, large, 0.95)) == pytest.approx(hand, rel=1e-9)
    assert hand < -tol
    assert float(A.paired_lower_bound(large, large, 0.95)) == pytest.approx(-z / 202, rel=1e-9)
    via = A.fit_thresholds(*cal, dims, method="tolerance", tolerance=tol, confidence=0.95)
    torch.testing.assert_close(via, safe)


def test_paired_lower_bound_shrinks_with_n():
    """The margin does not shrink as the calibration set grows, or the bound is not mean - z sd / sqrt(n)
    on the sample plus Agresti-Min's pseudo-counts (computed here as a weighted sample)."""
    right = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0]).bool()  # d = +1, 0, -1, 0, 0, 0, +1, -1 against ref
    ref = torch.tensor([0, 1, 1, 1, 0, 1, 0, 1]).bool()
    z = 1.2815515655446004  # the normal quantile of 0.9
    margins, bounds = [], []
    for r in (1, 4, 16, 64, 256):
        a, b = right.repeat(r), ref.repeat(r)
        bound = float(A.paired_lower_bound(a, b, 0.9))
        d = torch.cat([a.double() - b.double(), torch.tensor([1.0, -1.0, 0.0])])
        w = torch.cat([torch.ones(a.numel(), dtype=torch.float64), torch.tensor([0.5, 0.5, 1.0])])
        mean = float((w * d).sum() / w.sum())
        sd = math.sqrt(float((w * (d - mean) ** 2).sum() / w.sum()))
        assert bound == pytest.approx(mean - z * sd / math.sqrt(float(w.sum())), rel=1e-9, abs=1e-12), r
        margins.append(float(a.double().mean() - b.double().mean()) - bound)
        bounds.append(bound)
    assert margins == sorted(margins, reverse=True) and margins[-1] < margins[0] / 10
    assert bounds == sorted(bounds) and bounds[-1] == pytest.approx(0.0, abs=0.05)  # the true difference is 0
    # many cascades at once: [K, N] -> [K]
    both = A.paired_lower_bound(torch.stack([right, ref]), ref, 0.9)
    assert both.shape == (2,) and float(both[0]) == pytest.approx(bounds[0]) and float(both[1]) == pytest.approx(-z / 10)


def test_confidence_none_is_todays_choice():
    """confidence=None (the default) no longer picks the cheapest family member whose plain accuracy is
    within the tolerance, or a margin gives a cheaper cascade than none."""
    conf, preds, labels, dims = _structured(n=200, dims=(8, 32, 96))
    kw = {"lambdas": [0.0, 0.01, 0.1, 1.0]}  # a small family keeps this quick; the choice rule is what is tested
    fam, acc, cost, correct = A.scored_family(conf, preds, labels, dims, **kw)
    largest, tol = float(correct[-1].double().mean()), 0.03
    ok = torch.nonzero(acc >= largest - tol - 1e-12).flatten()
    expected = fam[ok[cost[ok].argmin()]]
    plain = A.fit_tolerance(conf, preds, labels, dims, tol, **kw)
    torch.testing.assert_close(plain, expected)
    torch.testing.assert_close(A.fit_tolerance(conf, preds, labels, dims, tol, confidence=None, **kw), expected)
    safe = A.fit_tolerance(conf, preds, labels, dims, tol, confidence=0.95, **kw)
    res_plain, res_safe = (A.evaluate_cascade(conf, preds, labels, dims, t) for t in (plain, safe))
    assert res_safe.expected_dims >= res_plain.expected_dims - 1e-9 and res_safe.accuracy >= largest - tol - 1e-12


def test_bad_confidence_fails_naming_it():
    """A confidence outside (0, 1), or one given to a method that does not use it, is accepted."""
    conf, preds, labels = _data_b()
    for bad in (0.0, 1.0, -0.5, 1.5, 95, float("nan"), True, "0.95"):
        with pytest.raises(ValueError, match=rf"confidence must be a number in \(0, 1\).*confidence={bad!r}"):
            A.fit_tolerance(conf, preds, labels, NEST3, 0.01, confidence=bad)
        with pytest.raises(ValueError, match=rf"confidence={bad!r}"):
            AdaptiveClassificationCallback(confidence=bad)
    with pytest.raises(ValueError, match=r"confidence=0.9 applies to method='tolerance' only, not 'budget'"):
        A.fit_thresholds(conf, preds, labels, NEST3, method="budget", budget=10.0, confidence=0.9)
    with pytest.raises(ValueError, match=r"confidence=0.9 applies to method='tolerance' only, not 'pairwise'"):
        AdaptiveClassificationCallback(method="pairwise", confidence=0.9)
    with pytest.raises(ValueError, match="needs a confidence"):
        A.paired_lower_bound(torch.ones(3).bool(), torch.ones(3).bool(), None)
    with pytest.raises(ValueError, match=r"reference must be \[N=3\]"):
        A.paired_lower_bound(torch.ones(3).bool(), torch.ones(4).bool(), 0.9)


# ============================================================================= structured random data
def _structured(n: int = 300, dims=tuple(NEST), num_classes: int = 10, seed: int = 0):
    """Seeded logits where larger sizes are more accurate and confidence tracks correctness."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    strength = torch.linspace(1.5, 4.0, len(dims))
    ease = torch.rand(n, generator=gen) + 0.3
    logits = torch.randn(len(dims), n, num_classes, generator=gen)
    logits = logits + (strength[:, None] * ease[None, :])[..., None] * F.one_hot(labels, num_classes)
    conf, preds = A.confidences(logits)
    return conf, preds, labels, list(dims)


def _shared_threshold_cascades(conf, preds, labels, dims):
    """Accuracy and dims of the 101 cascades with one shared threshold (members of every family)."""
    thr = torch.linspace(0, 1, 101).unsqueeze(1).repeat(1, len(dims) - 1)
    ex = A.exit_index(conf, thr)
    return preds.eq(labels).gather(0, ex).double().mean(1), torch.tensor(dims, dtype=torch.float64)[ex].mean(1)


def test_structured_data_is_structured():
    """The seeded test data lost its structure (larger sizes more accurate), so the properties below test little."""
    conf, preds, labels, dims = _structured()
    acc = preds.eq(labels).double().mean(1)
    assert acc[0] < acc[2] < acc[-1] and 0.3 < acc[0] and acc[-1] < 0.95


def test_fit_tolerance_properties():
    """The tolerance method misses its accuracy target, or is costlier than a family member meeting it."""
    conf, preds, labels, dims = _structured()
    largest = float(preds[-1].eq(labels).double().mean())
    sh_acc, sh_dims = _shared_threshold_cascades(conf, preds, labels, dims)
    prev = math.inf
    for tol in (0.0, 0.01, 0.05, 0.2):
        res = A.evaluate_cascade(conf, preds, labels, dims, A.fit_tolerance(conf, preds, labels, dims, tol))
        assert res.accuracy >= largest - tol - 1e-12, tol
        assert res.expected_dims <= float(sh_dims[sh_acc >= largest - tol - 1e-12].min()) + 1e-9, tol
        assert res.expected_dims <= prev + 1e-9
        prev = res.expected_dims
    assert prev < dims[-1]  # some saving at a 20-point tolerance


def test_fit_budget_properties():
    """The budget method exceeds its budget, or is less accurate than a family member within it."""
    conf, preds, labels, dims = _structured()
    sh_acc, sh_dims = _shared_threshold_cascades(conf, preds, labels, dims)
    prev = -math.inf
    for budget in (8, 16, 40, 96):
        res = A.evaluate_cascade(conf, preds, labels, dims, A.fit_budget(conf, preds, labels, dims, budget))
        assert res.expected_dims <= budget + 1e-9
        assert res.accuracy >= float(sh_acc[sh_dims <= budget + 1e-9].max()) - 1e-12
        assert res.accuracy >= prev - 1e-12
        prev = res.accuracy
    assert prev >= float(preds[-1].eq(labels).double().mean()) - 1e-12  # budget = largest size


def test_pareto_front_hand_computed():
    """pareto_front() keeps a dominated point, drops a non-dominated one, or is not sorted by dims."""
    acc = torch.tensor([0.5, 0.7, 0.6, 0.7, 0.9, 0.8, 0.4])
    dims = torch.tensor([10.0, 20.0, 15.0, 25.0, 30.0, 20.0, 8.0])
    # by dims: (8,.4) (10,.5) (15,.6) (20,.8) (20,.7) (25,.7) (30,.9): keep 6, 0, 2, 5, 4
    assert A.pareto_front(acc, dims).tolist() == [6, 0, 2, 5, 4]


def test_tradeoff_curve_is_the_families_pareto_front():
    """tradeoff_curve()'s cascade rows are not the family's sorted Pareto front, or its fixed rows are wrong."""
    conf, preds, labels, dims = _structured(seed=3)
    rows = A.tradeoff_curve(conf, preds, labels, conf, preds, labels, dims)
    casc = [r for r in rows if r["kind"] == "cascade"]
    fixed = [r for r in rows if r["kind"] == "fixed"]
    assert rows == casc + fixed and len(casc) >= 3
    costs = [r["expected_dims"] for r in casc]
    accs = [r["accuracy"] for r in casc]
    assert costs == sorted(costs) and all(b > a for a, b in zip(accs, accs[1:]))  # strictly better when costlier
    fam = A.cascade_family(conf, preds, labels, dims)
    ex = A.exit_index(conf, fam)
    f_acc = preds.eq(labels).gather(0, ex).double().mean(1)
    f_dims = torch.tensor(dims, dtype=torch.float64)[ex].mean(1)
    for r in casc:
        res = A.evaluate_cascade(conf, preds, labels, dims, r["thresholds"])
        assert (res.accuracy, res.expected_dims) == pytest.approx((r["accuracy"], r["expected_dims"]))
        assert not bool(((f_dims <= r["expected_dims"] + 1e-9) & (f_acc > r["accuracy"] + 1e-9)).any())
    for a, d in zip(f_acc.tolist(), f_dims.tolist()):  # every family member is weakly dominated by the front
        assert any(r["expected_dims"] <= d + 1e-9 and r["accuracy"] >= a - 1e-9 for r in casc)
    assert [r["expected_dims"] for r in fixed] == [float(m) for m in dims]
    assert [r["accuracy"] for r in fixed] == pytest.approx(preds.eq(labels).double().mean(1).tolist())
    assert all(r["thresholds"] == [] for r in fixed)


# ============================================================================= invalid inputs
@pytest.mark.parametrize(
    "thresholds, match",
    [
        ([0.5], r"one threshold per size but the last \(2\), got 1"),
        ([0.5, 0.5, 0.5], r"one threshold per size but the last \(2\), got 3"),
        ([0.5, float("nan")], r"got nan at position 1"),
        ([float("inf"), 0.5], r"got inf at position 0"),
        ([-0.1, 0.5], r"got -0\.1\d* at position 0"),
        ([0.5, 1.5], r"got 1\.5 at position 1"),
    ],
)
def test_invalid_thresholds_fail_clearly(thresholds, match):
    """A wrong count or a threshold that is NaN, infinite or outside [0, 1] is not a ValueError naming it."""
    with pytest.raises(ValueError, match=match):
        A.validate_thresholds(thresholds, 3)
    with pytest.raises(ValueError, match=match):
        A.evaluate_cascade(CONF_A, PREDS_A, LABELS_A, NEST3, thresholds)
    with pytest.raises(ValueError, match=match):
        A.validate_thresholds(torch.tensor(thresholds), 3)


def test_valid_thresholds_accepted():
    """Valid thresholds (the ends 0 and 1 included, list or tensor) are rejected or altered."""
    t = A.validate_thresholds([0, 1.0], 3)
    assert t.dtype == torch.float32 and t.tolist() == [0.0, 1.0]
    assert A.validate_thresholds(torch.tensor([[0.25, 0.5]], dtype=torch.float64), 3).tolist() == [0.25, 0.5]
    assert A.validate_thresholds([], 1).numel() == 0


def test_fit_thresholds_bad_method_or_missing_budget():
    """An unknown method, or the budget method without a budget, does not fail clearly."""
    conf, preds, labels = _data_b()
    with pytest.raises(ValueError, match=r"unknown method 'fastest'; choose one of \('pairwise', 'tolerance', 'budget'\)"):
        A.fit_thresholds(conf, preds, labels, NEST3, method="fastest")
    with pytest.raises(ValueError, match=r"method='budget' needs a budget"):
        A.fit_thresholds(conf, preds, labels, NEST3, method="budget")


def test_fitting_rejects_inconsistent_inputs():
    """Mismatched shapes, one size or an empty calibration set reach the fitting code."""
    conf, preds, labels = _data_b()
    for fit in (A.fit_pairwise, A.cascade_family):
        with pytest.raises(ValueError, match="conf and preds must both be"):
            fit(conf, preds[:, :5], labels, NEST3)
        with pytest.raises(ValueError, match=r"labels must be \[N=20\]"):
            fit(conf, preds, labels[:5], NEST3)
        with pytest.raises(ValueError, match="dims has 2 sizes but conf has 3"):
            fit(conf, preds, labels, [8, 16])
        with pytest.raises(ValueError, match="a cascade needs at least two sizes"):
            fit(conf[:1], preds[:1], labels, [8])
        with pytest.raises(ValueError, match="empty calibration set"):
            fit(conf[:, :0], preds[:, :0], labels[:0], NEST3)


def test_calibration_split():
    """calibration_split() is not seeded, disjoint and covering, or accepts a fraction of 0 or 1."""
    cal, rest = A.calibration_split(100, 0.3, seed=7)
    assert len(cal) == 30 and len(rest) == 70
    assert cal.tolist() == sorted(cal.tolist()) and rest.tolist() == sorted(rest.tolist())
    assert sorted(cal.tolist() + rest.tolist()) == list(range(100))
    again = A.calibration_split(100, 0.3, seed=7)
    assert torch.equal(again[0], cal) and torch.equal(again[1], rest)
    assert not torch.equal(A.calibration_split(100, 0.3, seed=8)[0], cal)
    assert len(A.calibration_split(7, 0.5, seed=0)[0]) == 4  # round(3.5) -> 4
    for frac in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"calibration fraction must be in \(0, 1\)"):
            A.calibration_split(10, frac, seed=0)


def test_callback_rejects_bad_arguments():
    """AdaptiveClassificationCallback accepts a bad method, missing budget, fraction 0/1 or negative tolerance."""
    with pytest.raises(ValueError, match="unknown method"):
        AdaptiveClassificationCallback(method="fastest")
    with pytest.raises(ValueError, match="needs budget"):
        AdaptiveClassificationCallback(method="budget")
    for frac in (0.0, 1.0):
        with pytest.raises(ValueError, match="calibration_fraction"):
            AdaptiveClassificationCallback(calibration_fraction=frac)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        AdaptiveClassificationCallback(tolerance=-0.1)


# ============================================================================= predict_adaptive
def _untrained(head: str = "mrl", eval_flip_tta: bool = False, adaptive_predict: bool = False) -> MatryoshkaClassifier:
    torch.manual_seed(0)
    return MatryoshkaClassifier(
        num_classes=10, backbone="test_resnet", head=head, eval_flip_tta=eval_flip_tta,
        adaptive_predict=adaptive_predict,
    ).eval()


def _images(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _gap_thresholds(conf: torch.Tensor) -> torch.Tensor:
    """Per size (but the last), the midpoint of the widest gap between consecutive sorted confidences
    in the middle half: about half the samples are confident, and no confidence sits near a threshold."""
    out = []
    n = conf.shape[1]
    for g in range(conf.shape[0] - 1):
        c = conf[g].sort().values
        lo, hi = n // 4, 3 * n // 4
        gaps = c[lo + 1 : hi + 1] - c[lo:hi]
        i = lo + int(gaps.argmax())
        out.append(float(c[i] + c[i + 1]) / 2)
    return torch.tensor(out)


def _reference_cascade(model: MatryoshkaClassifier, x: torch.Tensor, thr: torch.Tensor):
    """The cascade's answer selected from the full per-size evaluation logits (the task's, with its
    ``eval_flip_tta``)."""
    with torch.no_grad():
        conf, preds = A.confidences(model.eval_logits(x))
    ex = A.exit_index(conf, thr)
    return preds.gather(0, ex[None])[0], torch.tensor(model.model.dims)[ex], ex, conf


@pytest.mark.parametrize("eval_flip_tta", [False, True], ids=["plain", "flip_tta"])
@pytest.mark.parametrize("head", ["mrl", "mrl_e"])
def test_predict_adaptive_equals_selecting_from_full_logits(head, eval_flip_tta, monkeypatch):
    """predict_adaptive() (with flip_tta: of the image and its mirror image) differs from selecting from
    the full per-size evaluation logits, or evaluates decided images."""
    task, x = _untrained(head, eval_flip_tta), _images()
    model = task.model
    with torch.no_grad():
        conf, _ = A.confidences(task.eval_logits(x))
    thr = _gap_thresholds(conf)
    assert float((conf[:-1] - thr[:, None]).abs().min()) > 1e-5  # no decision rests on rounding
    ref_preds, ref_sizes, ex, _ = _reference_cascade(task, x, thr)
    assert len(ex.unique()) >= 3  # a real mix of exit sizes

    calls: list[tuple[int, int, bool]] = []
    original = model.head.block_logits

    def spy(z, g, previous):
        calls.append((g, z.shape[0], previous is None))
        return original(z, g, previous)

    monkeypatch.setattr(model.head, "block_logits", spy)
    with torch.no_grad():
        preds, sizes = model.predict_adaptive(x, thresholds=thr, flip_tta=eval_flip_tta)
        model.adaptive_thresholds.copy_(thr)  # the fitted buffer is the default
        preds_buf, sizes_buf = model.predict_adaptive(x, flip_tta=eval_flip_tta)
    assert preds.tolist() == ref_preds.tolist()
    assert sizes.tolist() == ref_sizes.tolist()
    assert preds_buf.tolist() == ref_preds.tolist() and sizes_buf.tolist() == ref_sizes.tolist()
    # size g is evaluated for exactly the images still undecided, once per view; from g = 1 on the
    # previous size's logits are passed along (MRL-E adds the new block to them)
    views = 2 if eval_flip_tta else 1
    expected = [(g, int((ex >= g).sum()), g == 0) for g in range(len(NEST)) if int((ex >= g).sum())]
    expected = [c for c in expected for _ in range(views)]
    assert calls == expected * 2


@pytest.mark.parametrize("head", ["mrl", "mrl_e"])
def test_predict_adaptive_extreme_thresholds(head, monkeypatch):
    """Thresholds 0 do not stop at the smallest size alone, or thresholds 1 do not reach the largest."""
    model, x = _untrained(head).model, _images(12)
    with torch.no_grad():
        logits = model.eval_logits(x)
    assert float(logits.softmax(-1).amax()) < 0.999
    calls: list[tuple[int, int]] = []
    original = model.head.block_logits
    monkeypatch.setattr(model.head, "block_logits", lambda z, g, p: calls.append((g, z.shape[0])) or original(z, g, p))
    with torch.no_grad():
        preds, sizes = model.predict_adaptive(x, thresholds=[0.0] * 4)
    assert sizes.tolist() == [8] * 12 and preds.tolist() == logits[0].argmax(-1).tolist()
    assert calls == [(0, 12)]
    calls.clear()
    with torch.no_grad():
        preds, sizes = model.predict_adaptive(x, thresholds=torch.ones(4))
    assert sizes.tolist() == [96] * 12 and preds.tolist() == logits[-1].argmax(-1).tolist()
    assert calls == [(g, 12) for g in range(5)]


def test_predict_adaptive_without_thresholds_fails_clearly():
    """predict_adaptive() without fitted thresholds does not name the callback, or takes a wrong count."""
    model, x = _untrained().model, _images(4)
    assert bool(torch.isnan(model.adaptive_thresholds).all()) and model.adaptive_thresholds.shape == (4,)
    with pytest.raises(ValueError, match="AdaptiveClassificationCallback"):
        model.predict_adaptive(x)
    with pytest.raises(ValueError, match=r"one threshold per size but the last \(4\), got 2"):
        model.predict_adaptive(x, thresholds=[0.5, 0.5])


def test_predict_adaptive_fixed_feature_head():
    """A one-size (FF) model's cascade is not simply its only size."""
    torch.manual_seed(0)
    model, x = MatryoshkaClassifier(num_classes=10, backbone="test_resnet", head="ff").model.eval(), _images(5)
    assert model.adaptive_thresholds.shape == (0,)
    with torch.no_grad():
        preds, sizes = model.predict_adaptive(x)
        assert preds.tolist() == model.predict(x).tolist()
    assert sizes.tolist() == [96] * 5


@pytest.mark.parametrize("eval_flip_tta", [False, True], ids=["plain", "flip_tta"])
def test_prediction_writer_adaptive_columns(tmp_path, eval_flip_tta):
    """Adaptive predict does not write index,target,adaptive_pred,adaptive_dims equal to predict_adaptive()
    (with the task's eval_flip_tta)."""
    model, x = _untrained(eval_flip_tta=eval_flip_tta, adaptive_predict=True), _images(20, seed=5)
    y = torch.arange(20) % 10
    with torch.no_grad():
        conf, _ = A.confidences(model.eval_logits(x))
        model.model.adaptive_thresholds.copy_(_gap_thresholds(conf))
        ref_preds, ref_sizes = model.model.predict_adaptive(x, flip_tta=eval_flip_tta)
    writer = PredictionWriter(output_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.predict(model, DataLoader(TensorDataset(x, y), batch_size=8), return_predictions=False)
    rows = _read_csv(tmp_path / "predictions.csv")
    assert list(rows[0]) == ["index", "target", "adaptive_pred", "adaptive_dims"]  # no class names: no name columns
    assert [int(r["index"]) for r in rows] == list(range(20))
    assert [int(r["target"]) for r in rows] == y.tolist()
    assert [int(r["adaptive_pred"]) for r in rows] == ref_preds.tolist()
    assert [int(r["adaptive_dims"]) for r in rows] == ref_sizes.tolist()


# ============================================================================= the callback, end to end
@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> SimpleNamespace:
    """A short real fit on the quickstart digits (30 train batches of 64: about 60% top-1, so the
    confidences mean something; 4 val batches of 64) with the callback (budget method) and a last.ckpt."""
    work = tmp_path_factory.mktemp("adaptive_fit")
    L.seed_everything(0)
    dm = QuickstartDataModule(batch_size=64)
    model = MatryoshkaClassifier(num_classes=10, backbone="test_resnet")
    cb = AdaptiveClassificationCallback(method="budget", budget=BUDGET)
    ckpt_cb = ModelCheckpoint(save_last=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=30, limit_val_batches=4,
        logger=CSVLogger(str(work), name="adaptive"), callbacks=[ckpt_cb, cb], default_root_dir=str(work),
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    return SimpleNamespace(
        trainer=trainer, model=model, cb=cb, dm=dm, ckpt=Path(ckpt_cb.last_model_path).resolve(),
        log_dir=Path(trainer.log_dir), metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
    )


def _eval_outputs(model: MatryoshkaClassifier, loader, batches: int):
    """Confidences, predictions and labels of the first ``batches`` batches, computed here."""
    model.eval()
    confs, preds, labels = [], [], []
    with torch.no_grad():
        for (x, y), _ in zip(loader, range(batches)):
            c, p = A.confidences(model.eval_logits(x))
            confs.append(c), preds.append(p), labels.append(y)
    return torch.cat(confs, 1), torch.cat(preds, 1), torch.cat(labels)


def test_callback_logs_and_matches_independent_evaluation(fitted):
    """The callback's adaptive/* metrics are missing or not fitted on the calibration half, scored on the rest."""
    cb, m = fitted.cb, fitted.metrics
    for key in ("adaptive/top1", "adaptive/expected_dims", "adaptive/expected_head_cost"):
        assert key in m, sorted(m)
    assert cb.thresholds is not None and len(cb.thresholds) == 4
    assert all(0.0 <= t <= 1.0 for t in cb.thresholds)
    assert fitted.model.model.adaptive_thresholds.tolist() == cb.thresholds
    assert 8.0 <= m["adaptive/expected_dims"] <= m["adaptive/expected_head_cost"] <= sum(NEST)
    assert sum(f > 0 for f in cb.result["exit_fractions"]) >= 2  # a real cascade: several sizes answer
    # independent recomputation: the 4 validation batches in their (deterministic) order
    conf, preds, labels = _eval_outputs(fitted.model, fitted.dm.val_dataloader(), 4)
    assert labels.numel() == 256
    cal, rest = A.calibration_split(256, 0.5, seed=0)
    refit = A.fit_thresholds(conf[:, cal], preds[:, cal], labels[cal], NEST, method="budget", budget=BUDGET)
    torch.testing.assert_close(torch.tensor(cb.thresholds), refit, rtol=0, atol=1e-6)
    res = A.evaluate_cascade(conf[:, rest], preds[:, rest], labels[rest], NEST, cb.thresholds)
    assert cb.result["accuracy"] == pytest.approx(res.accuracy, abs=1e-9)
    assert cb.result["expected_dims"] == pytest.approx(res.expected_dims, abs=1e-9)
    assert m["adaptive/top1"] == pytest.approx(res.accuracy, rel=1e-6)
    assert m["adaptive/expected_dims"] == pytest.approx(res.expected_dims, rel=1e-6)
    assert m["adaptive/expected_head_cost"] == pytest.approx(res.expected_head_cost, rel=1e-6)
    # validation figures side by side: the cascade and the largest size on each half
    res_cal = A.evaluate_cascade(conf[:, cal], preds[:, cal], labels[cal], NEST, cb.thresholds)
    assert m["adaptive/calibration_top1"] == pytest.approx(res_cal.accuracy, rel=1e-6)
    assert m["adaptive/calibration_largest_top1"] == pytest.approx(float(preds[-1, cal].eq(labels[cal]).double().mean()), rel=1e-6)
    assert m["adaptive/largest_top1"] == pytest.approx(float(preds[-1, rest].eq(labels[rest]).double().mean()), rel=1e-6)
    # the budget is met on the calibration half it was fitted on
    assert A.evaluate_cascade(conf[:, cal], preds[:, cal], labels[cal], NEST, cb.thresholds).expected_dims <= BUDGET + 1e-9
    # the fixed-size rows of the curve are the evaluation half's per-size accuracies
    rows = _read_csv(fitted.log_dir / "adaptive_val_curve.csv")
    acc_rest = preds[:, rest].eq(labels[rest]).double().mean(1)
    fixed = [r for r in rows if r["kind"] == "fixed"]
    assert [float(r["top1"]) for r in fixed] == pytest.approx((100 * acc_rest).tolist(), abs=1e-3)


def test_callback_writes_validation_curve(fitted):
    """adaptive_val_curve.csv/.png are missing, or lack a fixed row per size or sorted cascade rows."""
    csv_path, png_path = fitted.log_dir / "adaptive_val_curve.csv", fitted.log_dir / "adaptive_val_curve.png"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert csv_path.read_text().splitlines()[0] == "kind,expected_dims,top1,thresholds"
    rows = _read_csv(csv_path)
    fixed = [r for r in rows if r["kind"] == "fixed"]
    casc = [r for r in rows if r["kind"] == "cascade"]
    assert len(fixed) + len(casc) == len(rows) and casc
    assert [float(r["expected_dims"]) for r in fixed] == [float(m) for m in NEST]
    assert all(r["thresholds"] == "" for r in fixed)
    dims = [float(r["expected_dims"]) for r in casc]
    assert dims == sorted(dims) and all(8.0 <= d <= 96.0 for d in dims)
    for r in casc:
        t = [float(v) for v in r["thresholds"].split(" ")]
        assert len(t) == 4 and all(0.0 <= v <= 1.0 for v in t)
        assert 0.0 <= float(r["top1"]) <= 100.0


def test_thresholds_round_trip_through_checkpoint(fitted):
    """Fitted thresholds are missing from last.ckpt (buffer, callback state) or lost by load_from_checkpoint
    or MatryoshkaModel.from_checkpoint."""
    fitted_thr = fitted.cb.thresholds
    assert not any(math.isnan(t) for t in fitted_thr)
    ckpt = torch.load(fitted.ckpt, map_location="cpu", weights_only=False)
    assert ckpt["state_dict"]["model.adaptive_thresholds"].tolist() == fitted_thr
    state = ckpt["callbacks"]["AdaptiveClassificationCallback"]
    assert state["thresholds"] == fitted_thr and state["method"] == "budget"
    assert state["result"]["thresholds"] == fitted_thr
    loaded = MatryoshkaClassifier.load_from_checkpoint(str(fitted.ckpt), map_location="cpu").eval()
    assert loaded.model.adaptive_thresholds.tolist() == fitted_thr
    network = MatryoshkaModel.from_checkpoint(fitted.ckpt)
    assert not network.training and network.adaptive_thresholds.tolist() == fitted_thr
    x = _images(8)
    with torch.no_grad():
        a = loaded.model.predict_adaptive(x)
        b = loaded.model.predict_adaptive(x, thresholds=fitted_thr)
        c = network.predict_adaptive(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert set(a[1].tolist()) <= set(NEST)


def test_test_evaluates_validation_thresholds_on_whole_test_set(fitted, tmp_path):
    """trainer.test does not score the validation-fitted thresholds on the whole test set, or writes no curve."""
    model = MatryoshkaClassifier(num_classes=10, backbone="test_resnet")  # NaN until the checkpoint loads
    cb = AdaptiveClassificationCallback(method="budget", budget=BUDGET)
    dm = QuickstartDataModule(batch_size=64)
    trainer = L.Trainer(accelerator="cpu", devices=1, limit_test_batches=4, logger=CSVLogger(str(tmp_path), name="t"),
                        callbacks=[cb], enable_progress_bar=False, enable_model_summary=False)
    trainer.test(model, datamodule=dm, ckpt_path=str(fitted.ckpt))
    assert cb.result["thresholds"] == fitted.cb.thresholds and cb.thresholds == fitted.cb.thresholds
    assert model.model.adaptive_thresholds.tolist() == fitted.cb.thresholds
    conf, preds, labels = _eval_outputs(model, dm.test_dataloader(), 4)
    res = A.evaluate_cascade(conf, preds, labels, NEST, fitted.cb.thresholds)  # all 256, no split
    assert cb.result["accuracy"] == pytest.approx(res.accuracy, abs=1e-9)
    assert cb.result["expected_dims"] == pytest.approx(res.expected_dims, abs=1e-9)
    assert cb.result["exit_fractions"] == pytest.approx(res.exit_fractions, abs=1e-9)
    assert float(trainer.callback_metrics["adaptive/top1"]) == pytest.approx(res.accuracy, rel=1e-6)
    largest = float(preds[-1].eq(labels).double().mean())
    assert float(trainer.callback_metrics["adaptive/largest_top1"]) == pytest.approx(largest, rel=1e-6)
    assert "adaptive/calibration_top1" not in trainer.callback_metrics  # nothing fitted at test
    log_dir = Path(trainer.log_dir)
    rows = _read_csv(log_dir / "adaptive_test_curve.csv")
    assert [float(r["expected_dims"]) for r in rows if r["kind"] == "fixed"] == [float(m) for m in NEST]
    assert (log_dir / "adaptive_test_curve.png").is_file()


@pytest.mark.parametrize("confidence", [None, 0.95])
def test_test_without_fitted_thresholds_splits_the_test_set(tmp_path, confidence):
    """trainer.test without fitted thresholds does not fit (with the callback's confidence) on a test
    calibration part and score the rest, or does not log the calibration part's accuracies."""
    L.seed_everything(0)
    model = MatryoshkaClassifier(num_classes=10, backbone="test_resnet")
    cb = AdaptiveClassificationCallback(method="tolerance", tolerance=0.05, seed=3, write_curve=False,
                                        confidence=confidence)
    dm = QuickstartDataModule(batch_size=64)
    trainer = L.Trainer(accelerator="cpu", devices=1, limit_test_batches=2, logger=False, callbacks=[cb],
                        default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False)
    trainer.test(model, datamodule=dm, verbose=False)
    assert model.model.adaptive_thresholds.tolist() == cb.thresholds
    assert not list(tmp_path.rglob("adaptive_*_curve.*"))  # write_curve=False writes no curve
    conf, preds, labels = _eval_outputs(model, dm.test_dataloader(), 2)
    cal, rest = A.calibration_split(128, 0.5, seed=3)
    refit = A.fit_thresholds(conf[:, cal], preds[:, cal], labels[cal], NEST, method="tolerance", tolerance=0.05,
                             confidence=confidence)
    torch.testing.assert_close(torch.tensor(cb.thresholds), refit, rtol=0, atol=1e-6)
    res = A.evaluate_cascade(conf[:, rest], preds[:, rest], labels[rest], NEST, cb.thresholds)
    assert cb.result["accuracy"] == pytest.approx(res.accuracy, abs=1e-9)
    res_cal = A.evaluate_cascade(conf[:, cal], preds[:, cal], labels[cal], NEST, cb.thresholds)
    assert float(trainer.callback_metrics["adaptive/calibration_top1"]) == pytest.approx(res_cal.accuracy, rel=1e-6)


# ============================================================================= the CLI


@pytest.mark.parametrize(
    "saved_flag",
    [pytest.param(False, id="ckpt-from-fit"),
     pytest.param(True, id="ckpt-saved-with-adaptive_predict")],
)
def test_cli_predict_adaptive(fitted, run_dir, saved_flag):
    """`mrl-vision predict --model.adaptive_predict true --ckpt_path` does not write the cascade's class and size."""
    ckpt_path = fitted.ckpt
    if saved_flag:  # the same checkpoint, as if the model had been built with adaptive_predict=True
        ckpt = torch.load(fitted.ckpt, map_location="cpu", weights_only=False)
        assert ckpt["hyper_parameters"]["adaptive_predict"] is False
        ckpt["hyper_parameters"]["adaptive_predict"] = True
        ckpt_path = run_dir / "adaptive.ckpt"
        torch.save(ckpt, ckpt_path)
    c = cli([
        "predict", "--config", Q, "--model.backbone", "test_resnet", "--model.adaptive_predict", "true",
        "--ckpt_path", str(ckpt_path), "--trainer.accelerator", "cpu", "--trainer.limit_predict_batches", "2",
        "--data.init_args.batch_size", "16", "--trainer.enable_progress_bar", "false",
    ])
    assert c.model.model.adaptive_thresholds.tolist() == fitted.cb.thresholds  # the buffer came from the checkpoint
    path = (run_dir / c.trainer.log_dir / "predictions.csv").resolve()
    rows = _read_csv(path)
    assert list(rows[0]) == ["index", "target", "adaptive_pred", "adaptive_dims", "target_class", "adaptive_pred_class"]
    assert len(rows) == 32 and [int(r["index"]) for r in rows] == list(range(32))
    assert {int(r["adaptive_dims"]) for r in rows} <= set(NEST)
    assert len({int(r["adaptive_dims"]) for r in rows}) >= 2
    loaded = MatryoshkaModel.from_checkpoint(fitted.ckpt)
    dm = QuickstartDataModule(batch_size=16)
    dm.setup("predict")
    preds, sizes, targets = [], [], []
    with torch.no_grad():
        for (x, y), _ in zip(dm.predict_dataloader(), range(2)):
            p, s = loaded.predict_adaptive(x)
            preds += p.tolist()
            sizes += s.tolist()
            targets += y.tolist()
    assert [int(r["target"]) for r in rows] == targets
    assert [int(r["adaptive_pred"]) for r in rows] == preds
    assert [int(r["adaptive_dims"]) for r in rows] == sizes


# ============================================================================= DDP


def _validate_run(ckpt: Path, work: Path, devices: int, write_curve: bool, timeout: float) -> Path:
    """`mrl-vision validate` with the callback (budget method) as the only callback; returns the run's log
    directory. With 2 devices through the console module in a subprocess: a run past ``timeout`` is killed
    (its whole process group: both DDP ranks) and the test fails; with 1, the same CLI in this process."""
    work.mkdir(parents=True)
    extra = work / "callbacks.yaml"
    extra.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "mrl_vision.callbacks.AdaptiveClassificationCallback",
         "init_args": {"method": "budget", "budget": BUDGET, "write_curve": write_curve}},
    ]}}))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    args = [
        "validate", "--config", Q, "--config", str(extra),
        "--model.backbone", "test_resnet", "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
        "--trainer.strategy", "ddp" if devices > 1 else "auto", "--ckpt_path", str(ckpt),
        "--data.init_args.batch_size", "32", "--trainer.logger.init_args.save_dir", str(work / "runs"),
        "--trainer.enable_progress_bar", "false",
    ]
    if devices == 1:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(work)
            mp.setattr(sys, "argv", ["mrl-vision"])
            cli(args)
        return work / "runs" / "quickstart" / "version_0"
    cmd = [sys.executable, "-m", "mrl_vision.cli", *args]
    with open(work / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the rank it launched (its own session)
            proc.wait()
            pytest.fail(f"validate with devices={devices} did not finish in {timeout} s:\n"
                        + (work / "log.txt").read_text()[-3000:])
    assert rc == 0, (work / "log.txt").read_text()[-5000:]
    return work / "runs" / "quickstart" / "version_0"


def _logged_metrics(log_dir: Path) -> dict[str, float]:
    """The adaptive/* and val/top* values in the CSV logger's metrics.csv (one validation)."""
    rows = [r for r in _read_csv(log_dir / "metrics.csv") if r.get("adaptive/top1")]
    assert len(rows) == 1, rows
    return {k: float(v) for k, v in rows[0].items() if v != "" and k.startswith(("adaptive/", "val/top"))}


@pytest.fixture(scope="module")
def single_process_validation(fitted, tmp_path_factory) -> Path:
    """`mrl-vision validate` of the fitted checkpoint in one process (curve written)."""
    return _validate_run(fitted.ckpt, tmp_path_factory.mktemp("validate") / "one", 1, True, timeout=240)


@pytest.fixture(scope="module")
def two_process_validation(fitted, tmp_path_factory) -> Path:
    """`mrl-vision validate` of the fitted checkpoint with 2 DDP processes (curve written; one launch for
    both tests below). A hang fails within the timeout."""
    return _validate_run(fitted.ckpt, tmp_path_factory.mktemp("validate") / "two", 2, True, timeout=180)


@pytest.mark.slow
def test_ddp_gathered_fitting_equals_single_process(fitted, single_process_validation, two_process_validation):
    """2-process DDP does not fit and score the same cascade as one process (gathered rows out of order)."""
    m1, m2 = _logged_metrics(single_process_validation), _logged_metrics(two_process_validation)
    assert set(m1) == set(m2) and {"adaptive/top1", "adaptive/expected_dims", "adaptive/expected_head_cost"} <= set(m1)
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], abs=1e-6), k
    # the single-process numbers are those of the checkpoint on the whole validation set, computed here
    dm = QuickstartDataModule(batch_size=32)
    dm.setup("validate")
    loaded = MatryoshkaClassifier.load_from_checkpoint(str(fitted.ckpt), map_location="cpu")
    conf, preds, labels = _eval_outputs(loaded, dm.val_dataloader(), 10**6)
    assert labels.numel() == 500
    cal, rest = A.calibration_split(500, 0.5, seed=0)
    thr = A.fit_thresholds(conf[:, cal], preds[:, cal], labels[cal], NEST, method="budget", budget=BUDGET)
    res = A.evaluate_cascade(conf[:, rest], preds[:, rest], labels[rest], NEST, thr)
    assert m1["adaptive/top1"] == pytest.approx(res.accuracy, abs=1e-6)
    assert m1["adaptive/expected_dims"] == pytest.approx(res.expected_dims, rel=1e-6)
    assert m1["adaptive/expected_head_cost"] == pytest.approx(res.expected_head_cost, rel=1e-6)
    assert len(set(A.exit_index(conf[:, rest], thr).tolist())) >= 2  # a real cascade, not one size


@pytest.mark.slow
def test_ddp_validation_writes_the_same_curve(single_process_validation, two_process_validation):
    """2-process DDP with write_curve=True hangs, or rank 0 writes a curve unlike one process's."""
    two = two_process_validation
    c1 = _read_csv(single_process_validation / "adaptive_val_curve.csv")
    c2 = _read_csv(two / "adaptive_val_curve.csv")
    assert [r["kind"] for r in c1] == [r["kind"] for r in c2]
    for r1, r2 in zip(c1, c2):
        assert float(r2["expected_dims"]) == pytest.approx(float(r1["expected_dims"]), abs=2e-4)
        assert float(r2["top1"]) == pytest.approx(float(r1["top1"]), abs=2e-4)
        t1 = [float(v) for v in r1["thresholds"].split()]
        assert [float(v) for v in r2["thresholds"].split()] == pytest.approx(t1, abs=1e-5)
    assert _logged_metrics(two) == pytest.approx(_logged_metrics(single_process_validation), abs=1e-6)
