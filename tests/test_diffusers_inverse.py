"""FusedDDIMInverseScheduler against diffusers' DDIMInverseScheduler (DDIM inversion)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMInverseScheduler  # noqa: E402

import ddim_fused.backend as backend_module  # noqa: E402
from ddim_fused.diffusers import FusedDDIMInverseScheduler  # noqa: E402
from tests.helpers import FP32_RTOL, assert_close  # noqa: E402

CONFIGS = {
    "default-clip": dict(),
    "eps-noclip": dict(clip_sample=False),
    # With set_alpha_to_one the first inversion step of a sample-model divides by
    # sqrt(1 - 1) = 0: diffusers returns inf there, the fused step nan; both unusable.
    "sample": dict(prediction_type="sample", set_alpha_to_one=False, clip_sample=False),
    "v-clip0.5": dict(prediction_type="v_prediction", clip_sample_range=0.5),
    "scaled_linear-trailing": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   timestep_spacing="trailing", clip_sample=False),
    "cosine-offset1": dict(beta_schedule="squaredcos_cap_v2", steps_offset=1, clip_sample=False),
    "alpha-not-one": dict(set_alpha_to_one=False, beta_start=0.01, clip_sample=False),
    "zero-snr-v": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
                       clip_sample=False),
}


def paired_inversion(config, steps=10, shape=(2, 3, 8, 8), backend="torch", return_dict=True, device="cpu"):
    """Invert along diffusers' trajectory, comparing both outputs at every step within FP32_RTOL."""
    gen = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(shape, generator=gen).to(device)
    w = torch.randn(shape[1:], generator=gen).to(device)
    stock, fused = DDIMInverseScheduler(**config), FusedDDIMInverseScheduler(**config)
    fused.backend = backend
    stock.set_timesteps(steps)
    fused.set_timesteps(steps)
    assert torch.equal(stock.timesteps, fused.timesteps)
    for i, t in enumerate(fused.timesteps):
        m = torch.tanh(x + w * t / 1000)
        out_s = stock.step(m, stock.timesteps[i], x, return_dict=return_dict)
        out_f = fused.step(m, t, x, return_dict=return_dict)
        if return_dict:
            out_s = (out_s.prev_sample, out_s.pred_original_sample)
            out_f = (out_f.prev_sample, out_f.pred_original_sample)
        for k, name in enumerate(("prev_sample", "pred_original_sample")):
            assert_close(out_f[k], out_s[k], rtol=FP32_RTOL, name=f"step {i} (t={int(t)}) {name}")
        x = out_s[0]


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_inversion_matches_diffusers(config):
    paired_inversion(config)
    paired_inversion(config, steps=25, return_dict=False)


def test_inversion_with_triton_kernel(monkeypatch, device):
    def no_torch_path(*args, **kwargs):
        raise AssertionError("backend='triton' fell back to the torch path")

    monkeypatch.setattr(backend_module, "torch_ddim_step", no_torch_path)
    paired_inversion(dict(), steps=3, shape=(1, 3, 8, 8), backend="triton", device=device)


def test_inverse_errors():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        FusedDDIMInverseScheduler().step(x, 10, x)
    s = FusedDDIMInverseScheduler()
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="outside"):
        s.step(x, 1000, x)
    with pytest.raises(ValueError, match="model_output has shape"):
        s.step(x[:, :2], 100, x)
