"""slerp: endpoints, norms on the sphere, closed-form midpoint, weight shapes, errors."""
import math

import pytest
import torch

from ddim_fused import slerp
from tests.helpers import assert_close


def _orthogonal_pair(shape, norm, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen, dtype=torch.float64)
    b = torch.randn(shape, generator=gen, dtype=torch.float64)
    b = b - (a * b).sum() / (a * a).sum() * a  # Gram-Schmidt
    return (norm * a / a.norm()).to(dtype), (norm * b / b.norm()).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(7,), (2, 3, 5, 5)], ids=["D7", "B2-C3-H5-W5"])
def test_endpoints_are_the_inputs(shape, dtype):
    gen = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    assert_close(slerp(z0, z1, 0.0), z0, rtol=rtol, name="alpha=0")
    assert_close(slerp(z0, z1, 1.0), z1, rtol=rtol, name="alpha=1")
    path = slerp(z0, z1, [0.0, 1.0])
    assert path.dtype == dtype
    assert_close(path[0], z0, rtol=rtol, name="weights[0]")
    assert_close(path[1], z1, rtol=rtol, name="weights[1]")


def test_norm_preserved_for_equal_norm_orthogonal_inputs():
    z0, z1 = _orthogonal_pair((3, 8, 8), norm=13.0)
    weights = torch.linspace(0, 1, 9)
    path = slerp(z0, z1, weights)
    norms = path.flatten(1).norm(dim=1)
    assert_close(norms, torch.full_like(norms, 13.0), rtol=1e-12, name="norms")
    # A straight line would dip to 13 / sqrt(2) at the midpoint.
    assert ((0.5 * z0 + 0.5 * z1).norm() - 13.0 / math.sqrt(2)).abs() < 1e-9


def test_midpoint_and_angles_of_orthogonal_inputs():
    # For orthogonal equal-norm z0, z1: slerp(alpha) = cos(alpha pi/2) z0 + sin(alpha pi/2) z1.
    z0, z1 = _orthogonal_pair((16,), norm=2.0, seed=2)
    for alpha in (0.25, 0.5, 0.9):
        expected = math.cos(alpha * math.pi / 2) * z0 + math.sin(alpha * math.pi / 2) * z1
        assert_close(slerp(z0, z1, alpha), expected, rtol=1e-12, name=f"alpha={alpha}")


def test_nearly_parallel_inputs_fall_back_to_a_line():
    z0 = torch.randn(10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = slerp(z0, 2.0 * z0, 0.5)
    assert torch.isfinite(out).all()
    assert_close(out, 1.5 * z0, rtol=1e-12, name="parallel midpoint")


@pytest.mark.parametrize("weights", [[0.0, 0.3, 1.0], torch.linspace(0, 1, 5)], ids=["list3", "tensor5"])
def test_weight_shapes(weights):
    z0, z1 = _orthogonal_pair((2, 4, 3), norm=1.0, dtype=torch.float32)
    assert slerp(z0, z1, 0.3).shape == (2, 4, 3)
    assert slerp(z0, z1, weights).shape == (len(weights), 2, 4, 3)


@pytest.mark.parametrize(
    "z0,z1,alpha,err,match",
    [
        ([1.0, 0.0], torch.ones(2), 0.5, TypeError, "z0 must be a torch.Tensor"),
        (torch.ones(2), torch.ones(3), 0.5, ValueError, r"z1 has shape \(3,\), expected \(2\)"),
        (torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.long), 0.5, TypeError, "z0 has dtype torch.int64"),
        (torch.ones(2), torch.ones(2), 1.5, ValueError, r"alpha must lie in \[0, 1\]"),
        (torch.ones(2), torch.ones(2), [-0.1, 0.5], ValueError, r"alpha must lie in \[0, 1\]"),
        (torch.ones(2), torch.ones(2), [[0.1, 0.5]], ValueError, "1-D sequence"),
        (torch.ones(2), torch.ones(2), [], ValueError, "1-D sequence"),
        (torch.ones(2), torch.ones(2), "0.5", TypeError, "alpha must be a float or a 1-D sequence"),
        (torch.ones(2), torch.ones(2), ["a"], TypeError, "alpha must be a float or a 1-D sequence"),
        (torch.ones(2), torch.ones(2), None, TypeError, "alpha must be a float or a 1-D sequence"),
        (torch.ones(2), torch.ones(2), 10**400, ValueError, r"alpha must lie in \[0, 1\]"),
    ],
    ids=["z0-list", "shape-mismatch", "int-dtype", "alpha-above-1", "alpha-negative", "alpha-2d", "alpha-empty",
         "alpha-str", "alpha-str-list", "alpha-none", "alpha-huge-int"],
)
def test_bad_input(z0, z1, alpha, err, match):
    with pytest.raises(err, match=match):
        slerp(z0, z1, alpha)
