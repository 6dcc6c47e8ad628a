"""relative_rms_error and frechet_distance: closed forms, edge cases, and bad input."""
import math

import numpy as np
import pytest
import torch

from ddim_fused.metrics import frechet_distance, relative_rms_error


def test_relative_rms_error_closed_forms():
    # Orthogonal perturbation: ||(0, 4)|| / ||(3, 0)|| = 4 / 3.
    assert relative_rms_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])) == pytest.approx(4 / 3, rel=1e-15)
    # A uniform relative offset c gives exactly |c|, whatever the shape.
    expected = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert relative_rms_error(expected * 0.97, expected) == pytest.approx(0.03, rel=1e-12)
    assert relative_rms_error(expected, expected) == 0.0


def test_relative_rms_error_is_float64_and_scale_safe():
    # A 1e-12 relative error survives only float64 arithmetic (fp32 rounds at ~6e-8).
    expected = np.random.default_rng(1).standard_normal(1000)
    actual = expected * (1 + 1e-12)
    assert relative_rms_error(actual, expected) == pytest.approx(1e-12, rel=1e-3)
    # fp32/fp16 inputs are widened first: the same values in float64 give the same error.
    a32, e32 = torch.from_numpy(actual).float(), torch.from_numpy(expected * 1.001).float()
    assert relative_rms_error(a32, e32) == relative_rms_error(a32.double(), e32.double())
    assert relative_rms_error(a32.half(), e32.half()) == relative_rms_error(a32.half().double(), e32.half().double())
    # Squares of 1e-200 underflow and of 1e200 overflow in float64; the result must not.
    for scale in (1e-200, 1e200):
        assert relative_rms_error(actual * 0.5 * scale, expected * scale) == pytest.approx(
            relative_rms_error(actual * 0.5, expected), rel=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_relative_rms_error_is_inf_for_non_finite_values_in_either_input(bad):
    x = torch.ones(2, 3)
    y = x.clone()
    y[1, 2] = bad
    assert relative_rms_error(y, x) == math.inf
    assert relative_rms_error(x, y) == math.inf
    assert relative_rms_error(y, y.clone()) == math.inf


def test_relative_rms_error_zero_and_empty_expected():
    zeros = torch.zeros(4)
    assert relative_rms_error(zeros, zeros) == 0.0
    assert relative_rms_error(torch.tensor([0.0, 0.0, 1e-30, 0.0]), zeros) == math.inf
    assert relative_rms_error(torch.empty(0, 3), torch.empty(0, 3)) == 0.0


def test_relative_rms_error_leaves_its_inputs_alone():
    actual, expected = torch.randn(3, 4), torch.randn(3, 4)
    a0, e0 = actual.clone(), expected.clone()
    relative_rms_error(actual, expected)
    assert torch.equal(actual, a0) and torch.equal(expected, e0)


@pytest.mark.parametrize(
    "actual,expected,err,match",
    [
        (torch.zeros(2, 3), torch.zeros(3, 2), ValueError, r"actual has shape \(2, 3\) and expected \(3, 2\)"),
        (torch.zeros(3), torch.zeros(1), ValueError, "must match"),
        ([0.0, 1.0], torch.zeros(2), TypeError, "actual must be a torch.Tensor or numpy array"),
        (torch.zeros(2), 0.0, TypeError, "expected must be a torch.Tensor or numpy array"),
        (torch.zeros(2, dtype=torch.complex64), torch.zeros(2), TypeError, "actual must hold real numbers"),
        (np.zeros(2), np.zeros(2, dtype=bool), TypeError, "expected must hold real numbers"),
    ],
    ids=["shape", "no-broadcast", "list", "float", "complex", "bool"],
)
def test_relative_rms_error_bad_input(actual, expected, err, match):
    with pytest.raises(err, match=match):
        relative_rms_error(actual, expected)


def _with_moments(n, mean, cov, seed):
    """n samples whose EMPIRICAL mean and covariance are exactly `mean` and `cov`."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    # Whiten to an exactly identity sample covariance, then colour with cov^1/2.
    evals, evecs = np.linalg.eigh(np.cov(z, rowvar=False))
    z = z @ evecs @ np.diag(evals**-0.5) @ evecs.T
    evals, evecs = np.linalg.eigh(cov)
    return z @ (evecs * np.sqrt(evals)) @ evecs.T + mean


def _random_rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


@pytest.mark.parametrize("rotated", [False, True], ids=["diagonal", "commuting-rotated"])
def test_closed_form_commuting_covariances(rotated):
    # With C1 = Q diag(d1) Q^T and C2 = Q diag(d2) Q^T (commuting), the distance is
    # ||m1 - m2||^2 + sum_i (sqrt(d1_i) - sqrt(d2_i))^2.
    d = 6
    rng = np.random.default_rng(0)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    d1, d2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    q = _random_rotation(d, 1) if rotated else np.eye(d)
    c1, c2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    a = _with_moments(500, m1, c1, seed=2)
    b = _with_moments(300, m2, c2, seed=3)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_non_commuting_covariances_match_eigenvalues_of_product():
    # tr((C1^1/2 C2 C1^1/2)^1/2) = sum_i sqrt(lambda_i(C1 C2)): an independent route
    # through the (real, non-negative) eigenvalues of the non-symmetric product.
    d = 5
    rng = np.random.default_rng(4)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    l1, l2 = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    c1, c2 = l1 @ l1.T + 0.1 * np.eye(d), l2 @ l2.T + 0.1 * np.eye(d)
    a, b = _with_moments(400, m1, c1, seed=5), _with_moments(400, m2, c2, seed=6)
    cross = np.sqrt(np.linalg.eigvals(c1 @ c2).real).sum()
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_symmetric_and_accepts_tensors_of_any_sample_shape():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 2, 3, 4, generator=gen)
    b = 1.5 * torch.randn(150, 2, 3, 4, generator=gen) + 0.3
    ab, ba = frechet_distance(a, b), frechet_distance(b, a)
    assert ab > 0.5
    assert ab == pytest.approx(ba, rel=1e-10)
    # (N, *s) is flattened to (N, D): same value as the explicit (N, 24) matrices.
    assert frechet_distance(a.reshape(200, -1).numpy(), b.reshape(150, -1).numpy()) == pytest.approx(ab, rel=1e-12)


@pytest.mark.parametrize("n,d", [(300, 8), (5, 12)], ids=["N300-D8", "N5-D12-rank-deficient"])
def test_identical_sets_give_zero(n, d):
    x = np.random.default_rng(7).standard_normal((n, d)) * 3.0 + 1.0
    value = frechet_distance(x, x.copy())
    assert isinstance(value, float)
    assert 0.0 <= value < 1e-9


def test_large_values_scale_the_distance_by_their_square():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((50, 4)), rng.standard_normal((60, 4)) + 0.5
    d = frechet_distance(a, b)
    assert frechet_distance(a * 1e100, b * 1e100) == pytest.approx(d * 1e200, rel=1e-9)
    assert frechet_distance(a * 1e-100, b * 1e-100) == pytest.approx(d * 1e-200, rel=1e-9)


def test_detects_a_small_shift():
    x = np.random.default_rng(8).standard_normal((1000, 4))
    assert frechet_distance(x, x + np.array([0.1, 0, 0, 0])) == pytest.approx(0.01, rel=1e-9)


@pytest.mark.parametrize(
    "a,b,err,match",
    [
        (np.zeros((10, 3)), np.zeros((10, 4)), ValueError, "features"),
        (np.zeros((1, 3)), np.zeros((10, 3)), ValueError, "N >= 2"),
        (np.zeros(10), np.zeros((10, 1)), ValueError, r"\(N, \*sample_shape\)"),
        ([[0.0, 1.0], [1.0, 0.0]], np.zeros((2, 2)), TypeError, "torch.Tensor or numpy array"),
        (np.full((4, 2), np.nan), np.zeros((4, 2)), ValueError, "NaN"),
        (np.zeros((4, 2), dtype=complex), np.zeros((4, 2)), TypeError, "real numbers"),
        (torch.zeros((4, 2), dtype=torch.complex64), np.zeros((4, 2)), TypeError, "real numbers"),
        (torch.zeros((4, 2), dtype=torch.bool), np.zeros((4, 2)), TypeError, "real numbers"),
        (np.eye(4, 2) * 1e200, np.ones((4, 2)) * 1e200, ValueError, "overflows float64"),
    ],
    ids=["D-mismatch", "N1", "1-D", "list", "nan", "complex", "complex-tensor", "bool-tensor", "overflow"],
)
def test_bad_input(a, b, err, match):
    with pytest.raises(err, match=match):
        frechet_distance(a, b)
