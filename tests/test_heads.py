"""Unit tests of the dims rules and the Matryoshka / fixed-feature heads."""

from __future__ import annotations

import re
import signal

import pytest
import torch
from torch.nn import functional as F

from mrl_vision.heads import FixedFeatureHead, MatryoshkaHead, NestedLinear, default_dims, validate_dims

DIMS = [4, 8, 16, 24]
WIDTH, CLASSES, N = 24, 5, 6


def _z(width: int = WIDTH, n: int = N, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _head(efficient: bool, dtype=torch.float32, dims=DIMS, width=WIDTH) -> MatryoshkaHead:
    torch.manual_seed(1)
    return MatryoshkaHead(width, CLASSES, dims, efficient=efficient).to(dtype)


# ----------------------------------------------------------------------------- dims
@pytest.mark.parametrize(
    "width, expected",
    [
        (2048, [8, 16, 32, 64, 128, 256, 512, 1024, 2048]),
        (384, [8, 16, 32, 64, 128, 256, 384]),
        (96, [8, 16, 32, 64, 96]),
        (64, [8, 16, 32, 64]),
        (8, [8]),
        (5, [5]),
    ],
)
def test_default_dims(width, expected):
    """default_dims no longer gives powers of two from 8 ending exactly at the width."""
    assert default_dims(width) == expected


def test_default_dims_rejects_zero_width():
    """default_dims accepts a width < 1 instead of naming it in a ValueError."""
    with pytest.raises(ValueError, match="0"):
        default_dims(0)


class _Hang(Exception):
    pass


def test_default_dims_rejects_non_positive_smallest():
    """default_dims with a non-positive `smallest` must raise ValueError, not loop forever."""
    smallest = 0  # a negative start also loops forever, with ever larger ints

    def on_alarm(signum, frame):
        raise _Hang(f"default_dims(96, smallest={smallest}) did not return within 1 s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(ValueError, match=re.escape(str(smallest))):
            default_dims(96, smallest=smallest)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_validate_dims_accepts_and_returns_a_list():
    """validate_dims rejects a valid tuple or does not return it as a plain list."""
    assert validate_dims((8, 16, 96), 96) == [8, 16, 96]
    assert validate_dims([96], 96) == [96]


@pytest.mark.parametrize(
    "dims, bad",
    [
        ([], "empty"),
        ([0, 8], "0"),
        ([8, -16], "-16"),
        ([8, 8, 16], "8"),
        ([8, 32, 16], "16"),
        ([8, 16, 200], "200"),
        ([8, 16.0], "16.0"),
        ([8, "16"], "'16'"),
        ([True, 8], "True"),
    ],
)
def test_validate_dims_errors_name_the_bad_value(dims, bad):
    """A bad dims list is accepted, or its ValueError does not name the offending value."""
    with pytest.raises(ValueError, match=re.escape(bad)):
        validate_dims(dims, 96)


def test_validate_dims_error_messages_say_why():
    """The dims errors no longer say which rule (duplicate / order / width) was broken."""
    with pytest.raises(ValueError, match="twice"):
        validate_dims([8, 8], 96)
    with pytest.raises(ValueError, match="increasing"):
        validate_dims([16, 8], 96)
    with pytest.raises(ValueError, match="width 96"):
        validate_dims([8, 97], 96)


# ----------------------------------------------------------------------------- MRL head
@pytest.mark.parametrize("efficient", [False, True])
def test_head_output_shape(efficient):
    """A head does not return logits stacked as [G, N, C]."""
    head = _head(efficient)
    assert head(_z()).shape == (len(DIMS), N, CLASSES)


def test_mrl_logits_follow_nesting_order():
    """MRL logits[g] is not the g-th Linear applied to the prefix z[:, :m_g]."""
    head, z = _head(False), _z()
    logits = head(z)
    assert [lin.in_features for lin in head.linears] == DIMS
    for g, m in enumerate(DIMS):
        lin = head.linears[g]
        expected = z[:, :m] @ lin.weight.T + lin.bias
        torch.testing.assert_close(logits[g], expected, rtol=1e-5, atol=1e-6)


def _naive_mrle(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dims) -> torch.Tensor:
    return torch.stack([z[:, :m] @ w[:, :m].T + b for m in dims])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_mrle_fused_logits_match_naive(dtype, tol):
    """The fused (cumulative-sum) MRL-E logits differ from z[:, :m] @ W[:, :m].T + b per size."""
    head, z = _head(True, dtype), _z(dtype=dtype)
    w, b = head.linear.weight.detach(), head.linear.bias.detach()
    assert w.shape == (CLASSES, DIMS[-1])
    torch.testing.assert_close(head(z), _naive_mrle(z, w, b, DIMS), rtol=tol, atol=tol)


def test_mrle_with_nesting_below_width_reads_only_the_prefix():
    """MRL-E with dims[-1] < width reads features beyond the largest size."""
    head, z = _head(True, dims=[4, 8, 12]), _z()
    w, b = head.linear.weight.detach(), head.linear.bias.detach()
    assert w.shape == (CLASSES, 12)
    out = head(z)
    torch.testing.assert_close(out, _naive_mrle(z, w, b, [4, 8, 12]), rtol=1e-5, atol=1e-6)
    z2 = z.clone()
    z2[:, 12:] = 1e3
    torch.testing.assert_close(head(z2), out)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_mrle_fused_gradients_match_naive(dtype, tol):
    """The fused MRL-E backward gives other gradients (W, b, z) than the naive per-size form."""
    head = _head(True, dtype)
    z1 = _z(dtype=dtype).requires_grad_(True)
    z2 = z1.detach().clone().requires_grad_(True)
    w2 = head.linear.weight.detach().clone().requires_grad_(True)
    b2 = head.linear.bias.detach().clone().requires_grad_(True)
    coeff = torch.randn(len(DIMS), N, CLASSES, generator=torch.Generator().manual_seed(3), dtype=dtype)

    (head(z1) * coeff).sum().backward()
    (_naive_mrle(z2, w2, b2, DIMS) * coeff).sum().backward()

    torch.testing.assert_close(head.linear.weight.grad, w2.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(head.linear.bias.grad, b2.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=tol, atol=tol)


def test_nested_linear_passes_gradcheck():
    """The hand-written NestedLinear backward disagrees with finite differences."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, 30, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 24, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, w, b: NestedLinear.apply(z, w, b, (4, 8, 16, 24)), (z, w, b))


def test_mrle_under_bf16_autocast_matches_float32():
    """MRL-E under CPU bf16 autocast gives logits far from float32, or float32 gradients for W fail."""
    head, z = _head(True), _z()
    ref = head(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(z)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert head.linear.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("efficient", [False, True])
def test_logits_at_equals_forward_slice(efficient):
    """logits_at(z, m) is not the forward logits of size m."""
    head, z = _head(efficient), _z()
    full = head(z)
    for g, m in enumerate(DIMS):
        torch.testing.assert_close(head.logits_at(z, m), full[g], rtol=1e-5, atol=1e-6)


def test_mrle_logits_at_matches_naive_formula():
    """MRL-E logits_at(z, m) is not z[:, :m] @ W[:, :m].T + b."""
    head, z = _head(True, torch.float64), _z(dtype=torch.float64)
    w, b = head.linear.weight.detach(), head.linear.bias.detach()
    for m in DIMS:
        torch.testing.assert_close(head.logits_at(z, m), z[:, :m] @ w[:, :m].T + b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("efficient", [False, True])
def test_block_logits_chain_reproduces_forward(efficient):
    """Chaining block_logits from g=0 upward (a cascade) does not reproduce forward()."""
    head, z = _head(efficient, torch.float64), _z(dtype=torch.float64)
    full = head(z)
    previous = None
    for g in range(len(DIMS)):
        previous = head.block_logits(z, g, previous)
        torch.testing.assert_close(previous, full[g], rtol=1e-12, atol=1e-12)


def test_mrle_block_logits_only_reads_the_new_block():
    """MRL-E block_logits recomputes from scratch instead of adding the new block to `previous`."""
    head, z = _head(True, torch.float64), _z(dtype=torch.float64)
    w = head.linear.weight.detach()
    previous = torch.zeros(N, CLASSES, dtype=torch.float64)
    out = head.block_logits(z, 2, previous)  # dims [8, 16)
    torch.testing.assert_close(out, z[:, 8:16] @ w[:, 8:16].T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("efficient", [False, True])
def test_index_of(efficient):
    """index_of does not give a size's position, or accepts a size outside the dims."""
    head = _head(efficient)
    assert [head.index_of(m) for m in DIMS] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"dim 5 is not one of this mrl(_e)? head.s sizes"):
        head.index_of(5)
    with pytest.raises(ValueError, match=r"\[4, 8, 16, 24\]"):
        head.logits_at(_z(), 12)


def test_head_rejects_bad_arguments():
    """A head accepts num_classes < 1 or an invalid dims."""
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 0"):
        MatryoshkaHead(16, 0, [8, 16])
    with pytest.raises(ValueError, match="32"):
        MatryoshkaHead(16, 3, [8, 32])
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 0"):
        FixedFeatureHead(16, 0, 8)
    with pytest.raises(ValueError, match="32"):
        FixedFeatureHead(16, 3, 32)


# ----------------------------------------------------------------------------- FF head
def test_ff_prefix_gradient_is_zero_beyond_m():
    """The prefix FF head leaks gradient into features beyond m, or gives none within m."""
    torch.manual_seed(0)
    m = 8
    head = FixedFeatureHead(WIDTH, CLASSES, m)
    z = _z().requires_grad_(True)
    logits = head(z)
    assert logits.shape == (1, N, CLASSES)
    F.cross_entropy(logits[0], torch.arange(N) % CLASSES).backward()
    assert torch.count_nonzero(z.grad[:, m:]) == 0
    assert bool((z.grad[:, :m].abs().sum(0) > 0).all())


def test_ff_prefix_logits_and_embed():
    """The prefix FF head does not classify z[:, :m] with its Linear, or embed is not that prefix."""
    torch.manual_seed(0)
    head, z = FixedFeatureHead(WIDTH, CLASSES, 8), _z()
    torch.testing.assert_close(head.embed(z), z[:, :8])
    expected = z[:, :8] @ head.classifier.weight.T + head.classifier.bias
    torch.testing.assert_close(head(z)[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.logits_at(z, 8), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.block_logits(z, 0, None), expected, rtol=1e-5, atol=1e-6)


def test_ff_projection_shapes_and_values():
    """The projection FF head has a wrong embed/logit shape or does not project before classifying."""
    torch.manual_seed(0)
    m = 6
    head, z = FixedFeatureHead(WIDTH, CLASSES, m, projection=True), _z()
    e = head.embed(z)
    assert e.shape == (N, m)
    torch.testing.assert_close(e, z @ head.projection.weight.T + head.projection.bias, rtol=1e-5, atol=1e-6)
    out = head(z)
    assert out.shape == (1, N, CLASSES)
    torch.testing.assert_close(out[0], e @ head.classifier.weight.T + head.classifier.bias, rtol=1e-5, atol=1e-6)
    # a projection reads every feature, so the gradient reaches all of z
    z.requires_grad_(True)
    head(z).sum().backward()
    assert bool((z.grad.abs().sum(0) > 0).all())


def test_ff_index_of_errors():
    """The FF head accepts a size other than its own."""
    head = FixedFeatureHead(WIDTH, CLASSES, 8)
    assert head.dims == [8] and head.index_of(8) == 0
    with pytest.raises(ValueError, match=r"dim 16 is not one of this ff head.s sizes \[8\]"):
        head.index_of(16)
    with pytest.raises(ValueError, match="16"):
        head.logits_at(_z(), 16)
