"""use_fused on real diffusers pipelines, config round trips, from_config across schedulers."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMInverseScheduler,
    DDIMPipeline,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
)

from ddim_fused.diffusers import FusedDDIMInverseScheduler, FusedDDIMScheduler, use_fused  # noqa: E402
from tests.helpers import FP32_RTOL, assert_close, error_vs  # noqa: E402


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def _same_config(a, b):
    strip = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert strip(a) == strip(b)


@pytest.fixture
def fp32_draws(monkeypatch):
    """Draw every random tensor in float32, then cast: a float64 run then sees the same noise."""
    from diffusers.pipelines.ddim import pipeline_ddim
    from diffusers.schedulers import scheduling_ddim

    import ddim_fused.diffusers as fused_module

    original = scheduling_ddim.randn_tensor

    def draw(shape, generator=None, device=None, dtype=None, **kwargs):
        return original(shape, generator=generator, device=device, dtype=torch.float32, **kwargs).to(dtype)

    for module in (pipeline_ddim, scheduling_ddim, fused_module):
        monkeypatch.setattr(module, "randn_tensor", draw)


def _shadow_every_step(scheduler):
    """Make every step() of `scheduler` also run diffusers' DDIMScheduler.step on the same inputs.

    Returns the list of (max rel err prev_sample, of pred_original_sample) per call; each
    call must agree within FP32_RTOL. A generator is cloned so both draw the same noise.
    """
    shadow, fused_step, errors = DDIMScheduler.from_config(scheduler.config), scheduler.step, []

    def step(model_output, timestep, sample, **kwargs):
        if shadow.num_inference_steps != scheduler.num_inference_steps:
            shadow.set_timesteps(scheduler.num_inference_steps)
        shadow_kwargs = dict(kwargs)
        if kwargs.get("generator") is not None:
            shadow_kwargs["generator"] = torch.Generator().set_state(kwargs["generator"].get_state())
        want = shadow.step(model_output, timestep, sample, **shadow_kwargs)
        got = fused_step(model_output, timestep, sample, **kwargs)
        errs = []
        for name in ("prev_sample", "pred_original_sample"):
            a, b = getattr(got, name), getattr(want, name)
            assert_close(a, b, rtol=FP32_RTOL, name=f"t={int(timestep)} {name}")
            errs.append(((a - b).abs().max() / b.abs().max()).item())
        errors.append(tuple(errs))
        return got

    scheduler.step = step
    return errors


# (scheduler config, pipeline call, whether the final images must agree within 1e-5)
PIPELINE_CASES = {
    # Default DDIM config: eps-model with clip_sample. At high noise pred_x0 divides by
    # sqrt(alpha_t) ~ 0.03, so two fp32 runs of the same loop drift apart by their
    # rounding (~5e-5 of the image range here, diffusers against float64 alike); the
    # images are judged against the float64 run, each step against diffusers' step.
    "eta0-eps-clip": (dict(), dict(eta=0.0), False),
    "eta0.5-gen-clipped-v": (dict(prediction_type="v_prediction"), dict(eta=0.5, use_clipped_model_output=True), True),
}


@pytest.mark.parametrize("case", list(PIPELINE_CASES.values()), ids=list(PIPELINE_CASES))
def test_ddim_pipeline_images_unchanged_by_use_fused(case, fp32_draws):
    config, call, direct = case
    pipe = DDIMPipeline(unet=_tiny_unet(), scheduler=DDIMScheduler(**config))
    pipe.set_progress_bar_config(disable=True)

    def images():
        kw = dict(batch_size=2, num_inference_steps=15, output_type="pt", **call)
        return pipe(generator=torch.Generator().manual_seed(0), **kw).images

    stock = images()
    pipe.unet.double()
    exact = images()
    pipe.unet.float()
    stock_config = dict(pipe.scheduler.config)
    assert use_fused(pipe) is pipe
    assert type(pipe.scheduler) is FusedDDIMScheduler
    _same_config(pipe.scheduler.config, stock_config)
    step_errors = _shadow_every_step(pipe.scheduler)
    fused = images()
    assert len(step_errors) == 15
    err_f, err_s = error_vs(fused, exact), error_vs(stock, exact)
    # Both fp32 loops carry the same kind of rounding drift: over five UNet seeds the
    # ratio err_f / err_s of the eps-clip case ranged 0.8-1.8.
    assert err_f <= 3 * err_s + 1e-6, f"images: fused rel RMS err {err_f:.2e} vs float64, diffusers fp32 {err_s:.2e}"
    if direct:
        assert_close(fused, stock, rtol=FP32_RTOL, name="DDIMPipeline images")


class _InversionPipe(DiffusionPipeline):
    """A minimal pipeline holding a sampling and an inversion scheduler (as DiffEdit does)."""

    def __init__(self, scheduler, inverse_scheduler):
        super().__init__()
        self.register_modules(scheduler=scheduler, inverse_scheduler=inverse_scheduler)


def test_use_fused_replaces_inverse_scheduler_and_round_trips(tmp_path):
    pipe = _InversionPipe(DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False),
                          DDIMInverseScheduler(timestep_spacing="trailing"))
    old = {n: dict(getattr(pipe, n).config) for n in ("scheduler", "inverse_scheduler")}
    use_fused(pipe, backend="torch")
    assert type(pipe.scheduler) is FusedDDIMScheduler and type(pipe.inverse_scheduler) is FusedDDIMInverseScheduler
    assert pipe.scheduler.backend == pipe.inverse_scheduler.backend == "torch"
    for name, config in old.items():
        _same_config(getattr(pipe, name).config, config)
    same = pipe.scheduler
    assert use_fused(pipe).scheduler is same  # already fused: kept
    pipe.save_pretrained(tmp_path)
    loaded = _InversionPipe.from_pretrained(tmp_path)  # saved under the stock names: loads as stock
    assert type(loaded.scheduler) is DDIMScheduler and type(loaded.inverse_scheduler) is DDIMInverseScheduler
    use_fused(loaded)
    assert type(loaded.scheduler) is FusedDDIMScheduler and type(loaded.inverse_scheduler) is FusedDDIMInverseScheduler
    for name in ("scheduler", "inverse_scheduler"):
        _same_config(getattr(loaded, name).config, getattr(pipe, name).config)


def test_use_fused_refuses_non_ddim_scheduler_unless_converting():
    pipe = DDIMPipeline(unet=_tiny_unet(), scheduler=DDIMScheduler())
    pipe.scheduler = PNDMScheduler(beta_schedule="scaled_linear", steps_offset=1)
    with pytest.raises(TypeError, match="PNDMScheduler.*convert=True"):
        use_fused(pipe)
    with pytest.raises(TypeError, match="convert must be a bool"):
        use_fused(pipe, convert="no")  # a string is not False
    assert type(pipe.scheduler) is PNDMScheduler
    use_fused(pipe, convert=True)
    assert type(pipe.scheduler) is FusedDDIMScheduler
    _same_config(pipe.scheduler.config, DDIMScheduler.from_config(PNDMScheduler(beta_schedule="scaled_linear",
                                                                                 steps_offset=1).config).config)


def test_use_fused_refuses_a_ddim_subclass_with_its_own_step():
    class CustomDDIM(DDIMScheduler):
        def step(self, *args, **kwargs):
            return super().step(*args, **kwargs)

    pipe = DDIMPipeline(unet=_tiny_unet(), scheduler=DDIMScheduler())
    pipe.scheduler = CustomDDIM()
    with pytest.raises(TypeError, match="CustomDDIM"):
        use_fused(pipe, convert=True)


def test_use_fused_bad_arguments():
    with pytest.raises(TypeError, match="scheduler"):
        use_fused(object())
    pipe = DDIMPipeline(unet=_tiny_unet(), scheduler=DDIMScheduler())
    with pytest.raises(ValueError, match="backend"):
        use_fused(pipe, backend="gpu")


def _loop(s, steps=10):
    s.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    x, outs = torch.randn(1, 3, 8, 8, generator=gen), []
    for t in s.timesteps:
        x = s.step(torch.tanh(x + t / 1000), t, x, eta=0.3, generator=gen).prev_sample
        outs.append(x)
    return outs


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    config = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", thresholding=True,
                  sample_max_value=1.5, timestep_spacing="trailing", steps_offset=1, set_alpha_to_one=False)
    fused = FusedDDIMScheduler(**config)
    fused.save_pretrained(tmp_path / "fused")
    again = FusedDDIMScheduler.from_pretrained(tmp_path / "fused")
    stock_from_fused = DDIMScheduler.from_pretrained(tmp_path / "fused")
    DDIMScheduler(**config).save_pretrained(tmp_path / "stock")
    fused_from_stock = FusedDDIMScheduler.from_pretrained(tmp_path / "stock")
    assert type(again) is FusedDDIMScheduler and type(fused_from_stock) is FusedDDIMScheduler
    for other in (again, stock_from_fused, fused_from_stock):
        _same_config(other.config, fused.config)
    ref = _loop(stock_from_fused)
    for s in (again, fused_from_stock):
        for a, b in zip(_loop(s), ref):
            assert_close(a, b, rtol=FP32_RTOL)


SHARED = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
              steps_offset=1, timestep_spacing="trailing")
OTHER_SCHEDULERS = {
    "PNDM": lambda: PNDMScheduler(skip_prk_steps=True, **SHARED),
    "Euler": lambda: EulerDiscreteScheduler(**SHARED),
    "DPMSolverMultistep": lambda: DPMSolverMultistepScheduler(thresholding=True, **SHARED),
    "DDPM": lambda: DDPMScheduler(clip_sample=False, **SHARED),
    "LMS": lambda: LMSDiscreteScheduler(**SHARED),
    "DDIMInverse": lambda: DDIMInverseScheduler(clip_sample=False, **SHARED),
}


@pytest.mark.parametrize("make", list(OTHER_SCHEDULERS.values()), ids=list(OTHER_SCHEDULERS))
def test_from_config_of_ddim_compatible_schedulers(make):
    source = make().config
    fused, stock = FusedDDIMScheduler.from_config(source), DDIMScheduler.from_config(source)
    assert type(fused) is FusedDDIMScheduler
    _same_config(fused.config, stock.config)
    assert fused.config.prediction_type == "v_prediction" and fused.config.steps_offset == 1
    for a, b in zip(_loop(fused), _loop(stock)):
        assert_close(a, b, rtol=FP32_RTOL)
