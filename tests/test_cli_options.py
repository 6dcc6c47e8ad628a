"""The CLI's shared helpers: sampler messages in flag names, library logs, atomic PNG output."""
import logging

import pytest
import torch

from ddim_fused.cli.errors import library_logs
from ddim_fused.cli.model import MODEL_FLAGS
from ddim_fused.cli.options import SAMPLER_FLAGS, UserError, build_sampler, flag_names, sampler_errors
from ddim_fused.schedules import make_alpha_bar
from tests.byo_models import needs_diffusers


def test_flag_names_renames_arguments_but_not_quoted_values():
    message = "paint_blend must be one of ('seed', 'prev'), got 'n_steps'; n_steps=7 with ddim_eta"
    assert flag_names(message, SAMPLER_FLAGS) == (
        "--blend must be one of ('seed', 'prev'), got 'n_steps'; --steps=7 with --eta")


def test_flag_names_leaves_longer_words_and_flags_alone():
    message = "ddim_eta and eta; theta, seeds, --seed, n_steps_total, model.n_steps"
    assert flag_names(message, SAMPLER_FLAGS) == (
        "--eta and --eta; theta, seeds, --seed, n_steps_total, model.n_steps")


@pytest.mark.parametrize("message", [
    # A path whose parts are argument names, and another library's (quoted) error text.
    "cannot read 'm/scheduler/scheduler_config.json': 'Expecting value: line 1 column 1 (char 0)'",
    "cannot read m/weights/sample_shape.json: no such file",
    "cannot open runs/seed: permission denied",
    "cannot load the UNet2DModel in 'weights': 'Unable to load weights from checkpoint file'",
], ids=["quoted-path", "bare-path", "path-ending-in-a-name", "foreign-text"])
def test_flag_names_keeps_paths_and_other_libraries_text(message):
    assert flag_names(message, {**SAMPLER_FLAGS, **MODEL_FLAGS}) == message


def test_flag_names_renames_arguments_where_the_library_names_them():
    flags = {**SAMPLER_FLAGS, **MODEL_FLAGS, "uncond": "--uncond", "guidance": "--guidance"}
    assert flag_names("weights applies only to the 'digits' source", flags) == (
        "--weights applies only to the 'digits' --model")
    assert flag_names("guidance=2 needs uncond, the unconditional tensor (see seed).", flags) == (
        "--guidance=2 needs --uncond, the unconditional tensor (see --seed).")


@needs_diffusers  # only the logs of libraries that are imported are routed
def test_library_logs_are_one_line_warnings_and_debug_only_with_debug(capsys):
    logger = logging.getLogger("diffusers.test_cli_options")
    root = logging.getLogger("diffusers")
    before = (list(root.handlers), root.level, root.propagate)
    # As under DIFFUSERS_VERBOSITY=info: the library passes info records on; --debug decides.
    root.setLevel(logging.INFO)
    for debug in (False, True):
        with library_logs(debug):
            logger.warning("two\nlines")
            logger.error("an error")
            logger.info("a note")
        err = capsys.readouterr().err.splitlines()
        expected = ["ddim-fused: warning: two lines", "ddim-fused: warning: an error"]
        assert err == expected + (["ddim-fused: debug: a note"] if debug else []), debug
    assert (list(root.handlers), root.level, root.propagate) == (before[0], logging.INFO, before[2])
    root.setLevel(before[1])


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
