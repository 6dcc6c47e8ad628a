"""Noise schedules (alpha_bar) and DDIM time-step discretizations, in float64 on the host.

Every function here returns NumPy arrays: the schedule is set up once per sampler,
never inside the sampling loop, so there is nothing to gain from device tensors.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
DISCRETIZATIONS = ("uniform", "quad", "leading", "trailing", "linspace")

# Defaults of the two beta schedules in common use: DDPM (Ho et al. 2020) for
# `linear`, Stable Diffusion / labml's latent diffusion for `scaled_linear`.
_DEFAULT_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def make_betas(
    schedule: str,
    n_steps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
) -> np.ndarray:
    """Betas of a named schedule.

    Args:
        schedule: `linear` (betas linear in [beta_start, beta_end]), `scaled_linear`
            (linear in sqrt(beta), then squared) or `cosine` (Nichol & Dhariwal 2021,
            each beta capped at 0.999; beta_start/beta_end must be None).
        n_steps: T, the number of training time steps.
        beta_start, beta_end: ends of the linear schedules; None for the defaults
            (1e-4, 0.02) for `linear` and (0.00085, 0.012) for `scaled_linear`.

    Returns:
        betas: float64 array of shape (T,).
    """
    n_steps = _check_int("n_steps", n_steps, low=1)
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")
    if schedule == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("beta_start/beta_end do not apply to the cosine schedule")
        s = 0.008
        t = np.arange(n_steps + 1, dtype=np.float64) / n_steps
        f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    default_start, default_end = _DEFAULT_BETA_RANGE[schedule]
    start = default_start if beta_start is None else float(beta_start)
    end = default_end if beta_end is None else float(beta_end)
    if not (0.0 < start <= end < 1.0):
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={start}, beta_end={end}")
    if schedule == "linear":
        return np.linspace(start, end, n_steps, dtype=np.float64)
    return np.linspace(math.sqrt(start), math.sqrt(end), n_steps, dtype=np.float64) ** 2


def alpha_bar_from_betas(betas) -> np.ndarray:
    """Cumulative product of (1 - beta).

    Args:
        betas: array-like of shape (T,), each in (0, 1).

    Returns:
        alpha_bar: float64 array of shape (T,).
    """
    betas = _as_float64_vector("betas", betas)
    if not np.all((betas > 0) & (betas < 1)):
        raise ValueError("betas must all lie in (0, 1)")
    return np.cumprod(1.0 - betas)


def rescale_zero_terminal_snr(alpha_bar) -> np.ndarray:
    """Rescale alpha_bar so the last step has zero SNR (Lin et al. 2023, Algorithm 1).

    The rescaled last value would be exactly 0, where an eps-model's pred_x0 divides by
    zero; like diffusers' Euler scheduler it is set to 2**-24 instead.

    Args:
        alpha_bar: array-like of shape (T,), decreasing, in (0, 1].

    Returns:
        alpha_bar: float64 array of shape (T,).
    """
    alpha_bar = check_alpha_bar(alpha_bar)
    root = np.sqrt(alpha_bar)
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    out = root**2
    out[-1] = 2.0**-24
    return out


def make_alpha_bar(
    schedule: str = "linear",
    n_steps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    rescale_zero_snr: bool = False,
) -> np.ndarray:
    """alpha_bar of a named beta schedule (see `make_betas`), optionally zero-terminal-SNR.

    Returns:
        alpha_bar: float64 array of shape (n_steps,).
    """
    alpha_bar = alpha_bar_from_betas(make_betas(schedule, n_steps, beta_start, beta_end))
    return rescale_zero_terminal_snr(alpha_bar) if rescale_zero_snr else alpha_bar


def check_alpha_bar(alpha_bar, *, allow_zero_last: bool = False) -> np.ndarray:
    """Validate a user-given alpha_bar: 1-D, finite, in (0, 1], non-increasing.

    Args:
        alpha_bar: array-like or tensor of shape (T,).
        allow_zero_last: accept alpha_bar[T - 1] = 0, the zero terminal SNR of diffusers'
            DDIMScheduler with rescale_betas_zero_snr (fine for v_prediction models).

    Returns:
        alpha_bar: float64 array of shape (T,) (a copy).
    """
    alpha_bar = _as_float64_vector("alpha_bar", alpha_bar)
    valid = (alpha_bar > 0) & (alpha_bar <= 1)
    if allow_zero_last:
        valid[-1] |= alpha_bar[-1] == 0
    if not np.all(valid):
        bad = int(np.flatnonzero(~valid)[0])
        raise ValueError(f"alpha_bar must lie in (0, 1], got alpha_bar[{bad}] = {alpha_bar[bad]}")
    if np.any(np.diff(alpha_bar) > 0):
        raise ValueError("alpha_bar must be non-increasing in t")
    return alpha_bar


def ddim_timesteps(
    n_train_steps: int,
    n_steps: int | None = None,
    discretize: str | Sequence[int] = "uniform",
    steps_offset: int = 0,
) -> np.ndarray:
    """The increasing time steps tau_1 < ... < tau_S that DDIM visits.

    Args:
        n_train_steps: T, the length of alpha_bar.
        n_steps: S, the number of DDIM steps (ignored for an explicit list).
        discretize: `uniform` or `quad` exactly as labml's sampler (with its `+1`;
            `uniform` yields len(range(0, T, T // S)) steps, which can exceed S when S
            does not divide T, and `quad` can repeat a step when S is large); `leading`,
            `trailing`, `linspace` as diffusers' `timestep_spacing`; or an explicit
            strictly increasing sequence of ints in [0, T).
        steps_offset: added to `leading` steps (diffusers' `steps_offset`).

    Returns:
        time_steps: int64 array of shape (S',), in [0, T).
    """
    T = _check_int("n_train_steps", n_train_steps, low=1)
    if not isinstance(discretize, str):
        steps = np.asarray(list(discretize))
        if steps.ndim != 1 or steps.size == 0 or not np.issubdtype(steps.dtype, np.integer):
            raise ValueError(f"an explicit discretize must be a non-empty sequence of ints, got {discretize!r}")
        if np.any(np.diff(steps) <= 0):
            raise ValueError(f"explicit time steps must be strictly increasing, got {steps.tolist()}")
        if steps[0] < 0 or steps[-1] >= T:
            raise ValueError(f"explicit time steps must lie in [0, {T}), got {steps.tolist()}")
        return steps.astype(np.int64)

    S = _check_int("n_steps", n_steps, low=1)
    if S > T:
        raise ValueError(f"n_steps={S} exceeds the model's {T} training steps")
    if discretize == "uniform":
        steps = np.arange(0, T, T // S) + 1
    elif discretize == "quad":
        steps = (np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(np.int64) + 1
    elif discretize == "leading":
        steps = np.arange(S) * (T // S) + _check_int("steps_offset", steps_offset, low=0)
    elif discretize == "trailing":
        steps = (np.round(np.arange(T, 0, -T / S)) - 1)[::-1]
    elif discretize == "linspace":
        steps = np.linspace(0, T - 1, S).round()
    else:
        raise ValueError(f"discretize must be one of {DISCRETIZATIONS} or a sequence of ints, got {discretize!r}")
    steps = steps.astype(np.int64)
    if steps[-1] >= T:
        raise ValueError(
            f"discretize={discretize!r} with n_steps={S} reaches time step {int(steps[-1])}, "
            f"outside alpha_bar's {T} entries; choose another n_steps"
        )
    return steps


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _as_float64_vector(name: str, values) -> np.ndarray:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a 1-D array of floats, got {values!r}")
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{name} must be a 1-D array of floats, got {type(values).__name__}") from None
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite")
    return array
