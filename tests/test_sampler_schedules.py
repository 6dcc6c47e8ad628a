"""DDIMSampler's diffusers schedule options against diffusers' own DDIMScheduler loop.

Prediction types, clip_sample, thresholding, timestep spacings with diffusers' rule for
the step's target (prev_timestep="ratio"), set_alpha_to_one, steps_offset and zero
terminal SNR; plus initial_noise, the two-launch step's invariants and bad options.
"""
import numpy as np
import pytest
import torch

from ddim_fused import DDIMSampler, initial_noise
from ddim_fused.backend import kernels
from ddim_fused.schedules import make_alpha_bar
from ddim_fused.x0_clip import X0Limit
from tests.byo_models import diffusers, needs_diffusers
from tests.helpers import assert_close

SHAPE = (3, 2, 4, 4)
LINEAR = make_alpha_bar("linear")


class Model:
    """A nonlinear model in the sampler protocol that also serves diffusers' loop (t scalar or (B,))."""

    def __init__(self, alpha_bar, prediction_type=None):
        self.alpha_bar, self.n_steps = alpha_bar, len(alpha_bar)
        if prediction_type is not None:
            self.prediction_type = prediction_type

    def __call__(self, x, t, cond):
        t = t.to(torch.float32).reshape(-1, *[1] * (x.dim() - 1)) / 1000
        out = torch.tanh(0.7 * x + t) * 1.3
        return out if cond is None else out + 0.3 * cond.view(-1, *[1] * (x.dim() - 1))


def diffusers_loop(scheduler, model, x, steps, cond=None, uncond=None, scale=1.0):
    scheduler.set_timesteps(steps, device=x.device)
    for t in scheduler.timesteps:
        tb = t.view(1).expand(x.shape[0])
        out = model(x, tb, cond)
        if uncond is not None:
            out_u = model(x, tb, uncond)
            out = out_u + scale * (out - out_u)
        x = scheduler.step(out, t, x).prev_sample
    return x


def sampler_for(scheduler, model, steps, **kw):
    c = scheduler.config
    return DDIMSampler(model, steps, c.timestep_spacing, 0.0, alpha_bar=scheduler.alphas_cumprod.double().numpy(),
                       steps_offset=c.steps_offset, set_alpha_to_one=c.set_alpha_to_one, prev_timestep="ratio",
                       prediction_type=c.prediction_type, clip_sample=c.clip_sample,
                       clip_sample_range=c.clip_sample_range, thresholding=c.thresholding,
                       dynamic_thresholding_ratio=c.dynamic_thresholding_ratio,
                       sample_max_value=c.sample_max_value, **kw)


@needs_diffusers
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("limit", ["none", "clip", "threshold"])
def test_sample_equals_diffusers_ddim_loop(prediction_type, spacing, offset, limit):
    scheduler = diffusers.DDIMScheduler(prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset,
                                        clip_sample=limit == "clip", clip_sample_range=0.8,
                                        thresholding=limit == "threshold", dynamic_thresholding_ratio=0.9,
                                        sample_max_value=1.5, set_alpha_to_one=spacing != "linspace")
    model = Model(scheduler.alphas_cumprod.double().numpy())
    sampler = sampler_for(scheduler, model, 7, backend="torch")
    scheduler.set_timesteps(7)
    assert sampler.time_steps.tolist() == scheduler.timesteps.flip(0).tolist()
    x = initial_noise(SHAPE, 5)
    ours = sampler.sample(SHAPE, None, x_last=x)
    assert_close(ours, diffusers_loop(scheduler, model, x, 7), rtol=2e-5, name=f"{prediction_type} {spacing} {limit}")


@needs_diffusers
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_clipped_guided_kernel_step_equals_diffusers(prediction_type, device):
    """The two-launch step on the Triton kernel (interpreter on a CPU), with guidance."""
    scheduler = diffusers.DDIMScheduler(prediction_type=prediction_type, clip_sample=True)
    model = Model(scheduler.alphas_cumprod.double().numpy())
    sampler = sampler_for(scheduler, model, 4, backend="triton")
    x = initial_noise(SHAPE, 2, device=device)
    cond, uncond = torch.tensor([0.5, -1.0, 2.0], device=device), torch.zeros(3, device=device)
    ours = sampler.sample(SHAPE, cond, x_last=x, uncond_scale=2.5, uncond_cond=uncond)
    ref = diffusers_loop(scheduler, model, x, 4, cond, uncond, 2.5)
    assert_close(ours, ref, rtol=2e-5)


@pytest.mark.parametrize("limit", [dict(clip_sample=True, clip_sample_range=0.6),
                                   dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=1.3)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_limited_step_kernel_equals_torch_path(prediction_type, limit, device):
    """Both launches of a limited step, with guidance, keyed noise and paint: kernel vs torch ops."""
    model = Model(LINEAR)
    runs = []
    for backend in ("triton", "torch"):
        sampler = DDIMSampler(model, 5, "uniform", 0.5, prediction_type=prediction_type, backend=backend, seed=4,
                              **limit)
        cond, uncond = torch.tensor([0.5, -1.0, 2.0], device=device), torch.zeros(3, device=device)
        x = sampler.sample(SHAPE, cond, uncond_scale=2.0, uncond_cond=uncond, device=device)
        mask = torch.zeros(SHAPE[0], 1, 4, 4, device=device)
        mask[..., :2] = 1
        painted = sampler.paint(sampler.q_sample(x, 2, seed=5), cond, 3, orig=x, mask=mask, seed=5)
        runs.append((x, painted))
    # Two float32 evaluations of the same formulas (the kernel fuses multiply-adds, the torch
    # path's C kernel rounds every product) through five steps: a few units in the last place.
    # A compiled kernel's noise is also within NOISE_ATOL of the torch path's, per step.
    atol = 2 * kernels().noise.NOISE_ATOL[True] if x.is_cuda else 0.0
    assert_close(runs[0][0], runs[1][0], rtol=3e-6, atol=atol)
    assert_close(runs[0][1], runs[1][1], rtol=3e-6, atol=atol)


@needs_diffusers
def test_zero_terminal_snr_v_prediction_equals_diffusers():
    scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                        rescale_betas_zero_snr=True, beta_schedule="scaled_linear", clip_sample=False)
    alpha_bar = scheduler.alphas_cumprod.double().numpy()
    assert alpha_bar[-1] == 0.0
    model = Model(alpha_bar)
    x = initial_noise(SHAPE, 9)
    ours = sampler_for(scheduler, model, 10, backend="torch").sample(SHAPE, None, x_last=x)
    assert_close(ours, diffusers_loop(scheduler, model, x, 10), rtol=2e-5)
    # An epsilon model cannot give pred_x0 at alpha_bar = 0: refused, naming the step.
    with pytest.raises(ValueError, match="time step 999.*zero terminal SNR"):
        DDIMSampler(model, 10, "trailing", alpha_bar=alpha_bar, prediction_type="epsilon")


@pytest.mark.parametrize("spacing", ["uniform", "leading"])
def test_ratio_rule_equals_previous_step_rule_where_they_agree(spacing):
    model = Model(LINEAR)
    a = DDIMSampler(model, 20, spacing, prev_timestep="previous")
    b = DDIMSampler(model, 20, spacing, prev_timestep="ratio")
    assert np.array_equal(a.coefs.alpha_prev[1:], b.coefs.alpha_prev[1:])


def test_ratio_rule_differs_for_trailing_as_diffusers_does():
    model = Model(LINEAR)
    previous = DDIMSampler(model, 3, "trailing", prev_timestep="previous")
    ratio = DDIMSampler(model, 3, "trailing", prev_timestep="ratio")
    # time steps 332, 666, 999: diffusers steps from 666 to 666 - 1000 // 3 = 333, not to 332.
    assert previous.time_steps.tolist() == [332, 666, 999]
    assert ratio.coefs.alpha_prev[1] == model.alpha_bar[333] != previous.coefs.alpha_prev[1]


def test_prediction_type_comes_from_the_model():
    model = Model(LINEAR, prediction_type="v_prediction")
    assert DDIMSampler(model, 5).prediction_type == "v_prediction"
    assert DDIMSampler(model, 5, prediction_type="epsilon").prediction_type == "epsilon"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_a_clip_that_never_binds_changes_nothing(prediction_type):
    """Two launches around a no-op clip = one launch: guidance, keyed noise (eta > 0), paint."""
    model = Model(LINEAR)
    common = dict(prediction_type=prediction_type, backend="torch", seed=3)
    one = DDIMSampler(model, 6, "uniform", 0.7, **common)
    two = DDIMSampler(model, 6, "uniform", 0.7, clip_sample=True, clip_sample_range=1e6, **common)
    cond, uncond = torch.tensor([0.5, -1.0, 2.0]), torch.zeros(3)
    kw = dict(uncond_scale=2.0, uncond_cond=uncond, sample_offset=4)
    assert_close(two.sample(SHAPE, cond, **kw), one.sample(SHAPE, cond, **kw), rtol=1e-5)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(SHAPE[0], 1, 4, 4)
    mask[..., :2, :] = 1
    x = one.q_sample(x0, 3, seed=1)
    painted = [s.paint(x, cond, 4, orig=x0, mask=mask, seed=1, **kw) for s in (one, two)]
    assert_close(painted[1], painted[0], rtol=1e-5)


def test_clipped_step_reports_the_clipped_pred_x0():
    model = Model(LINEAR)
    seen = []
    DDIMSampler(model, 5, clip_sample=True, clip_sample_range=0.25).sample(
        SHAPE, None, seed=0, callback=lambda info: seen.append(info["pred_x0"].abs().max().item()))
    assert len(seen) == 5 and max(seen) <= 0.25


@needs_diffusers
def test_thresholding_equals_diffusers():
    scheduler = diffusers.DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=2.0)
    x0 = 3 * torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    limit = X0Limit.from_options(False, 1.0, True, 0.8, 2.0)
    for dtype in (torch.float32, torch.bfloat16):
        ours = limit(x0.to(dtype).clone())
        assert ours.dtype == dtype
        assert_close(ours.float(), scheduler._threshold_sample(x0.to(dtype)).float(), rtol=1e-6)


def test_initial_noise_is_what_sample_starts_from():
    model = Model(LINEAR)
    sampler = DDIMSampler(model, 4, seed=11)
    x_t = initial_noise((2, 1, 3, 3), 11, sample_offset=5)
    # Start from it explicitly: the same result.
    assert torch.equal(sampler.sample((2, 1, 3, 3), None, sample_offset=5),
                       sampler.sample((2, 1, 3, 3), None, x_last=x_t))
    # Row b is sample sample_offset + b whatever the batch.
    assert torch.equal(initial_noise((1, 1, 3, 3), 11, sample_offset=6)[0], x_t[1])
    assert initial_noise((2, 3), 1, dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(shape=(0, 3)), ValueError, "shape"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(sample_offset=2**32), ValueError, "sample_offset"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
])
def test_initial_noise_bad_arguments(kwargs, err, match):
    args = dict(shape=(2, 3), seed=0)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        initial_noise(args.pop("shape"), args.pop("seed"), **args)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(prediction_type="x0"), ValueError, "prediction_type"),
    (dict(prev_timestep="next"), ValueError, "prev_timestep"),
    (dict(clip_sample=True, clip_sample_range=0.0), ValueError, "clip_sample_range"),
    (dict(clip_sample="yes"), TypeError, "clip_sample"),
    (dict(thresholding=True, dynamic_thresholding_ratio=1.5), ValueError, "dynamic_thresholding_ratio"),
    (dict(thresholding=True, sample_max_value=0.5), ValueError, "sample_max_value"),
])
def test_bad_schedule_options(kwargs, err, match):
    model = Model(LINEAR)
    with pytest.raises(err, match=match):
        DDIMSampler(model, 5, **kwargs)


def test_a_sample_model_cannot_invert_from_alpha_one():
    model = Model(LINEAR, prediction_type="sample")
    sampler = DDIMSampler(model, 5, set_alpha_to_one=True)
    with pytest.raises(ValueError, match="cannot be inverted"):
        sampler.invert(torch.zeros(SHAPE), None)
