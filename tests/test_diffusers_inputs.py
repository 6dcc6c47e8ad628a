"""FusedDDIMScheduler inputs: timestep kinds, no host reads of tensors per step, bad input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler  # noqa: E402

from ddim_fused.diffusers import FusedDDIMScheduler  # noqa: E402


def _pair(steps=10, **config):
    stock, fused = DDIMScheduler(**config), FusedDDIMScheduler(**config)
    stock.set_timesteps(steps)
    fused.set_timesteps(steps)
    return stock, fused


def _inputs(shape=(2, 3, 4, 4)):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


TIMESTEP_KINDS = {
    "int": lambda s, i: int(s.timesteps[i]),
    "numpy-int64": lambda s, i: np.int64(s.timesteps[i]),
    "float": lambda s, i: float(s.timesteps[i]),
    "schedule-view": lambda s, i: s.timesteps[i],
    "schedule-slice-view": lambda s, i: s.timesteps[i:][0],
    "1-elem-view": lambda s, i: s.timesteps[i:i + 1],
    "fresh-long-tensor": lambda s, i: torch.tensor(int(s.timesteps[i])),
    "fresh-float-tensor": lambda s, i: torch.tensor(float(s.timesteps[i])),
}


@pytest.mark.parametrize("kind", list(TIMESTEP_KINDS.values()), ids=list(TIMESTEP_KINDS))
def test_timestep_kinds_give_diffusers_result(kind):
    stock, fused = _pair(clip_sample=False)
    x, m = _inputs()
    for i in (0, 4, 9):
        want = stock.step(m, int(stock.timesteps[i]), x).prev_sample
        got = fused.step(m, kind(fused, i), x).prev_sample
        assert torch.equal(got, fused.step(m, int(fused.timesteps[i]), x).prev_sample)
        assert ((got - want).abs().max() / want.abs().max()) < 1e-5


def test_off_schedule_training_timestep_behaves_like_diffusers():
    """diffusers accepts any training time step (prev = t - T // steps); so does the fused step."""
    stock, fused = _pair(clip_sample=False)
    x, m = _inputs()
    for t in (0, 37, 555, 999):
        want = stock.step(m, t, x).prev_sample
        got = fused.step(m, t, x).prev_sample
        assert ((got - want).abs().max() / want.abs().max()) < 1e-5


def test_modified_schedule_tensor_is_not_trusted():
    """After an in-place edit of scheduler.timesteps the host copy is stale: values are read."""
    stock, fused = _pair(clip_sample=False)
    x, m = _inputs()
    for s in (stock, fused):
        s.timesteps -= 1
    want = stock.step(m, stock.timesteps[0], x).prev_sample
    got = fused.step(m, fused.timesteps[0], x).prev_sample
    assert ((got - want).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.parametrize("config", [dict(clip_sample=False), dict(thresholding=True), dict()],
                         ids=["linear", "threshold", "clip"])
def test_schedule_loop_reads_no_tensor_value_on_the_host(config, monkeypatch):
    """Stepping with scheduler.timesteps' own elements never reads a tensor value in Python.

    On a GPU each such read (item, int, float, bool, tolist, numpy) is a host sync; the
    patch makes any of them fail here, on the CPU, where the same code runs.
    """
    s = FusedDDIMScheduler(**config)
    s.set_timesteps(8)
    x, m = _inputs()
    gen = torch.Generator().manual_seed(0)

    def forbidden(self, *args, **kwargs):
        raise AssertionError("a tensor value was read on the host during step()")

    for name in ("item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for t in s.timesteps:
        x = s.step(m, t, x, eta=0.5, generator=gen).prev_sample
    monkeypatch.undo()
    assert torch.isfinite(x).all()


def test_importing_ddim_fused_does_not_import_diffusers():
    code = "import sys, ddim_fused; assert 'diffusers' not in sys.modules, 'diffusers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_step_before_set_timesteps_raises():
    x, m = _inputs()
    with pytest.raises(ValueError, match="set_timesteps"):
        FusedDDIMScheduler().step(m, 10, x)


@pytest.mark.parametrize("n", [0, -3])
def test_set_timesteps_rejects_non_positive(n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        FusedDDIMScheduler().set_timesteps(n)


def test_set_timesteps_rejects_more_than_training_steps_like_diffusers():
    with pytest.raises(ValueError):
        DDIMScheduler(num_train_timesteps=100).set_timesteps(101)
    with pytest.raises(ValueError, match="num_inference_steps"):
        FusedDDIMScheduler(num_train_timesteps=100).set_timesteps(101)
    with pytest.raises(TypeError, match="num_inference_steps"):
        FusedDDIMScheduler().set_timesteps(10.0)


BAD_TIMESTEPS = {
    "too-large": (1000, ValueError, "outside"),
    "negative": (-1, ValueError, "outside"),
    "fractional": (500.5, ValueError, "whole"),
    "tensor-2-elems": (torch.tensor([900, 800]), ValueError, "single"),
    "string": ("900", TypeError, "timestep"),
    "bool": (True, TypeError, "bool"),
    "none": (None, TypeError, "timestep"),
}


@pytest.mark.parametrize("case", list(BAD_TIMESTEPS.values()), ids=list(BAD_TIMESTEPS))
def test_bad_timestep_raises(case):
    value, exc, match = case
    _, fused = _pair()
    x, m = _inputs()
    with pytest.raises(exc, match=match):
        fused.step(m, value, x)


def test_bad_tensors_raise():
    _, fused = _pair()
    x, m = _inputs()
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 3, 4, 5\)"):
        fused.step(torch.randn(2, 3, 4, 5), 901, x)
    with pytest.raises(TypeError, match="sample must be a torch.Tensor"):
        fused.step(m, 901, x.numpy())
    with pytest.raises(TypeError, match="floating-point"):
        fused.step(m.long(), 901, x)
    with pytest.raises(ValueError, match="eta"):
        fused.step(m, 901, x, eta=-0.5)
    with pytest.raises(ValueError, match="variance_noise has shape"):
        fused.step(m, 901, x, eta=0.5, variance_noise=torch.randn(3, 3, 4, 4))


def test_generator_and_variance_noise_together_raise_like_diffusers():
    stock, fused = _pair()
    x, m = _inputs()
    kw = dict(eta=0.5, generator=torch.Generator(), variance_noise=torch.randn_like(x))
    with pytest.raises(ValueError):
        stock.step(m, 901, x, **kw)
    with pytest.raises(ValueError, match="generator or variance_noise"):
        fused.step(m, 901, x, **kw)


def test_backend_is_validated():
    s = FusedDDIMScheduler()
    with pytest.raises(ValueError, match="backend"):
        s.backend = "cuda"
    s.backend = "torch"
    assert s.backend == "torch" and FusedDDIMScheduler().backend == "auto"


def test_noise_the_kernel_cannot_read_is_expanded_once_for_it(device):
    # One strided-input policy for every caller (ddim_fused.backend): the kernel gets a
    # contiguous copy of noise broadcast over channels, and computes what torch computes.
    _, fused = _pair(clip_sample=False)
    x, m = (t.to(device) for t in _inputs())
    noise = torch.randn(2, 1, 4, 4).to(device)
    fused.backend = "torch"
    want = fused.step(m, 901, x, eta=0.5, variance_noise=noise).prev_sample
    fused.backend = "triton"
    got = fused.step(m, 901, x, eta=0.5, variance_noise=noise).prev_sample
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous()
    torch.testing.assert_close(fused.step(m, 901, strided, eta=0.5, variance_noise=noise).prev_sample, want,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eta, err, match", [
    ([1], TypeError, "eta must be a float"),
    (10**400, ValueError, "eta must be finite"),
    (float("nan"), ValueError, "eta must be finite"),
    (1.5, ValueError, "eta=1.5 makes the noise variance exceed"),
])
def test_bad_eta_is_named_where_diffusers_would_fail_or_return_nan(eta, err, match):
    stock, fused = _pair()
    sample, model_output = _inputs()
    if eta == 1.5:  # stock diffusers returns NaN here
        prev = stock.step(model_output, stock.timesteps[0], sample, eta=1.5,
                          generator=torch.Generator().manual_seed(0)).prev_sample
        assert torch.isnan(prev).any()
    with pytest.raises(err, match=match):
        fused.step(model_output, fused.timesteps[0], sample, eta=eta, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("eta", [0.0])  # at eta > 0 diffusers' own noise draw fails on a 0-d sample
def test_a_0d_sample_steps_as_in_diffusers(eta):
    stock, fused = _pair()
    sample, model_output = torch.tensor(0.7), torch.tensor(-0.3)
    want = stock.step(model_output, stock.timesteps[2], sample, eta=eta, generator=torch.Generator().manual_seed(3))
    got = fused.step(model_output, fused.timesteps[2], sample, eta=eta, generator=torch.Generator().manual_seed(3))
    for w, g in ((want.prev_sample, got.prev_sample), (want.pred_original_sample, got.pred_original_sample)):
        assert g.shape == () and torch.allclose(g, w, rtol=1e-5, atol=1e-6), (g, w)


@pytest.mark.parametrize("kwargs, match", [
    (dict(return_dict="no"), "return_dict must be a bool"),
    (dict(use_clipped_model_output="no"), "use_clipped_model_output must be a bool"),
    (dict(eta=0.5, generator=5), "generator must be a torch.Generator"),
])
def test_step_flags_and_generator_are_checked(kwargs, match):
    _, fused = _pair()
    sample, model_output = _inputs()
    with pytest.raises(TypeError, match=match):
        fused.step(model_output, fused.timesteps[0], sample, **kwargs)
    # DDIMPipeline passes use_clipped_model_output=None for "not set".
    fused.step(model_output, fused.timesteps[0], sample, use_clipped_model_output=None)
