"""DDIMSampler.invert: each step against the inversion formula and diffusers, and on the exact
oracle (reconstruction, convergence in S, closed form, backends)."""
import math

import numpy as np
import pytest
import torch

from ddim_fused import DDIMSampler
from ddim_fused.oracle import GaussianMixture
from ddim_fused.quality import make_oracle
from tests.helpers import ToyModel, assert_close, error_vs


def _roundtrip(oracle, x0, n_steps, backend="torch"):
    sampler = DDIMSampler(oracle, n_steps, "uniform", 0.0, backend=backend)
    x_last = sampler.invert(x0, None)
    return x_last, sampler.sample(x0.shape, None, x_last=x_last)


def _nearest_mean(oracle, x):
    return torch.cdist(x.reshape(x.shape[0], -1).double(), oracle.means.reshape(oracle.n_components, -1)).argmin(1)


def test_reconstruction_at_50_and_100_steps():
    # Both directions are first-order in the step, so the round trip is not exact.
    # Measured on the quality-table mixture (std 0.2), 64 samples, relative RMS error:
    # S=50 0.068, S=100 0.036 (S=10 0.24). Bounds 0.1 and 0.05: error about 0.2 and
    # 0.1 of a component's std per coordinate.
    oracle = make_oracle()
    x0 = oracle.sample(64, torch.Generator().manual_seed(1))
    for n_steps, bound in ((50, 0.1), (100, 0.05)):
        x_last, recon = _roundtrip(oracle, x0, n_steps)
        err = error_vs(recon, x0)
        assert err < bound, f"S={n_steps}: reconstruction error {err:.4f} >= {bound}"
        # The latent is really noise-level (not x0 passed through) ...
        assert error_vs(x_last, x0) > 0.5
        # ... and every reconstruction lands back in its own mixture component.
        assert torch.equal(_nearest_mean(oracle, recon), _nearest_mean(oracle, x0))


def test_reconstruction_error_decreases_with_steps():
    # Measured: S=10 0.24, 20 0.15, 50 0.068, 100 0.036 (about halving per doubling).
    oracle = make_oracle()
    x0 = oracle.sample(32, torch.Generator().manual_seed(2))
    errors = [error_vs(_roundtrip(oracle, x0, s)[1], x0) for s in (10, 20, 50, 100)]
    assert all(b < 0.8 * a for a, b in zip(errors, errors[1:])), f"errors by S: {errors}"


def test_inversion_of_one_gaussian_matches_the_probability_flow():
    # For data N(mu, s^2 I) the probability-flow ODE is affine: the point at level a is
    # sqrt(a) mu + sqrt(v_a) z with v_a = a s^2 + 1 - a and z fixed along the path.
    # DDIM inversion from level alpha_bar[0] must approach it as S grows (measured
    # relative error: S=25 0.21, S=50 0.109, S=100 0.056).
    std = 0.5
    mu = torch.randn(1, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    oracle = GaussianMixture(mu, std)
    x0 = oracle.sample(32, torch.Generator().manual_seed(4))
    errors = []
    for n_steps in (25, 50, 100):
        sampler = DDIMSampler(oracle, n_steps, "uniform", 0.0, backend="torch")
        x_last = sampler.invert(x0, None)
        a0, a_last = float(oracle.alpha_bar[0]), float(oracle.alpha_bar[sampler.time_steps[-1]])
        z = (x0 - math.sqrt(a0) * mu) / math.sqrt(a0 * std**2 + 1 - a0)
        exact = math.sqrt(a_last) * mu + math.sqrt(a_last * std**2 + 1 - a_last) * z
        errors.append(error_vs(x_last, exact))
    assert errors[-1] < 0.08 and errors[0] > errors[1] > errors[2], f"errors by S: {errors}"


def test_triton_backend_matches_torch_backend(device):
    # Tiny on purpose: each interpreted kernel launch costs ~0.1-0.2 s on CPU.
    gen = torch.Generator().manual_seed(5)
    means = torch.randn(2, 2, 5, generator=gen)
    oracle = GaussianMixture(means, 0.3)
    x0 = oracle.sample(3, gen).float()
    x_torch, recon_torch = _roundtrip(oracle, x0, 4, backend="torch")
    x_triton, recon_triton = _roundtrip(GaussianMixture(means.to(device), 0.3), x0.to(device), 4,
                                        backend="triton")
    assert_close(x_triton, x_torch, rtol=1e-5, name="inverted latent")
    assert_close(recon_triton, recon_torch, rtol=1e-5, name="reconstruction")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True], ids=["alpha0-first", "alpha-one-first"])
def test_each_inversion_step_is_the_inversion_formula(set_alpha_to_one, backend, backend_device):
    # DDIM inversion written out from alpha_bar, independent of ddim_fused.coefficients:
    # step i takes x from level a_prev (alpha_bar of the previous time step, or of t = 0 /
    # 1 for the first step) to level a = alpha_bar[tau_i], with eps evaluated at tau_i:
    #   x' = sqrt(a) * (x - sqrt(1 - a_prev) * eps) / sqrt(a_prev) + sqrt(1 - a) * eps.
    # Checked per step on the sampler's own trajectory, and the model's time steps too.
    model = ToyModel(device=backend_device)
    sampler = DDIMSampler(model, 7, "quad", 0.0, backend=backend, set_alpha_to_one=set_alpha_to_one)
    x0 = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(6)).to(backend_device)
    cond = torch.tensor([0.3, -0.8])
    xs = [x0]
    sampler.invert(x0, cond, callback=lambda info: xs.append(info["x"].clone()))
    taus = [int(t) for t in sampler.time_steps]
    assert model.times == [[t] * 2 for t in taus], "the model must see tau_i at inversion step i"
    alpha_bar = model.alpha_bar.double()
    for i, tau in enumerate(taus):
        a = float(alpha_bar[tau])
        a_prev = float(alpha_bar[taus[i - 1]]) if i else (1.0 if set_alpha_to_one else float(alpha_bar[0]))
        x = xs[i].double()
        eps = ToyModel()(x.cpu(), torch.full((2,), tau), cond).to(x.device)
        want = math.sqrt(a) * (x - math.sqrt(1 - a_prev) * eps) / math.sqrt(a_prev) + math.sqrt(1 - a) * eps
        assert_close(xs[i + 1], want, name=f"inversion step {i} (tau {tau})")


def test_invert_matches_diffusers_inverse_scheduler():
    # labml's "uniform" time steps (range(0, T, T // S) + 1) are diffusers' "leading" ones
    # with steps_offset=1, and DDIMInverseScheduler starts from alpha_bar[0] when
    # set_alpha_to_one=False, as DDIMSampler(set_alpha_to_one=False) does.
    pytest.importorskip("diffusers", reason="diffusers is not installed: the [test] extra brings it")
    from diffusers import DDIMInverseScheduler  # noqa: PLC0415 - after the importorskip above

    model = ToyModel()
    sampler = DDIMSampler(model, 10, "uniform", 0.0, backend="torch")
    alpha_bar = model.alpha_bar.numpy()
    betas = 1.0 - alpha_bar / np.concatenate(([1.0], alpha_bar[:-1]))
    sched = DDIMInverseScheduler(num_train_timesteps=1000, trained_betas=betas.tolist(), clip_sample=False,
                                 set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == sampler.time_steps.tolist()
    x0 = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(8))
    cond = torch.tensor([0.5, -0.5])
    x = x0
    for t in sched.timesteps:
        x = sched.step(model(x, torch.full((2,), int(t)), cond), t, x).prev_sample
    assert_close(sampler.invert(x0, cond), x, name="inverted latent")


def test_invert_bad_input():
    oracle = make_oracle()
    sampler = DDIMSampler(oracle, 10, backend="torch")
    with pytest.raises(TypeError, match="x0 must be a torch.Tensor"):
        sampler.invert([[0.0] * 32], None)
    with pytest.raises(TypeError, match="x0 has dtype torch.int64"):
        sampler.invert(torch.zeros(2, 32, dtype=torch.long), None)
    with pytest.raises(ValueError, match="x0 must have a batch dimension"):
        sampler.invert(torch.tensor(1.0), None)
    with pytest.raises(ValueError, match="needs uncond_cond"):
        sampler.invert(torch.zeros(2, 32), torch.tensor([0, 1]), uncond_scale=2.0)
    with pytest.raises(ValueError, match=r"x has shape \(2, 31\)"):
        sampler.invert(torch.zeros(2, 31), None)  # the oracle rejects a wrong sample shape
