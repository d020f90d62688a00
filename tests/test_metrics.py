"""Unit tests of the per-size top-k accuracy metric."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from mrl_vision.metrics import MatryoshkaAccuracy


def _hand_made():
    """Two sizes, four samples, six classes; the hits are worked out in the comments."""
    logits = torch.tensor(
        [
            [  # size 8
                [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # y=0: rank 1 -> top1, top2, top5 hit
                [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # y=1: rank 2 -> top2, top5 hit
                [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # y=0: rank 6 -> no hit
                [0.0, 5.0, 1.0, 2.0, 3.0, 4.0],  # y=1: rank 1 -> top1, top2, top5 hit
            ],
            [  # size 16
                [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # y=0: rank 6 -> no hit
                [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # y=1: rank 5 -> top5 hit only
                [1.0, 0.0, 0.5, 0.2, 0.3, 0.4],  # y=0: rank 1 -> top1, top2, top5 hit
                [1.0, 0.0, 2.0, 3.0, 4.0, 5.0],  # y=1: rank 6 -> no hit
            ],
        ]
    )
    target = torch.tensor([0, 1, 0, 1])
    return logits, target


def test_hand_made_logits_known_accuracies():
    """Top-1/2/5 per size differ from the hits counted by hand."""
    logits, target = _hand_made()
    acc = MatryoshkaAccuracy([8, 16], num_classes=6, top_k=[1, 2, 5])
    acc.update(logits, target)
    out = {k: float(v) for k, v in acc.compute().items()}
    assert out == pytest.approx(
        {
            "top1@8": 2 / 4, "top2@8": 3 / 4, "top5@8": 3 / 4,
            "top1@16": 1 / 4, "top2@16": 1 / 4, "top5@16": 2 / 4,
        }
    )


def test_hand_made_accumulates_over_updates_and_resets():
    """Counts are not summed over update() calls, or reset() does not clear them."""
    logits, target = _hand_made()
    acc = MatryoshkaAccuracy([8, 16], num_classes=6)  # top_k (1, 5)
    acc.update(logits, target)
    # two more samples, both ranked first at every size
    extra_target = torch.tensor([3, 5])
    extra = torch.zeros(2, 2, 6)
    extra[:, 0, 3] = extra[:, 1, 5] = 1.0
    acc.update(extra, extra_target)
    out = {k: float(v) for k, v in acc.compute().items()}
    assert out == pytest.approx({"top1@8": 4 / 6, "top5@8": 5 / 6, "top1@16": 3 / 6, "top5@16": 4 / 6})
    assert int(acc.total) == 6
    acc.reset()
    acc.update(extra, extra_target)
    assert {k: float(v) for k, v in acc.compute().items()} == pytest.approx(
        {"top1@8": 1.0, "top5@8": 1.0, "top1@16": 1.0, "top5@16": 1.0}
    )


def test_random_logits_match_torchmetrics_micro_accuracy():
    """Per-size top-k differs from torchmetrics' micro MulticlassAccuracy over several batches."""
    dims, num_classes, top_k = [8, 16, 32], 7, [1, 3, 5]
    gen = torch.Generator().manual_seed(0)
    acc = MatryoshkaAccuracy(dims, num_classes, top_k)
    refs = {
        (g, k): MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro")
        for g in range(len(dims))
        for k in top_k
    }
    for n in (13, 5, 21, 1):
        logits = torch.randn(len(dims), n, num_classes, generator=gen)
        target = torch.randint(0, num_classes, (n,), generator=gen)
        acc.update(logits, target)
        for (g, k), ref in refs.items():
            ref.update(logits[g], target)
    out = acc.compute()
    assert set(out) == {f"top{k}@{m}" for m in dims for k in top_k}
    for (g, k), ref in refs.items():
        torch.testing.assert_close(out[f"top{k}@{dims[g]}"], ref.compute().float(), rtol=0, atol=1e-6)


def test_top_k_above_num_classes_is_dropped():
    """A k above num_classes is kept (or all k above it is accepted)."""
    acc = MatryoshkaAccuracy([8, 16], num_classes=3)
    assert acc.top_k == [1]
    acc.update(torch.tensor([[[3.0, 2.0, 1.0]], [[1.0, 2.0, 3.0]]]), torch.tensor([0]))
    assert {k: float(v) for k, v in acc.compute().items()} == {"top1@8": 1.0, "top1@16": 0.0}
    with pytest.raises(ValueError, match="num_classes=3"):
        MatryoshkaAccuracy([8], num_classes=3, top_k=[4, 5])


@pytest.mark.parametrize(
    "logits_shape, target_shape",
    [
        ((4, 6), (4,)),  # no size axis
        ((3, 4, 6), (4,)),  # 3 sizes for a 2-size metric
        ((2, 4, 6), (5,)),  # N differs from the target's
        ((2, 4, 6, 1), (4,)),  # 4-D
    ],
)
def test_bad_shapes_raise_value_error(logits_shape, target_shape):
    """Logits or targets of the wrong shape are accepted instead of raising ValueError."""
    acc = MatryoshkaAccuracy([8, 16], num_classes=6)
    with pytest.raises(ValueError, match="expected logits"):
        acc.update(torch.randn(*logits_shape), torch.zeros(target_shape, dtype=torch.long))


@pytest.mark.parametrize(
    "logits_shape, target_shape",
    [
        ((2, 4, 3), (4,)),  # 3 classes for a 6-class metric (fewer than top-5)
        ((2, 4, 6), (4, 1)),  # a column of targets
    ],
)
def test_class_axis_and_target_ndim_mismatch_raise_value_error(logits_shape, target_shape):
    """A class axis other than num_classes, or a 2-D target, is not reported as a ValueError."""
    acc = MatryoshkaAccuracy([8, 16], num_classes=6)
    with pytest.raises(ValueError):
        acc.update(torch.randn(*logits_shape), torch.zeros(target_shape, dtype=torch.long))


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_compute_before_update_is_zero_not_nan():
    """compute() with no samples divides by zero."""
    out = MatryoshkaAccuracy([8], num_classes=6).compute()
    assert {k: float(v) for k, v in out.items()} == {"top1@8": 0.0, "top5@8": 0.0}
