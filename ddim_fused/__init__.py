"""ddim-fused: DDIM sampling with the per-step update fused into one Triton kernel."""
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

__version__ = "0.1.0"

__all__ = [
    "DDIMCoefficients",
    "DDIMSampler",
    "GaussianMixture",
    "ReferenceDDIMSampler",
    "SIGMA_HAT",
    "alpha_bar_from_betas",
    "ddim_coefficients",
    "ddim_step",
    "ddim_timesteps",
    "frechet_distance",
    "initial_noise",
    "make_alpha_bar",
    "make_betas",
    "rescale_zero_terminal_snr",
    "slerp",
]
