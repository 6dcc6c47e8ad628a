"""The CLI's shared helpers: sampler messages in flag names, atomic PNG output."""

import pytest
import torch

from ddim_fused.cli.options import SAMPLER_FLAGS, UserError, build_sampler, flag_names, sampler_errors
from ddim_fused.schedules import make_alpha_bar


def test_flag_names_renames_arguments_but_not_quoted_values():
    message = "paint_blend must be one of ('seed', 'prev'), got 'n_steps'; n_steps=7 with ddim_eta"
    assert flag_names(message, SAMPLER_FLAGS) == (
        "--blend must be one of ('seed', 'prev'), got 'n_steps'; --steps=7 with --eta")


def test_flag_names_leaves_longer_words_and_flags_alone():
    message = "ddim_eta and eta; theta, seeds, --seed, n_steps_total, model.n_steps"
    assert flag_names(message, SAMPLER_FLAGS) == (
        "--eta and --eta; theta, seeds, --seed, n_steps_total, model.n_steps")


def test_sampler_errors_override_names_the_flag_that_was_used():
    with pytest.raises(UserError, match=r"^--invert-steps must be >= 1, got 0$"):
        with sampler_errors(n_steps="--invert-steps"):
            raise ValueError("n_steps must be >= 1, got 0")


class _Args:
    steps, discretize, backend, seed = 10, "uniform", "torch", 3


class _Model:
    alpha_bar = torch.from_numpy(make_alpha_bar("linear", 100))
    n_steps = 100

    def __call__(self, x, t, cond):
        return x


def test_build_sampler_uses_the_models_schedule():
    sampler = build_sampler(_Model(), _Args())
    assert len(sampler.time_steps) == 10 and sampler.time_steps.max() < 100
    # The bound is the model's T (100 here), not the shipped model's 1000.
    with pytest.raises(UserError, match="--steps") as info:
        build_sampler(_Model(), _Args(), 101)
    assert "101" in str(info.value)
