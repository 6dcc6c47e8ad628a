"""check_finite: silent on finite batches, names the first bad sample otherwise."""
import pytest
import torch

from ddim_fused.finite import NonFiniteError, check_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_batches_pass(dtype):
    check_finite(torch.randn(4, 1, 3, 3).to(dtype), "x")
    check_finite(torch.empty(0, 2), "x")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_first_bad_sample_is_named_with_its_global_index(bad):
    x = torch.zeros(6, 1, 2, 2)
    x[3, 0, 1, 1] = bad
    x[5, 0, 0, 0] = bad
    with pytest.raises(NonFiniteError, match=r"^samples: sample 13 is not finite \(NaN or Inf\); 2 of the 6 in its "
                                             r"batch are; likely cause: too hot$"):
        check_finite(x, "samples", first_index=10, hint="likely cause: too hot")


def test_non_tensors_are_refused():
    with pytest.raises(TypeError, match="x must be a \\(B, ...\\) tensor, got list"):
        check_finite([1.0], "x")
    with pytest.raises(TypeError, match="got a 0-d tensor"):
        check_finite(torch.tensor(1.0), "x")
