"""Unit tests of the summed per-size Matryoshka loss."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.nn import functional as F

from mrl_vision.losses import MatryoshkaLoss

G, N, C = 4, 7, 5


def _data(dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(G, N, C, generator=gen, dtype=dtype) * 3
    target = torch.randint(0, C, (N,), generator=gen)
    return logits, target


def _reference(logits, target, weights, smoothing):
    return sum(
        w * F.cross_entropy(logits[g], target, label_smoothing=smoothing) for g, w in enumerate(weights)
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
def test_loss_equals_weighted_sum_of_cross_entropies(weights, smoothing):
    """The loss is not sum_g w_g * CE(logits[g], y, label_smoothing=s)."""
    logits, target = _data()
    loss_fn = MatryoshkaLoss(G, weights, label_smoothing=smoothing)
    expected = _reference(logits, target, weights or [1.0] * G, smoothing)
    torch.testing.assert_close(loss_fn(logits, target), expected, rtol=1e-5, atol=1e-6)


def test_loss_per_size_matches_cross_entropy_by_hand():
    """per_size() does not give each size's mean cross-entropy (checked with an explicit log-softmax)."""
    logits, target = _data(torch.float64)
    per = MatryoshkaLoss(G).per_size(logits, target)
    assert per.shape == (G,)
    by_hand = torch.stack(
        [-(logits[g] - logits[g].logsumexp(-1, keepdim=True))[torch.arange(N), target].mean() for g in range(G)]
    )
    torch.testing.assert_close(per.double(), by_hand, rtol=1e-5, atol=1e-6)


def test_loss_float64_logits():
    """The loss of float64 logits is not the reference sum to float32 precision."""
    logits, target = _data(torch.float64)
    loss = MatryoshkaLoss(G, [1.0, 2.0, 3.0, 4.0], label_smoothing=0.1)(logits, target)
    expected = _reference(logits, target, [1.0, 2.0, 3.0, 4.0], 0.1)
    assert math.isclose(float(loss), float(expected), rel_tol=1e-5)


def test_default_weights_are_ones():
    """The default weights are not all 1 (the MRL paper's choice)."""
    loss_fn = MatryoshkaLoss(G)
    assert loss_fn.weights.tolist() == [1.0] * G
    logits, target = _data()
    torch.testing.assert_close(loss_fn(logits, target), _reference(logits, target, [1.0] * G, 0.0))


def test_zero_weight_removes_a_size_from_the_gradient():
    """A size with weight 0 still gets gradient, or the other sizes get none."""
    logits, target = _data()
    logits.requires_grad_(True)
    MatryoshkaLoss(G, [1.0, 0.0, 1.0, 1.0])(logits, target).backward()
    assert torch.count_nonzero(logits.grad[1]) == 0
    for g in (0, 2, 3):
        assert torch.count_nonzero(logits.grad[g]) > 0


def test_gradient_matches_reference():
    """The loss's gradient w.r.t. the logits differs from the reference's."""
    weights = [0.5, 1.0, 1.5, 2.0]
    logits, target = _data()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    MatryoshkaLoss(G, weights, label_smoothing=0.1)(a, target).backward()
    _reference(b, target, weights, 0.1).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "weights, bad",
    [
        ([1.0, 1.0, 1.0], "got 3"),
        ([1.0] * 5, "got 5"),
        ([1.0, -0.5, 1.0, 1.0], "-0.5"),
        ([1.0, float("nan"), 1.0, 1.0], "nan"),
        ([1.0, float("inf"), 1.0, 1.0], "inf"),
    ],
)
def test_bad_weights_raise_naming_the_value(weights, bad):
    """Bad loss weights are accepted, or the ValueError does not name the bad value."""
    with pytest.raises(ValueError, match=re.escape(bad)):
        MatryoshkaLoss(G, weights)


@pytest.mark.parametrize("smoothing", [-0.1, 1.0, 1.5, float("nan")])
def test_label_smoothing_out_of_range(smoothing):
    """label_smoothing outside [0, 1) is accepted."""
    with pytest.raises(ValueError, match="label_smoothing"):
        MatryoshkaLoss(G, label_smoothing=smoothing)


def test_num_sizes_and_logit_mismatch():
    """num_sizes < 1 or logits with another number of sizes than weights are accepted."""
    with pytest.raises(ValueError, match="num_sizes must be >= 1, got 0"):
        MatryoshkaLoss(0)
    logits, target = _data()
    with pytest.raises(ValueError, match="logits hold 4 sizes but the loss has 3 weights"):
        MatryoshkaLoss(3)(logits, target)
