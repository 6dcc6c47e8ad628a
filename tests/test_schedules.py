import math

import numpy as np
import pytest
import torch

from ddim_fused.schedules import (
    alpha_bar_from_betas,
    check_alpha_bar,
    ddim_timesteps,
    make_alpha_bar,
    make_betas,
    rescale_zero_terminal_snr,
)


def test_linear_and_scaled_linear_betas():
    betas = make_betas("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)
    scaled = make_betas("scaled_linear", 1000)
    assert np.allclose(np.sqrt(scaled), np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000))


def test_cosine_schedule_follows_its_alpha_bar_and_cap():
    T = 1000
    betas = make_betas("cosine", T)
    assert betas.max() <= 0.999 and betas[-1] == pytest.approx(0.999)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = alpha_bar_from_betas(betas)
    # Where no beta is capped, alpha_bar(t) = f(t + 1) / f(0).
    for t in (0, 10, 500, 900):
        assert alpha_bar[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_alpha_bar_is_cumprod_of_one_minus_beta():
    betas = np.random.default_rng(0).uniform(1e-4, 0.05, size=50)
    alpha_bar = alpha_bar_from_betas(torch.from_numpy(betas))
    assert alpha_bar.dtype == np.float64
    assert np.allclose(alpha_bar, np.cumprod(1 - betas), rtol=1e-14)


def test_zero_terminal_snr_rescaling():
    alpha_bar = make_alpha_bar("scaled_linear", 1000)
    rescaled = rescale_zero_terminal_snr(alpha_bar)
    assert rescaled[0] == pytest.approx(alpha_bar[0], rel=1e-12)
    assert rescaled[-1] == 2.0**-24  # zero SNR, kept off exact 0 so eps-models stay finite
    assert np.all(np.diff(rescaled) <= 0)
    assert np.array_equal(make_alpha_bar("scaled_linear", 1000, rescale_zero_snr=True), rescaled)


@pytest.mark.parametrize("bad", [[0.5, 0.6], [1.2, 0.5], [0.9, float("nan")], [[0.9]], []])
def test_invalid_alpha_bar_is_refused(bad):
    with pytest.raises(ValueError, match="alpha_bar"):
        check_alpha_bar(bad)


def seed_uniform(T, S):
    # labml: c = n_steps // S; time_steps = range(0, n_steps, c) + 1
    c = T // S
    return [t + 1 for t in range(0, T, c)]


def seed_quad(T, S):
    return [int(v) + 1 for v in (np.linspace(0, np.sqrt(T * 0.8), S) ** 2)]


@pytest.mark.parametrize("T,S", [(1000, 50), (1000, 10), (1000, 30), (100, 7)])
def test_seed_discretizations(T, S):
    assert ddim_timesteps(T, S, "uniform").tolist() == seed_uniform(T, S)
    assert ddim_timesteps(T, S, "quad").tolist() == seed_quad(T, S)


def test_uniform_50_of_1000_visits_1_to_981():
    steps = ddim_timesteps(1000, 50, "uniform")
    assert steps[0] == 1 and steps[-1] == 981 and len(steps) == 50


def test_diffusers_spacings():
    T, S = 1000, 10
    assert ddim_timesteps(T, S, "leading", steps_offset=1).tolist() == [1 + 100 * i for i in range(10)]
    assert ddim_timesteps(T, S, "trailing").tolist() == [99 + 100 * i for i in range(10)]
    assert ddim_timesteps(T, S, "linspace").tolist() == [round(999 * i / 9) for i in range(10)]
    assert ddim_timesteps(T, 3, "trailing").tolist() == [332, 666, 999]


def test_explicit_list():
    assert ddim_timesteps(100, discretize=[0, 10, 99]).tolist() == [0, 10, 99]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_train_steps=1000, n_steps=1000, discretize="uniform"), "outside alpha_bar"),
        (dict(n_train_steps=1000, n_steps=333, discretize="uniform"), "outside alpha_bar"),
        (dict(n_train_steps=100, n_steps=101, discretize="quad"), "exceeds"),
        (dict(n_train_steps=100, n_steps=0, discretize="uniform"), "n_steps"),
        (dict(n_train_steps=100, n_steps=5, discretize="cubic"), "discretize"),
        (dict(n_train_steps=100, discretize=[3, 3, 5]), "strictly increasing"),
        (dict(n_train_steps=100, discretize=[5, 2]), "strictly increasing"),
        (dict(n_train_steps=100, discretize=[0, 100]), r"\[0, 100\)"),
        (dict(n_train_steps=100, discretize=[-1, 5]), r"\[0, 100\)"),
        (dict(n_train_steps=100, n_steps=10, discretize="leading", steps_offset=20), "outside alpha_bar"),
    ],
)
def test_invalid_discretizations_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ddim_timesteps(**kwargs)


def test_non_int_steps_is_a_type_error():
    with pytest.raises(TypeError, match="n_steps"):
        ddim_timesteps(1000, 10.0)
