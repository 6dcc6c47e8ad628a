"""FusedDDIMScheduler against diffusers' DDIMScheduler: every config option and step argument.

Two kinds of comparison, both over full loops:
- paired: at every step both schedulers get the same inputs (diffusers' trajectory);
  prev_sample and pred_original_sample must agree within FP32_RTOL (1e-5) of max|stock|.
- own trajectory: each runs its own fp32 loop; both are measured against diffusers run
  in float64, and the fused error must be at most twice diffusers' own.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler  # noqa: E402

from ddim_fused.diffusers import FusedDDIMScheduler  # noqa: E402
from tests.helpers import FP32_RTOL, assert_close, scheduler_dummy_model, scheduler_dummy_sample  # noqa: E402

T = 1000

# One entry per config option of DDIMScheduler (and the combinations that matter):
# beta schedules, prediction types with/without clipping, thresholding, the alpha-one
# rule, steps_offset, the three spacings, zero-terminal-SNR rescaling.
CONFIGS = {
    "linear-eps-clip": dict(),
    "linear-eps-noclip": dict(clip_sample=False),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    "cosine": dict(beta_schedule="squaredcos_cap_v2", clip_sample=False),
    "trained_betas": dict(trained_betas=np.linspace(2e-4, 0.03, T).tolist(), clip_sample=False),
    "sample-clip": dict(prediction_type="sample"),
    "sample-noclip": dict(prediction_type="sample", clip_sample=False),
    "v-clip": dict(prediction_type="v_prediction"),
    "v-noclip": dict(prediction_type="v_prediction", clip_sample=False),
    "clip-range0.5": dict(clip_sample_range=0.5),
    "threshold-eps": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    "threshold-v": dict(thresholding=True, prediction_type="v_prediction", sample_max_value=2.0),
    "threshold-sample": dict(thresholding=True, prediction_type="sample", dynamic_thresholding_ratio=0.8),
    "alpha-not-one": dict(set_alpha_to_one=False, beta_start=0.01, clip_sample=False),
    "steps_offset1": dict(steps_offset=1, clip_sample=False),
    "trailing": dict(timestep_spacing="trailing", clip_sample=False),
    "linspace": dict(timestep_spacing="linspace", clip_sample=False),
    "zero-snr-v-trailing": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                timestep_spacing="trailing", clip_sample=False),
    "zero-snr-eps-leading": dict(rescale_betas_zero_snr=True),
}

# Every step() argument: eta, use_clipped_model_output, the two noise sources, return_dict.
STEP_ARGS = {
    "eta0": dict(eta=0.0),
    "eta0.3-gen": dict(eta=0.3, noise="generator"),
    "eta1-noise-clipped": dict(eta=1.0, noise="variance_noise", use_clipped_model_output=True),
    "eta0.7-noise1-tuple": dict(eta=0.7, noise="variance_noise_b1", return_dict=False),
}


def model_fn(weight):
    """A deterministic nonlinear 'model' of (x, t); t may be a tensor or a number."""
    def model(x, t):
        t = torch.as_tensor(t).to(x.dtype)
        return torch.tanh(0.8 * x + weight * (t / T)) + 0.1 * x
    return model


def _draw_noise(kind, shape, gen, dtype):
    b = 1 if kind == "variance_noise_b1" else shape[0]
    return torch.randn((b,) + tuple(shape[1:]), generator=gen).to(dtype)


def _rel(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def paired_errors(config, steps=12, eta=0.0, noise=None, use_clipped_model_output=False, return_dict=True,
                  shape=(2, 3, 8, 8), fused_backend="torch", check=True, device="cpu"):
    """Step both schedulers from the same inputs along diffusers' own trajectory.

    Returns (max rel err of prev_sample, of pred_original_sample) over all steps, each
    max|fused - stock| / max|stock|; with check=True every step must pass assert_close
    at FP32_RTOL. Generator noise comes from two identically seeded generators.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    model = model_fn(torch.randn(shape[1:], generator=gen).to(device))
    stock, fused = DDIMScheduler(**config), FusedDDIMScheduler(**config)
    fused.backend = fused_backend
    stock.set_timesteps(steps)
    fused.set_timesteps(steps)
    assert torch.equal(stock.timesteps, fused.timesteps)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    worst = [0.0, 0.0]
    for i, t in enumerate(fused.timesteps):
        kws = dict(eta=eta, use_clipped_model_output=use_clipped_model_output, return_dict=return_dict)
        kwf = dict(kws)
        if noise == "generator":
            kws["generator"], kwf["generator"] = gens
        elif noise is not None:
            kws["variance_noise"] = kwf["variance_noise"] = _draw_noise(noise, shape, gen, x.dtype).to(device)
        m = model(x, t)
        # stock gets its own tensor of the schedule, fused the loop variable (a view).
        out_s = stock.step(m, stock.timesteps[i], x, **kws)
        out_f = fused.step(m, t, x, **kwf)
        assert isinstance(out_f, tuple) != return_dict
        if return_dict:
            out_s = (out_s.prev_sample, out_s.pred_original_sample)
            out_f = (out_f.prev_sample, out_f.pred_original_sample)
        # Epsilon prediction: pred_x0 = (x - sqrt(1-a) eps) / sqrt(a), so a rounding of x's
        # terms is amplified by 1/sqrt(a) (12x at t=960), beyond FP32_RTOL of a clipped
        # pred_x0's own scale. (v and sample prediction do not divide by sqrt(a).)
        x0_atol = 0.0
        if stock.config.prediction_type == "epsilon" and stock.alphas_cumprod[int(t)] > 0:
            x0_atol = 8 * torch.finfo(torch.float32).eps * x.abs().max().item() / stock.alphas_cumprod[int(t)].item() ** 0.5
        for k, name in enumerate(("prev_sample", "pred_original_sample")):
            if check:
                assert_close(out_f[k], out_s[k], rtol=FP32_RTOL, atol=x0_atol if k else 0.0,
                             name=f"step {i} (t={int(t)}) {name}")
            worst[k] = max(worst[k], _rel(out_f[k], out_s[k]))
        x = out_s[0]
    return tuple(worst)


def loop_errors(config, steps=12, eta=0.0, noise=None, use_clipped_model_output=False, shape=(2, 3, 8, 8)):
    """Full fp32 loops, each scheduler on its own trajectory, against a float64 diffusers loop.

    Returns {output name: (fused err, stock err, fused-vs-stock)}, each the max over the
    steps of max|a - b| / max|b| (b the float64 loop for the first two, stock for the last).
    """
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    w64 = torch.randn(shape[1:], generator=gen, dtype=torch.float64)
    noises = [_draw_noise(noise, shape, gen, torch.float64) if noise else None for _ in range(steps)]
    runs = []
    for cls, dtype in ((DDIMScheduler, torch.float64), (DDIMScheduler, torch.float32), (FusedDDIMScheduler, torch.float32)):
        s = cls(**config)
        s.set_timesteps(steps)
        model, x, outs = model_fn(w64.to(dtype)), x64.to(dtype), []
        for t, n in zip(s.timesteps, noises):
            kw = dict(eta=eta, use_clipped_model_output=use_clipped_model_output)
            if n is not None:
                kw["variance_noise"] = n.to(dtype)
            o = s.step(model(x, t), t, x, **kw)
            outs.append((o.prev_sample, o.pred_original_sample))
            x = o.prev_sample
        runs.append(outs)
    exact, stock, fused = runs
    result = {}
    for k, name in enumerate(("prev_sample", "pred_original_sample")):
        result[name] = tuple(max(_rel(a[i][k], b[i][k]) for i in range(steps))
                             for a, b in ((fused, exact), (stock, exact), (fused, stock)))
    return result


@pytest.mark.parametrize("step_args", list(STEP_ARGS.values()), ids=list(STEP_ARGS))
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_step_matches_diffusers(config, step_args):
    paired_errors(config, **step_args)


LOOP_ARGS = {"eta0": dict(eta=0.0), "eta0.7-noise-clipped": dict(eta=0.7, noise="variance_noise",
                                                                   use_clipped_model_output=True)}


@pytest.mark.parametrize("loop_args", list(LOOP_ARGS.values()), ids=list(LOOP_ARGS))
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_full_loop_error_vs_float64_at_most_twice_diffusers(config, loop_args):
    """On its own trajectory the fused loop is as accurate as diffusers' fp32 loop.

    Two fp32 loops drift apart by their rounding, amplified where an eps-model's
    pred_x0 divides by sqrt(alpha_t) << 1; so the bound is each one's distance to the
    float64 loop (FlashAttention's rule), not a fixed tolerance between them.
    """
    for name, (err_f, err_s, _) in loop_errors(config, **loop_args).items():
        assert err_f <= 2 * err_s + 1e-6, f"{name}: fused {err_f:.2e} vs float64, diffusers fp32 {err_s:.2e}"


@pytest.mark.parametrize("steps", [10, 50])
def test_long_loops(steps):
    paired_errors(dict(clip_sample=False), steps=steps, eta=0.5, noise="generator")
    paired_errors(dict(), steps=steps, eta=1.0, noise="generator", use_clipped_model_output=True)
    for name, (err_f, err_s, _) in loop_errors(dict(), steps=steps).items():
        assert err_f <= 2 * err_s + 1e-6, f"{name}: fused {err_f:.2e} vs float64, diffusers fp32 {err_s:.2e}"


def test_generator_stream_stays_in_step_with_diffusers():
    """After a loop the fused scheduler has drawn exactly what diffusers drew from the generator."""
    sched_gens = []
    for cls in (DDIMScheduler, FusedDDIMScheduler):
        s, g = cls(clip_sample=False), torch.Generator().manual_seed(5)
        s.set_timesteps(7)
        x = torch.randn(1, 2, 4, 4)
        for t in s.timesteps:
            x = s.step(torch.tanh(x), t, x, eta=1.0, generator=g).prev_sample
        sched_gens.append(torch.randn(3, generator=g))
    assert torch.equal(*sched_gens)


def test_eta_zero_ignores_noise_arguments():
    s = FusedDDIMScheduler(clip_sample=False)
    s.set_timesteps(10)
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    ref = s.step(m, 901, x).prev_sample
    assert torch.equal(s.step(m, 901, x, variance_noise=torch.randn(2, 3, 4, 4)).prev_sample, ref)
    assert torch.equal(s.step(m, 901, x, generator=g).prev_sample, ref)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())


def test_variance_noise_broadcast_over_channels_matches_diffusers():
    """A (H, W) noise is outside the kernel's layouts: the torch path broadcasts it like diffusers."""
    stock, fused = DDIMScheduler(clip_sample=False), FusedDDIMScheduler(clip_sample=False)
    for s in (stock, fused):
        s.set_timesteps(10)
    x, m, n = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(4, 4)
    assert_close(fused.step(m, 501, x, eta=0.8, variance_noise=n).prev_sample,
                 stock.step(m, 501, x, eta=0.8, variance_noise=n).prev_sample)


HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# The configurations whose arithmetic differs: the one-launch path (eps / v / sample,
# two beta schedules) and the two-launch path around a clip or a threshold.
HALF_CONFIGS = {
    "eps-clip": dict(),
    "eps": dict(clip_sample=False),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    "v": dict(prediction_type="v_prediction", clip_sample=False),
    "v-clip": dict(prediction_type="v_prediction"),
    "sample-clip": dict(prediction_type="sample"),
    "threshold": dict(thresholding=True, sample_max_value=1.5),
}


def _half_model(x, t, w):
    """The test model, evaluated in float32 and returned in x's dtype (as a half-precision UNet does)."""
    return (torch.tanh(0.8 * x.float() + w * (t / T)) + 0.1 * x.float()).to(x.dtype)


@pytest.mark.parametrize("eta", [0.0, 0.7], ids=["eta0", "eta0.7"])
@pytest.mark.parametrize("config", list(HALF_CONFIGS.values()), ids=list(HALF_CONFIGS))
@pytest.mark.parametrize("dtype", list(HALF_DTYPES.values()), ids=list(HALF_DTYPES))
def test_half_precision_error_vs_float32_at_most_diffusers(dtype, config, eta):
    """What "same as diffusers" means in fp16/bf16: no worse than diffusers, not equal to it.

    diffusers computes a half-precision step in the half dtype, rounding after each
    operation; the fused step computes in float32 and rounds once. Along diffusers' own
    half-precision trajectory both get the same inputs at every step, and each output is
    compared with diffusers' step evaluated in float32 on those inputs: the fused error,
    summed over the 20 steps and both outputs, must be at most diffusers'. (Measured: 0.12-0.73
    of diffusers'; single elements differ from diffusers' by a few units in the last place.)
    """
    shape, steps = (2, 4, 16, 16), 20
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape[1:], generator=gen)
    stock, fused, exact = DDIMScheduler(**config), FusedDDIMScheduler(**config), DDIMScheduler(**config)
    for s in (stock, fused, exact):
        s.set_timesteps(steps)
    sq_err_stock = sq_err_fused = sq_ref = 0.0
    for t in stock.timesteps:
        m, noise = _half_model(x, t, w), torch.randn(shape, generator=gen).to(dtype)
        ref = exact.step(m.float(), t, x.float(), eta=eta, variance_noise=noise.float())
        got_s = stock.step(m, t, x, eta=eta, variance_noise=noise)
        got_f = fused.step(m, t, x, eta=eta, variance_noise=noise)
        for name in ("prev_sample", "pred_original_sample"):
            r = getattr(ref, name).double()
            assert getattr(got_f, name).dtype == dtype
            sq_err_stock += (getattr(got_s, name).double() - r).pow(2).sum().item()
            sq_err_fused += (getattr(got_f, name).double() - r).pow(2).sum().item()
            sq_ref += r.pow(2).sum().item()
        x = got_s.prev_sample
    err_s, err_f = (sq_err_stock / sq_ref) ** 0.5, (sq_err_fused / sq_ref) ** 0.5
    assert err_f <= err_s, f"fused rel RMS err {err_f:.3e} vs float32, diffusers {err_s:.3e}"


@pytest.mark.parametrize("dtype", list(HALF_DTYPES.values()), ids=list(HALF_DTYPES))
def test_half_precision_own_loop_close_to_float32_loop(dtype):
    """Each running its own 20-step half-precision loop, the fused final sample is as close
    to a float32 diffusers loop as diffusers' half loop is, within a factor 2 (the loops
    drift apart by rounding; measured ratios 0.33-1.0)."""
    shape = (2, 4, 16, 16)
    for config in HALF_CONFIGS.values():
        gen = torch.Generator().manual_seed(1)
        x0, w = torch.randn(shape, generator=gen), torch.randn(shape[1:], generator=gen)
        noises = [torch.randn(shape, generator=gen) for _ in range(20)]
        finals = []
        for cls, dt in ((DDIMScheduler, torch.float32), (DDIMScheduler, dtype), (FusedDDIMScheduler, dtype)):
            s = cls(**config)
            s.set_timesteps(20)
            x = x0.to(dt)
            for t, n in zip(s.timesteps, noises):
                x = s.step(_half_model(x, t, w), t, x, eta=0.7, variance_noise=n.to(dt)).prev_sample
            finals.append(x.double())
        ref, stock, fused = finals
        err_s, err_f = ((stock - ref).norm() / ref.norm()).item(), ((fused - ref).norm() / ref.norm()).item()
        assert err_f <= 2 * err_s, f"{config}: fused {err_f:.2e} vs float32 loop, diffusers {err_s:.2e}"


# diffusers' published full-loop figures for DDIMScheduler, from
# huggingface/diffusers tests/schedulers/test_scheduler_ddim.py (test_full_loop_no_noise,
# test_full_loop_with_v_prediction, test_full_loop_with_set_alpha_to_one,
# test_full_loop_with_no_set_alpha_to_one, test_full_loop_with_noise), with the dummy
# sample/noise/model of tests/schedulers/test_schedulers.py (SchedulerCommonTest), rebuilt
# below. All five need no pretrained model, so all five are reproduced.
PUBLISHED_BASE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                      clip_sample=True)
PUBLISHED = {
    "no_noise": (dict(), 172.0067, 0.223967),
    "v_prediction": (dict(prediction_type="v_prediction"), 52.5302, 0.0684),
    "set_alpha_to_one": (dict(set_alpha_to_one=True, beta_start=0.01), 149.8295, 0.1951),
    "no_set_alpha_to_one": (dict(set_alpha_to_one=False, beta_start=0.01), 149.0784, 0.1941),
}


@pytest.mark.parametrize("case", list(PUBLISHED.values()), ids=list(PUBLISHED))
def test_diffusers_published_full_loops(case):
    config, want_sum, want_mean = case
    s = FusedDDIMScheduler(**{**PUBLISHED_BASE, **config})
    s.set_timesteps(10)
    sample = scheduler_dummy_sample()
    for t in s.timesteps:
        sample = s.step(scheduler_dummy_model(sample, t), t, sample, 0.0).prev_sample
    assert abs(sample.abs().sum().item() - want_sum) < 1e-2
    assert abs(sample.abs().mean().item() - want_mean) < 1e-3


def test_diffusers_published_full_loop_with_noise():
    s = FusedDDIMScheduler(**PUBLISHED_BASE)
    s.set_timesteps(10)
    timesteps = s.timesteps[8:]
    sample = s.add_noise(scheduler_dummy_sample(), scheduler_dummy_sample(flip=True), timesteps[:1])
    for t in timesteps:
        sample = s.step(scheduler_dummy_model(sample, t), t, sample, 0.0).prev_sample
    assert abs(sample.abs().sum().item() - 354.5418) < 1e-2
    assert abs(sample.abs().mean().item() - 0.4616) < 1e-3


# The Triton kernel through the CPU interpreter: slow, so tiny tensors and few steps,
# chosen to cover the single-launch path, the clipped two-launch path with
# use_clipped_model_output, thresholding with generator noise, and batch-1 noise.
KERNEL_CASES = {
    "eps-noclip-noise": (dict(clip_sample=False), dict(eta=0.5, noise="variance_noise")),
    "v-clip-clipped": (dict(prediction_type="v_prediction"), dict(eta=1.0, noise="generator",
                                                                   use_clipped_model_output=True)),
    "sample-threshold": (dict(prediction_type="sample", thresholding=True), dict(eta=0.3, noise="generator")),
    "eps-clip-noise1": (dict(), dict(eta=0.6, noise="variance_noise_b1")),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES.values()), ids=list(KERNEL_CASES))
def test_triton_kernel_matches_diffusers(case, monkeypatch, device):
    import ddim_fused.backend as backend_module

    def no_torch_path(*args, **kwargs):
        raise AssertionError("backend='triton' fell back to the torch path")

    monkeypatch.setattr(backend_module, "torch_ddim_step", no_torch_path)
    config, step_args = case
    shape = (2, 3, 8, 8) if step_args.get("noise") == "variance_noise_b1" else (1, 3, 8, 8)
    paired_errors(config, steps=3, shape=shape, fused_backend="triton", device=device, **step_args)
