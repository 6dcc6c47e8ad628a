"""ddim-fused: DDIM sampling with the per-step update fused into one Triton kernel.

The public names below load on first use (PEP 562): `import ddim_fused` itself imports
neither torch nor triton, so the command line (`ddim_fused.cli`) can put its Ctrl-C
handling in place before the heavy imports start.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "DDIMCoefficients": "coefficients",
    "SIGMA_HAT": "coefficients",
    "ddim_coefficients": "coefficients",
    "slerp": "interpolation",
    "frechet_distance": "metrics",
    "ddim_step": "ops",
    "GaussianMixture": "oracle",
    "initial_noise": "plan",
    "ReferenceDDIMSampler": "reference",
    "DDIMSampler": "sampler",
    "alpha_bar_from_betas": "schedules",
    "ddim_timesteps": "schedules",
    "make_alpha_bar": "schedules",
    "make_betas": "schedules",
    "rescale_zero_terminal_snr": "schedules",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # the same names, for type checkers and editors
    from .coefficients import SIGMA_HAT, DDIMCoefficients, ddim_coefficients
    from .interpolation import slerp
    from .metrics import frechet_distance
    from .ops import ddim_step
    from .oracle import GaussianMixture
    from .plan import initial_noise
    from .reference import ReferenceDDIMSampler
    from .sampler import DDIMSampler
    from .schedules import (
        alpha_bar_from_betas,
        ddim_timesteps,
        make_alpha_bar,
        make_betas,
        rescale_zero_terminal_snr,
    )
