"""X0Limit against diffusers' own clip and dynamic thresholding of pred_x0."""
import pytest
import torch

from ddim_fused.x0_clip import X0Limit
from tests.byo_models import diffusers, needs_diffusers


def _skewed(seed: int) -> torch.Tensor:
    """(3, 2, 5, 5) pred_x0 mostly negative and beyond 1, so |x0| and x0 have different quantiles."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 2, 5, 5, generator=g) * 4.0 - 3.5


@needs_diffusers
@pytest.mark.parametrize("ratio, max_value", [(0.9, 5.0), (0.6, 2.0), (0.995, 1.0)])
def test_dynamic_thresholding_is_diffusers(ratio, max_value):
    scheduler = diffusers.DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio,
                                        sample_max_value=max_value)
    limit = X0Limit.from_options(False, 1.0, True, ratio, max_value)
    x0 = _skewed(0).double()
    want = scheduler._threshold_sample(x0.clone())
    got = limit(x0.clone())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.equal(got, x0)  # the limit changed something


@needs_diffusers
def test_clip_is_diffusers_clamp():
    limit = X0Limit.from_options(True, 1.7, False, 0.995, 1.0)
    x0 = _skewed(1)
    assert torch.equal(limit(x0.clone()), x0.clamp(-1.7, 1.7))
    assert X0Limit.from_options(False, 1.0, False, 0.995, 1.0) is None
