"""ddim_fused.k_diffusion.sample_ddim against k-diffusion's own samplers and against DDIM.

k-diffusion (PyPI k-diffusion 0.1.1.post1) is installed without its dependencies (see the
README's test command): its release pins old, heavy packages (torchvision, accelerate,
wandb, kornia, clean-fid, clip, and dctorch, which pins numpy < 2), none of which its
samplers use. `_load_k_diffusion` imports only `k_diffusion.sampling` and
`k_diffusion.external`, with their real light dependencies (scipy, torchdiffeq, torchsde,
tqdm: the test extra installs them), and stubs what is unrelated:
- the package's __init__, which imports every submodule (CLIP, which needs pkg_resources,
  kornia, wandb, the training code): a bare package object stands in for it;
- torchvision, which k_diffusion/utils.py imports for image helpers the samplers never call.
sys.modules is restored afterwards, so no stub is visible to any other test.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch

import ddim_fused.backend as backend_module
from ddim_fused.k_diffusion import KeyedNoiseSampler, keyed_noise_sampler, sample_ddim
from ddim_fused.schedules import make_alpha_bar
from tests.helpers import FP32_RTOL, assert_close

# One bf16 rounding, relative: where k-diffusion rounds an intermediate (or its noise) to
# bfloat16 and the fused step does not, results differ by about this much of their max.
BF16_ROUNDING = 2.0**-8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STEPS = 10


def _load_k_diffusion():
    """(k_diffusion.sampling, k_diffusion.external) from the installed package; see the module docstring."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1")
    stubs = {"k_diffusion": types.ModuleType("k_diffusion")}
    stubs["k_diffusion"].__path__ = list(spec.submodule_search_locations)  # a package without its __init__
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        stubs[name] = types.ModuleType(name)
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    loaded = ("k_diffusion.utils", "k_diffusion.sampling", "k_diffusion.external")
    saved = {name: sys.modules.get(name) for name in (*stubs, *loaded)}
    sys.modules.update(stubs)
    try:
        return importlib.import_module("k_diffusion.sampling"), importlib.import_module("k_diffusion.external")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def kd():
    sampling, external = _load_k_diffusion()
    return types.SimpleNamespace(sampling=sampling, external=external)


def test_stubs_do_not_outlive_the_import(kd):
    assert kd.sampling.__name__ == "k_diffusion.sampling"
    assert "k_diffusion" not in sys.modules or getattr(sys.modules["k_diffusion"], "__file__", None)
    tv = sys.modules.get("torchvision")
    assert tv is None or getattr(tv, "__file__", None) is not None


ALPHAS_CUMPROD = torch.from_numpy(make_alpha_bar("scaled_linear", 1000)).float()


class EpsModel(torch.nn.Module):
    """A discrete-time eps-model (x, t, cond) -> eps, evaluated in float32, returned in x's dtype."""

    def forward(self, x, t, cond):
        view = (-1,) + (1,) * (x.dim() - 1)
        h = 0.7 * x.float() + 0.5 * cond.float().view(view) + (t.float() / 1000).view(view)
        return torch.tanh(h).to(x.dtype)


class CompVisModel(torch.nn.Module):
    """The CompVis LatentDiffusion interface: `alphas_cumprod` and `apply_model(x, t, cond)`."""

    def __init__(self):
        super().__init__()
        self.register_buffer("alphas_cumprod", ALPHAS_CUMPROD.clone())
        self.eps = EpsModel()

    def apply_model(self, x, t, cond):
        return self.eps(x, t, cond)


WRAPPERS = {
    "DiscreteEpsDDPMDenoiser": lambda ext: ext.DiscreteEpsDDPMDenoiser(EpsModel(), ALPHAS_CUMPROD, quantize=False),
    "CompVisDenoiser": lambda ext: ext.CompVisDenoiser(CompVisModel()),
}


def _schedule(kd, denoiser, name):
    sigma_min, sigma_max = denoiser.sigma_min.item(), denoiser.sigma_max.item()
    if name == "karras":
        return kd.sampling.get_sigmas_karras(STEPS, sigma_min, sigma_max)
    return kd.sampling.get_sigmas_exponential(STEPS, sigma_min, sigma_max)


def _start(sigmas, dtype, batch=2):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, 3, 8, 8, generator=gen) * sigmas[0]).to(dtype)
    return x, {"cond": torch.linspace(-0.6, 0.6, batch)}


def _recorder(store):
    return lambda info: store.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in info.items()})


def _assert_same_run(ours, theirs, steps_ours, steps_theirs, rtol):
    assert ours.dtype == theirs.dtype
    assert_close(ours, theirs, rtol=rtol, name="final x")
    assert len(steps_ours) == len(steps_theirs) == STEPS
    for a, b in zip(steps_ours, steps_theirs):
        assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"]
        for key in ("sigma", "sigma_hat"):
            assert torch.equal(a[key], b[key])
        for key in ("x", "denoised"):
            assert_close(a[key], b[key], rtol=rtol, name=f"step {a['i']} {key}")


# --- against k-diffusion ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("wrapper", list(WRAPPERS.values()), ids=list(WRAPPERS))
def test_eta0_is_k_diffusion_sample_euler(kd, wrapper, schedule, dtype):
    denoiser = wrapper(kd.external)
    sigmas = _schedule(kd, denoiser, schedule)
    x, extra = _start(sigmas, dtype)
    x_before = x.clone()
    ours_steps, their_steps = [], []
    ours = sample_ddim(denoiser, x, sigmas, extra_args=extra, callback=_recorder(ours_steps), disable=True)
    theirs = kd.sampling.sample_euler(denoiser, x, sigmas, extra_args=extra, callback=_recorder(their_steps),
                                      disable=True)
    assert torch.equal(x, x_before)
    # bf16 x with float32 sigmas: both promote x to float32 after the first step; k-diffusion
    # rounds x - denoised of that step to bfloat16, the fused step does not.
    _assert_same_run(ours, theirs, ours_steps, their_steps, FP32_RTOL if dtype == torch.float32 else BF16_ROUNDING)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("wrapper", list(WRAPPERS.values()), ids=list(WRAPPERS))
def test_eta_positive_is_k_diffusion_sample_euler_ancestral(kd, wrapper, schedule, dtype, eta):
    """Given the same noise sampler (a fresh keyed sampler each), the runs agree. The fused
    step draws the keyed noise itself in float32; for bf16 x k-diffusion gets it rounded."""
    denoiser = wrapper(kd.external)
    sigmas = _schedule(kd, denoiser, schedule)
    x, extra = _start(sigmas, dtype)
    ours_steps, their_steps = [], []
    sampler = keyed_noise_sampler(7, x)
    ours = sample_ddim(denoiser, x, sigmas, extra_args=extra, callback=_recorder(ours_steps), disable=True, eta=eta,
                       noise_sampler=sampler)
    theirs = kd.sampling.sample_euler_ancestral(denoiser, x, sigmas, extra_args=extra, callback=_recorder(their_steps),
                                                disable=True, eta=eta, noise_sampler=keyed_noise_sampler(7, x))
    assert sampler.calls == STEPS - 1  # no draw for the last step, to sigma 0, as in k-diffusion
    _assert_same_run(ours, theirs, ours_steps, their_steps, FP32_RTOL if dtype == torch.float32 else BF16_ROUNDING)


def test_eta_above_1_caps_the_noise_as_k_diffusion_does(kd):
    """Above eta 1 an ancestral step's sigma_up can exceed sigma_next; k-diffusion caps it there
    (sigma_down 0: the step lands on the denoised estimate plus sigma_next's noise). On this
    Karras schedule eta 1.2 gives capped and uncapped steps."""
    eta = 1.2
    denoiser = WRAPPERS["DiscreteEpsDDPMDenoiser"](kd.external)
    sigmas = _schedule(kd, denoiser, "karras")
    pairs = zip(sigmas[:-2].tolist(), sigmas[1:-1].tolist())
    capped = [eta * (b**2 * (a**2 - b**2) / a**2) ** 0.5 > b for a, b in pairs]
    assert any(capped) and not all(capped)  # both kinds of step occur
    x, extra = _start(sigmas, torch.float32)
    ours_steps, their_steps = [], []
    ours = sample_ddim(denoiser, x, sigmas, extra_args=extra, callback=_recorder(ours_steps), disable=True, eta=eta,
                       noise_sampler=keyed_noise_sampler(7, x))
    theirs = kd.sampling.sample_euler_ancestral(denoiser, x, sigmas, extra_args=extra, callback=_recorder(their_steps),
                                                disable=True, eta=eta, noise_sampler=keyed_noise_sampler(7, x))
    _assert_same_run(ours, theirs, ours_steps, their_steps, FP32_RTOL)


def test_default_noise_is_k_diffusion_default_noise(kd):
    """Without a noise sampler both draw torch.randn_like(x) once per noisy step."""
    denoiser = WRAPPERS["CompVisDenoiser"](kd.external)
    sigmas = _schedule(kd, denoiser, "karras")
    x, extra = _start(sigmas, torch.float32)
    torch.manual_seed(3)
    ours = sample_ddim(denoiser, x, sigmas, extra_args=extra, disable=True, eta=1.0, s_noise=0.9)
    after_ours = torch.randn(4)
    torch.manual_seed(3)
    theirs = kd.sampling.sample_euler_ancestral(denoiser, x, sigmas, extra_args=extra, disable=True, eta=1.0,
                                                s_noise=0.9)
    assert_close(ours, theirs, rtol=FP32_RTOL)
    assert torch.equal(after_ours, torch.randn(4))  # the global generator advanced identically


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_steps_no_less_accurate_than_k_diffusion(kd, dtype, schedule, eta):
    """x and sigmas both in bf16 (fp16): both samplers stay in that dtype. Along k-diffusion's
    own trajectory each step is taken by k-diffusion's code and by sample_ddim from the same
    inputs (x, denoised, noise), and by k-diffusion in float64 from those inputs: summed over
    the steps, the fused error (one rounding) is at most k-diffusion's (several roundings).
    Measured: 0.96-0.98 of it for eta 0, 0.61-0.66 for eta 1."""
    denoiser = WRAPPERS["DiscreteEpsDDPMDenoiser"](kd.external)
    sigmas = _schedule(kd, denoiser, schedule).to(dtype)
    x, extra = _start(sigmas.float(), dtype, batch=4)
    run = kd.sampling.sample_euler_ancestral if eta else kd.sampling.sample_euler

    def noise(draw):
        return dict(eta=eta, noise_sampler=lambda sigma, sigma_next: draw) if eta else {}

    trajectory = []
    run(denoiser, x, sigmas, extra_args=extra, disable=True, callback=_recorder(trajectory),
        **noise(torch.randn_like(x)))
    sq_ours = sq_theirs = sq_exact = 0.0
    for step in trajectory:
        i, x_i, denoised = step["i"], step["x"], step["denoised"]
        assert x_i.dtype == dtype
        pair = sigmas[i:i + 2]
        draw = torch.randn(x.shape, generator=torch.Generator().manual_seed(i)).to(dtype)
        theirs = run(lambda *a, **k: denoised, x_i, pair, disable=True, **noise(draw))
        ours = sample_ddim(lambda *a, **k: denoised, x_i, pair, disable=True, **noise(draw))
        exact = run(lambda *a, **k: denoised.double(), x_i.double(), pair.double(), disable=True,
                    **noise(draw.double()))
        assert ours.dtype == theirs.dtype == dtype
        sq_ours += (ours.double() - exact).pow(2).sum().item()
        sq_theirs += (theirs.double() - exact).pow(2).sum().item()
        sq_exact += exact.pow(2).sum().item()
    err_ours, err_theirs = (sq_ours / sq_exact) ** 0.5, (sq_theirs / sq_exact) ** 0.5
    assert err_ours <= err_theirs, f"fused {err_ours:.3e} vs k-diffusion {err_theirs:.3e} against float64"


# --- DDIM in sigma space, without k-diffusion ------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_sigma_space_ddim_is_diffusers_ddim(eta):
    """DDIMScheduler on an eps-model, rewritten in sigma space, is sample_ddim on its denoiser:
    x_sigma = x_t / sqrt(alpha_t), sigma = sqrt((1 - alpha_t) / alpha_t), denoised = pred_x0;
    eta's noise scaled by sqrt(alpha_prev) is sigma_up."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=True)
    scheduler.set_timesteps(STEPS)
    alphas = scheduler.alphas_cumprod.double()
    timesteps = [int(t) for t in scheduler.timesteps]
    sigmas = torch.tensor([((1 - alphas[t]) / alphas[t]).sqrt().item() for t in timesteps] + [0.0],
                          dtype=torch.float64)
    eps_model, cond = EpsModel(), torch.tensor([0.2, -0.4])
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    noises = [torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64) for _ in timesteps]

    def denoiser(x, sigma):
        t = timesteps[[abs(s - sigma[0].item()) for s in sigmas.tolist()].index(0.0)]
        return x - sigma.view(-1, 1, 1, 1) * eps_model(x * alphas[t].sqrt(), torch.full((2,), t), cond)

    x = x_t.clone()
    for t, noise in zip(scheduler.timesteps, noises):
        x = scheduler.step(eps_model(x, t.expand(2), cond), t, x, eta=eta, variance_noise=noise).prev_sample
    draws = iter(noises)
    ours = sample_ddim(denoiser, x_t / alphas[timesteps[0]].sqrt(), sigmas, disable=True, eta=eta,
                       noise_sampler=lambda sigma, sigma_next: next(draws))
    assert_close(ours, x, rtol=1e-6)  # alpha = 1 at the end: sigma space is x space


# --- keyed noise --------------------------------------------------------------------------


def _toy_denoiser(x, sigma, cond=None):
    """Batch-invariant: each sample's output depends on that sample only."""
    return torch.tanh(x / (1 + sigma.view(-1, *([1] * (x.dim() - 1)))) ** 2)


SIGMAS = torch.tensor([8.0, 3.0, 1.2, 0.4, 0.1, 0.0])


def test_keyed_noise_is_batch_invariant():
    x = torch.randn(4, 2, 5, 5) * SIGMAS[0]
    whole = sample_ddim(_toy_denoiser, x, SIGMAS, disable=True, eta=1.0, noise_sampler=keyed_noise_sampler(11, x))
    parts = [sample_ddim(_toy_denoiser, x[a:b], SIGMAS, disable=True, eta=1.0,
                         noise_sampler=keyed_noise_sampler(11, x[a:b], sample_offset=a)) for a, b in ((0, 1), (1, 4))]
    assert torch.equal(whole, torch.cat(parts))
    other_seed = sample_ddim(_toy_denoiser, x, SIGMAS, disable=True, eta=1.0, noise_sampler=keyed_noise_sampler(12, x))
    assert not torch.equal(whole, other_seed)


def test_keyed_noise_drawn_in_the_step_equals_the_materialised_noise():
    """sample_ddim draws a KeyedNoiseSampler's stream inside the fused step; a plain callable
    returning the same sampler's tensors gives the same result (float32, torch path)."""
    x = torch.randn(3, 4, 6) * SIGMAS[0]
    in_step = keyed_noise_sampler(5, x)
    ours = sample_ddim(_toy_denoiser, x, SIGMAS, disable=True, eta=0.8, noise_sampler=in_step)
    materialised = keyed_noise_sampler(5, x)
    plain = sample_ddim(_toy_denoiser, x, SIGMAS, disable=True, eta=0.8,
                        noise_sampler=lambda sigma, sigma_next: materialised(sigma, sigma_next))
    assert torch.equal(ours, plain)
    assert in_step.calls == materialised.calls == len(SIGMAS) - 2


def test_keyed_noise_sampler_draws_standard_normal_noise_like_x():
    x = torch.zeros(64, 32, 32, dtype=torch.bfloat16)
    sampler = keyed_noise_sampler(0, x)
    first, second = sampler(torch.tensor(1.0), torch.tensor(0.5)), sampler(torch.tensor(1.0), torch.tensor(0.5))
    assert first.shape == x.shape and first.dtype == x.dtype and sampler.calls == 2
    assert not torch.equal(first, second)
    values = first.double()
    assert abs(values.mean().item()) < 0.01 and abs(values.std().item() - 1) < 0.01


def test_keyed_noise_sampler_rejects_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="seed"):
        keyed_noise_sampler(1.5, x)
    with pytest.raises(ValueError, match="seed"):
        keyed_noise_sampler(-1, x)
    with pytest.raises(TypeError, match="x must be"):
        keyed_noise_sampler(0, [1.0, 2.0])
    with pytest.raises(ValueError, match="sample_offset"):
        keyed_noise_sampler(0, x, sample_offset=-2)
    # Sample indices are 32-bit keys: past them the noise of sample 0 would come back.
    with pytest.raises(ValueError, match="sample_offset"):
        keyed_noise_sampler(0, x, sample_offset=2**32 - 1)
    assert isinstance(keyed_noise_sampler(0, x), KeyedNoiseSampler)


# --- the fused step -------------------------------------------------------------------------


def test_each_step_is_one_fused_update(monkeypatch):
    calls = []
    real = backend_module.torch_ddim_step

    def counting(x, model_out, out, step, *outputs):
        calls.append(step)
        return real(x, model_out, out, step, *outputs)

    monkeypatch.setattr(backend_module, "torch_ddim_step", counting)
    x = torch.randn(2, 3, 4) * SIGMAS[0]
    sample_ddim(_toy_denoiser, x, SIGMAS, disable=True, eta=1.0, noise_sampler=keyed_noise_sampler(0, x))
    assert len(calls) == len(SIGMAS) - 1
    assert all(c.noise is None for c in calls)  # keyed noise is drawn in the step, never materialised
    assert [c.noise_coef > 0 for c in calls] == [True] * (len(SIGMAS) - 2) + [False]


@pytest.mark.parametrize("noise", ["keyed", "tensor", "none"])
def test_triton_kernel_matches_the_torch_path(noise, monkeypatch, device):
    """The kernel (Triton's interpreter on a CPU) against the torch path, fp32 and bf16."""
    x = torch.randn(2, 3, 4, 4).to(device) * SIGMAS[0]
    eta = 0.0 if noise == "none" else 0.7

    def sampler():
        if noise == "keyed":
            return keyed_noise_sampler(3, x)
        draws = iter(torch.randn(len(SIGMAS), *x.shape, generator=torch.Generator().manual_seed(1)).to(device))
        return (lambda sigma, sigma_next: next(draws)) if noise == "tensor" else None

    for dtype in (torch.float32, torch.bfloat16):
        sigmas = SIGMAS.to(device, dtype)
        want = sample_ddim(_toy_denoiser, x.to(dtype), sigmas, disable=True, eta=eta,
                           noise_sampler=sampler(), backend="torch")
        with monkeypatch.context() as patch:
            patch.setattr(backend_module, "torch_ddim_step", _no_torch_path)
            got = sample_ddim(_toy_denoiser, x.to(dtype), sigmas, disable=True, eta=eta,
                              noise_sampler=sampler(), backend="triton")
        assert got.dtype == want.dtype == dtype
        assert_close(got, want, rtol=FP32_RTOL if dtype == torch.float32 else BF16_ROUNDING)


def _no_torch_path(*args, **kwargs):
    raise AssertionError("backend='triton' fell back to the torch path")


def test_float64_runs_in_float64():
    x = torch.randn(2, 5, dtype=torch.float64) * 8
    out = sample_ddim(_toy_denoiser, x, SIGMAS.double(), disable=True)
    manual = x.clone()
    s = SIGMAS.double().tolist()
    for i in range(len(s) - 1):
        d = _toy_denoiser(manual, torch.full((2,), s[i], dtype=torch.float64))
        manual = (s[i + 1] / s[i]) * manual + (1 - s[i + 1] / s[i]) * d
    assert out.dtype == torch.float64
    assert_close(out, manual, rtol=1e-12)


# --- k-diffusion conventions: callback, progress bar, inputs, errors -----------------------------


def test_callback_model_arguments_and_extra_args():
    seen = []

    def model(x, sigma, cond, scale):
        seen.append((sigma.clone(), cond, scale))
        return x * 0.5

    x = torch.randn(3, 2) * SIGMAS[0]
    infos = []
    sample_ddim(model, x, SIGMAS, extra_args={"cond": "c", "scale": 2}, callback=infos.append, disable=True)
    assert [i["i"] for i in infos] == list(range(len(SIGMAS) - 1))
    for k, (sigma, cond, scale) in enumerate(seen):
        assert sigma.shape == (3,) and torch.equal(sigma, SIGMAS[k] * torch.ones(3)) and (cond, scale) == ("c", 2)
        assert torch.equal(infos[k]["sigma"], SIGMAS[k]) and torch.equal(infos[k]["sigma_hat"], SIGMAS[k])
        assert torch.equal(infos[k]["denoised"], infos[k]["x"] * 0.5)


def test_progress_bar_unless_disabled(capsys):
    x = torch.randn(1, 2)
    sample_ddim(_toy_denoiser, x * 8, SIGMAS, disable=False)
    assert f"{len(SIGMAS) - 1}/{len(SIGMAS) - 1}" in capsys.readouterr().err
    sample_ddim(_toy_denoiser, x * 8, SIGMAS, disable=True)
    assert capsys.readouterr().err == ""


def test_no_steps_returns_a_copy():
    x = torch.randn(2, 3)
    out = sample_ddim(_toy_denoiser, x, SIGMAS[:1], disable=True)
    assert torch.equal(out, x) and out is not x


class _CountingModel:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, **kwargs):
        self.calls += 1
        return x


BAD_CALLS = {
    "model": (dict(model=3), TypeError, "model must be callable"),
    "x": (dict(x=[1.0]), TypeError, "x must be"),
    "x-int": (dict(x=torch.ones(2, 3, dtype=torch.int64)), TypeError, "x must be"),
    "sigmas-list": (dict(sigmas=[1.0, 0.0]), TypeError, "sigmas must be a 1-D"),
    "sigmas-2d": (dict(sigmas=torch.ones(2, 2)), TypeError, "sigmas must be a 1-D"),
    "sigmas-empty": (dict(sigmas=torch.ones(0)), ValueError, "at least one"),
    "sigmas-negative": (dict(sigmas=torch.tensor([1.0, -0.5, 0.0])), ValueError, "finite and >= 0"),
    "sigmas-nan": (dict(sigmas=torch.tensor([float("nan"), 0.0])), ValueError, "finite and >= 0"),
    "sigmas-zero-inside": (dict(sigmas=torch.tensor([1.0, 0.0, 0.0])), ValueError, "every sigma but the last"),
    "sigmas-increasing-eta": (dict(sigmas=torch.tensor([1.0, 2.0, 0.0]), eta=0.5), ValueError, "must not increase"),
    "eta-negative": (dict(eta=-0.1), ValueError, "eta"),
    "eta-str": (dict(eta="1"), TypeError, "eta"),
    "s_noise-inf": (dict(s_noise=float("inf")), ValueError, "s_noise"),
    "s_noise-beyond-float32": (dict(s_noise=1e39, eta=1.0), ValueError, "s_noise"),
    "keyed-sampler-of-another-shape": (dict(eta=1.0, noise_sampler=keyed_noise_sampler(0, torch.ones(1, 3))),
                                       ValueError, r"noise_sampler was made for tensors of shape \(1, 3\)"),
    "extra_args": (dict(extra_args=[1]), TypeError, "extra_args"),
    "callback": (dict(callback=1), TypeError, "callback"),
    "noise_sampler": (dict(noise_sampler="randn"), TypeError, "noise_sampler"),
    "backend": (dict(backend="cuda"), ValueError, "backend"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_arguments_raise_before_the_model_runs(case):
    overrides, error, match = case
    model = _CountingModel()
    kwargs = dict(model=model, x=torch.ones(2, 3), sigmas=SIGMAS, disable=True)
    kwargs.update(overrides)
    with pytest.raises(error, match=match):
        sample_ddim(**kwargs)
    assert model.calls == 0


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        sample_ddim(_CountingModel(), torch.ones(2, 3), SIGMAS, disable=True, backend="triton")


def test_bad_model_and_noise_outputs_are_named():
    with pytest.raises(ValueError, match="model output has shape"):
        sample_ddim(lambda x, sigma: x[:1], torch.ones(2, 3), SIGMAS, disable=True)
    with pytest.raises(TypeError, match="model output must be"):
        sample_ddim(lambda x, sigma: "x0", torch.ones(2, 3), SIGMAS, disable=True)
    with pytest.raises(ValueError, match="noise_sampler output has shape"):
        sample_ddim(_toy_denoiser, torch.ones(2, 3), SIGMAS, disable=True, eta=1.0,
                    noise_sampler=lambda s, t: torch.ones(3, 3))
