import math

import numpy as np
import pytest

from ddim_fused.coefficients import ddim_coefficients, prediction_maps
from ddim_fused.schedules import ddim_timesteps, make_alpha_bar

ALPHA_BAR = make_alpha_bar("linear", 1000)
STEPS = ddim_timesteps(1000, 20, "uniform")


def seed_update(x, eps, noise, a, a_prev, eta, temperature=1.0):
    """labml's update, term by term (float64)."""
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
    pred_x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    dir_xt = math.sqrt(1 - a_prev - sigma**2) * eps
    return math.sqrt(a_prev) * pred_x0 + dir_xt + sigma * temperature * noise, pred_x0


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_linear_form_equals_the_seed_update(eta):
    c = ddim_coefficients(ALPHA_BAR, STEPS, eta)
    rng = np.random.default_rng(1)
    x, eps, noise = rng.standard_normal((3, 64))
    for i in range(len(STEPS)):
        a, a_prev = ALPHA_BAR[STEPS[i]], (ALPHA_BAR[STEPS[i - 1]] if i else ALPHA_BAR[0])
        want, want_x0 = seed_update(x, eps, noise, a, a_prev, eta, temperature=0.7)
        got = c.x_coef[i] * x + c.eps_coef[i] * eps + c.noise_scale[i] * 0.7 * noise
        got_x0 = c.x0_x_coef[i] * x + c.x0_eps_coef[i] * eps
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got_x0, want_x0, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_prediction_maps_recover_x0_and_eps_from_each_kind_of_output(prediction_type):
    """x = sqrt(a) x0 + sqrt(1 - a) eps; the model outputs eps, x0 or v = sqrt(a) eps - sqrt(1 - a) x0."""
    a = ALPHA_BAR[STEPS]
    rng = np.random.default_rng(2)
    x0, eps = rng.standard_normal((2, len(a), 16))
    sa, sb = np.sqrt(a)[:, None], np.sqrt(1 - a)[:, None]
    x = sa * x0 + sb * eps
    m = {"epsilon": eps, "sample": x0, "v_prediction": sa * eps - sb * x0}[prediction_type]
    maps = prediction_maps(a, prediction_type)
    coef = lambda pair: (np.asarray(pair[0])[:, None], np.asarray(pair[1])[:, None])  # noqa: E731
    (x0_x, x0_m), (eps_x, eps_m), (back_x, back_x0) = coef(maps.x0), coef(maps.eps), coef(maps.eps_from_x0)
    np.testing.assert_allclose(x0_x * x + x0_m * m, x0, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(eps_x * x + eps_m * m, eps, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(back_x * x + back_x0 * x0, eps, rtol=1e-9, atol=1e-9)


def test_alpha_prev_and_final_alpha():
    c = ddim_coefficients(ALPHA_BAR, STEPS, 0.0)
    assert c.alpha_prev[0] == ALPHA_BAR[0]
    assert np.array_equal(c.alpha_prev[1:], ALPHA_BAR[STEPS[:-1]])
    assert ddim_coefficients(ALPHA_BAR, STEPS, 0.0, final_alpha_bar=1.0).alpha_prev[0] == 1.0


def test_eta_zero_is_deterministic_and_eta_one_has_no_direction_excess():
    c0 = ddim_coefficients(ALPHA_BAR, STEPS, 0.0)
    assert np.all(c0.sigma == 0) and np.all(c0.noise_scale == 0)
    c1 = ddim_coefficients(ALPHA_BAR, STEPS, 1.0)
    # eta = 1: sigma^2 equals the DDPM posterior variance (1 - a_prev) / (1 - a) * beta_t.
    beta = 1 - c1.alpha / c1.alpha_prev
    np.testing.assert_allclose(c1.sigma**2, (1 - c1.alpha_prev) / (1 - c1.alpha) * beta, rtol=1e-12)


def test_sigma_hat_uses_larger_noise_but_eta_one_direction():
    hat = ddim_coefficients(ALPHA_BAR, STEPS, "sigma_hat")
    one = ddim_coefficients(ALPHA_BAR, STEPS, 1.0)
    np.testing.assert_allclose(hat.noise_scale, np.sqrt(1 - hat.alpha / hat.alpha_prev), rtol=1e-12)
    np.testing.assert_array_equal(hat.sigma, one.sigma)
    np.testing.assert_array_equal(hat.eps_coef, one.eps_coef)
    assert np.all(hat.noise_scale >= one.noise_scale)


def test_inversion_coefficients_move_up_one_level():
    c = ddim_coefficients(ALPHA_BAR, STEPS, 0.0)
    rng = np.random.default_rng(2)
    x, eps = rng.standard_normal((2, 16))
    for i in (0, 5, len(STEPS) - 1):
        a, a_prev = c.alpha[i], c.alpha_prev[i]
        x0 = (x - math.sqrt(1 - a_prev) * eps) / math.sqrt(a_prev)
        want = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        np.testing.assert_allclose(c.inv_x_coef[i] * x + c.inv_eps_coef[i] * eps, want, rtol=1e-10)


def test_q_sample_levels():
    c = ddim_coefficients(ALPHA_BAR, STEPS, 0.0)
    assert c.q_sample_coefs(3) == (math.sqrt(c.alpha[3]), math.sqrt(1 - c.alpha[3]))
    assert c.q_sample_coefs(3, "alpha_prev") == (math.sqrt(c.alpha_prev[3]), math.sqrt(1 - c.alpha_prev[3]))
    assert c.q_sample_coefs(0, "alpha_prev") == (1.0, 0.0)


@pytest.mark.parametrize("eta,err", [(-0.1, ValueError), (float("nan"), ValueError), ("big", ValueError), (None, TypeError)])
def test_bad_eta(eta, err):
    with pytest.raises(err, match="eta"):
        ddim_coefficients(ALPHA_BAR, STEPS, eta)


def test_eta_too_large_for_direction_term():
    with pytest.raises(ValueError, match="smaller eta"):
        ddim_coefficients(ALPHA_BAR, STEPS, 3.0)


def test_a_step_at_alpha_bar_one_is_refused():
    alpha_bar = ALPHA_BAR.copy()
    alpha_bar[0] = 1.0
    with pytest.raises(ValueError, match="divides by 1 - alpha_bar"):
        ddim_coefficients(alpha_bar, np.array([0, 10, 20]), 0.5)
