"""Per-step DDIM coefficients, computed once per sampler in float64 on the host.

The DDIM update is linear in (x, m), m the model's output (eps, v or x0 by prediction type):
    pred_x0  = x0[0] * x + x0[1] * m              pred_eps = eps[0] * x + eps[1] * m
    x_prev   = sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev - sigma**2) * pred_eps + noise_scale * noise
             = x_coef * x + eps_coef * m + noise_scale * noise
`prediction_maps` is the one place that turns a prediction type into (x0, eps); both the
sampler's tables (`ddim_coefficients`) and the diffusers scheduler's per-step coefficients
(`step_coefficients`) are built from it. The Triton kernel and the torch path consume these
numbers; neither recomputes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from .validation import check_float

SIGMA_HAT = "sigma_hat"
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class PredictionMaps(NamedTuple):
    """pred_x0 and pred_eps as linear maps of (x, m) at level alpha (floats or (S,) arrays).

    pred_x0  = x0[0] * x + x0[1] * m = (x0_split[0] * x + x0_split[1] * m) / x0_split[2]
    pred_eps = eps[0] * x + eps[1] * m
    eps_from_x0 re-derives pred_eps from a (clipped) pred_x0: eps_from_x0[0] * x + eps_from_x0[1] * pred_x0.
    """

    x0_split: tuple
    x0: tuple
    eps: tuple
    eps_from_x0: tuple


def prediction_maps(alpha, prediction_type: str) -> PredictionMaps:
    """The linear maps from (x, model output) to pred_x0 and pred_eps, as diffusers defines them.

    Args:
        alpha: alpha_bar of the level x is at: a float or a float64 array (S,).
        prediction_type: `epsilon` (m = eps), `sample` (m = x0) or `v_prediction`
            (m = sqrt(a) * eps - sqrt(1 - a) * x0).

    Returns:
        PredictionMaps of numpy float64 scalars or arrays. alpha = 0 (zero terminal SNR) gives
        inf/nan entries for the types that divide by sqrt(alpha), as diffusers' float math does.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    with np.errstate(all="ignore"):
        a = np.asarray(alpha, dtype=np.float64)
        sa, sb = np.sqrt(a), np.sqrt(1.0 - a)
        zero, one = np.zeros_like(a), np.ones_like(a)
        if prediction_type == "epsilon":
            x0_split, eps = (one, -sb, sa), (zero, one)
        elif prediction_type == "sample":
            x0_split, eps = (zero, one, one), (1.0 / sb, -sa / sb)
        else:
            x0_split, eps = (sa, -sb, one), (sb, sa)
        x0 = (x0_split[0] / x0_split[2], x0_split[1] / x0_split[2])
        return PredictionMaps(x0_split, x0, eps, (1.0 / sb, -sa / sb))


def ddim_variance(alpha: np.ndarray, alpha_prev: np.ndarray) -> np.ndarray:
    """The DDIM variance of a step from level alpha to alpha_prev (sigma at eta = 1, squared).

    sigma**2 = (1 - a_prev) / (1 - a) * (1 - a / a_prev); sigma(eta) = eta * sqrt(variance).
    """
    with np.errstate(all="ignore"):
        return (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)


@dataclass(frozen=True)
class DDIMCoefficients:
    """Coefficients of every DDIM step, indexed like labml's `ddim_*` arrays.

    Index i (0 = last step, S - 1 = first) goes from time step tau_i to tau_{i-1}.
    All arrays are float64 of shape (S,); time_steps is int64.
    """

    time_steps: np.ndarray
    alpha: np.ndarray
    alpha_prev: np.ndarray
    sigma: np.ndarray  # enters dir_xt: sqrt(1 - a_prev - sigma**2)
    noise_scale: np.ndarray  # multiplies the noise: sigma, or sigma_hat
    x_coef: np.ndarray
    eps_coef: np.ndarray
    x0_x_coef: np.ndarray
    x0_eps_coef: np.ndarray
    # The parts of the update, for a step that limits pred_x0 between two launches:
    # pred_x0 = (x0_split[0] x + x0_split[1] m) / x0_split[2], pred_eps = pred_eps_coefs . (x, m),
    # x_prev = sqrt(alpha_prev) * pred_x0 + dir_coef * pred_eps + noise_scale * noise.
    x0_split: np.ndarray  # (3, S)
    pred_eps_coefs: np.ndarray  # (2, S)
    dir_coef: np.ndarray  # sqrt(1 - a_prev - sigma**2)
    # DDIM inversion, from the level alpha_prev up to alpha (eta = 0):
    # x_next = sqrt(a) * pred_x0(x, eps at a_prev) + sqrt(1 - a) * eps.
    inv_x_coef: np.ndarray
    inv_eps_coef: np.ndarray
    prediction_type: str = "epsilon"

    @property
    def n_steps(self) -> int:
        return len(self.time_steps)

    def q_sample_coefs(self, index: int, level: str = "alpha") -> tuple[float, float]:
        """(sqrt(a_m), sqrt(1 - a_m)) for noising an original to step `index`.

        level="alpha" uses the step's own alpha (labml's q_sample and paint blend);
        level="alpha_prev" uses the level x_prev is at, and a_m = 1 (the clean
        original) at the last step.
        """
        if level == "alpha":
            a = float(self.alpha[index])
        elif level == "alpha_prev":
            a = 1.0 if index == 0 else float(self.alpha_prev[index])
        else:
            raise ValueError(f"level must be 'alpha' or 'alpha_prev', got {level!r}")
        return math.sqrt(a), math.sqrt(1.0 - a)


def ddim_coefficients(
    alpha_bar: np.ndarray,
    time_steps: np.ndarray,
    eta: float | str = 0.0,
    final_alpha_bar: float | None = None,
    *,
    prediction_type: str = "epsilon",
    prev_time_steps: Optional[np.ndarray] = None,
) -> DDIMCoefficients:
    """Compute every step's coefficients.

    Args:
        alpha_bar: (T,) float64, validated (see schedules.check_alpha_bar).
        time_steps: (S,) increasing int64 in [0, T).
        eta: DDIM's eta >= 0 (0 deterministic, 1 DDPM-like), or "sigma_hat": the DDIM
            paper's sigma-hat (Table 1), whose noise scale is sqrt(1 - a / a_prev) while
            dir_xt keeps sigma(eta=1).
        final_alpha_bar: a_prev of a step that goes below time step 0; None for
            alpha_bar[0] as labml's sampler, 1.0 for diffusers' set_alpha_to_one.
        prediction_type: what the model outputs: `epsilon`, `sample` or `v_prediction`.
        prev_time_steps: (S,) int64, the time step each step goes to (negative: below 0,
            so final_alpha_bar); None for the previous entry of time_steps (labml's rule).
            diffusers' DDIMScheduler uses time_steps - T // S whatever the spacing.

    Returns:
        DDIMCoefficients. The inversion coefficients may be non-finite (a `sample`
        model inverted from alpha_prev = 1); the sampler checks them when it inverts.
    """
    if isinstance(eta, str):
        if eta != SIGMA_HAT:
            raise ValueError(f"eta must be a float >= 0 or {SIGMA_HAT!r}, got {eta!r}")
        dir_eta = 1.0
    else:
        dir_eta = check_float("eta", eta, low=0.0)
    first = float(alpha_bar[0]) if final_alpha_bar is None else float(final_alpha_bar)
    if not 0.0 < first <= 1.0:
        raise ValueError(f"final_alpha_bar must be in (0, 1], got {first}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    alpha = alpha_bar[time_steps]
    if prev_time_steps is None:
        alpha_prev = np.concatenate(([first], alpha_bar[time_steps[:-1]]))
    else:
        prev = np.asarray(prev_time_steps, dtype=np.int64)
        if prev.shape != time_steps.shape or np.any(prev >= time_steps):
            raise ValueError("prev_time_steps must hold, for each time step, an earlier one (or a negative value)")
        alpha_prev = np.where(prev >= 0, alpha_bar[np.maximum(prev, 0)], first)
    if np.any(alpha >= 1.0):
        bad = int(np.flatnonzero(alpha >= 1.0)[0])
        raise ValueError(f"alpha_bar at time step {int(time_steps[bad])} is 1: the step divides by 1 - alpha_bar")
    sigma = dir_eta * np.sqrt(ddim_variance(alpha, alpha_prev))
    with np.errstate(all="ignore"):
        noise_scale = np.sqrt(1 - alpha / alpha_prev) if eta == SIGMA_HAT else sigma
    dir_sq = 1 - alpha_prev - sigma**2
    # eta = 1 gives dir_sq = 0 up to rounding; larger eta makes it truly negative.
    dir_sq = np.where((dir_sq < 0) & (dir_sq > -1e-12), 0.0, dir_sq)
    if np.any(dir_sq < 0):
        bad = int(np.flatnonzero(dir_sq < 0)[0])
        raise ValueError(
            f"eta={eta} makes sigma**2 exceed 1 - alpha_prev at step index {bad} "
            f"(time step {int(time_steps[bad])}); use a smaller eta"
        )
    maps = prediction_maps(alpha, prediction_type)
    x0_scale, dir_coef = np.sqrt(alpha_prev), np.sqrt(dir_sq)
    # Inversion: pred_x0 and pred_eps at the level x is at (alpha_prev), then up to alpha.
    inv = prediction_maps(alpha_prev, prediction_type)
    with np.errstate(all="ignore"):
        inv_x_coef = np.sqrt(alpha) * inv.x0[0] + np.sqrt(1 - alpha) * inv.eps[0]
        inv_eps_coef = np.sqrt(alpha) * inv.x0[1] + np.sqrt(1 - alpha) * inv.eps[1]
        x_coef = x0_scale * maps.x0[0] + dir_coef * maps.eps[0]
        eps_coef = x0_scale * maps.x0[1] + dir_coef * maps.eps[1]
    coefs = DDIMCoefficients(
        time_steps=np.asarray(time_steps, dtype=np.int64),
        alpha=alpha,
        alpha_prev=alpha_prev,
        sigma=sigma,
        noise_scale=noise_scale,
        x_coef=x_coef,
        eps_coef=eps_coef,
        x0_x_coef=maps.x0[0],
        x0_eps_coef=maps.x0[1],
        x0_split=np.stack(maps.x0_split),
        pred_eps_coefs=np.stack(maps.eps),
        dir_coef=dir_coef,
        inv_x_coef=inv_x_coef,
        inv_eps_coef=inv_eps_coef,
        prediction_type=prediction_type,
    )
    for name in ("sigma", "noise_scale", "x_coef", "eps_coef", "x0_x_coef", "x0_eps_coef", "x0_split",
                 "pred_eps_coefs"):
        values = getattr(coefs, name)
        if not np.all(np.isfinite(values)):
            bad = int(np.flatnonzero((~np.isfinite(values)).reshape(-1, len(time_steps)).any(axis=0))[0])
            hint = ""
            if alpha[bad] == 0.0:
                hint = (f": alpha_bar is 0 there (zero terminal SNR), where a {prediction_type!r} model cannot "
                        "give pred_x0; use a v_prediction model or time steps that avoid the last one")
            raise ValueError(f"coefficient {name} is not finite at step index {bad} "
                             f"(time step {int(time_steps[bad])}){hint}")
    return coefs


class StepCoefficients(NamedTuple):
    """Host (float64) coefficients of one DDIM step, every output linear in its inputs.

    pred_x0  = x0[0] * sample + x0[1] * model_output
             = (x0_split[0] * sample + x0_split[1] * model_output) / x0_split[2]
    pred_eps = eps[0] * sample + eps[1] * model_output
    x_prev   = prev_x0 * pred_x0 + prev_eps * pred_eps + std * noise
    eps_from_x0 gives pred_eps from a clipped pred_x0 (use_clipped_model_output):
    pred_eps = eps_from_x0[0] * sample + eps_from_x0[1] * pred_x0.
    """

    x0: tuple[float, float]
    x0_split: tuple[float, float, float]
    eps: tuple[float, float]
    eps_from_x0: tuple[float, float]
    prev_x0: float
    prev_eps: float
    std: float

    @property
    def linear(self) -> tuple[float, float]:
        """(x_coef, m_coef) of x_prev (without noise) straight from sample and model_output."""
        return (self.prev_x0 * self.x0[0] + self.prev_eps * self.eps[0],
                self.prev_x0 * self.x0[1] + self.prev_eps * self.eps[1])

    @property
    def from_clipped_x0(self) -> tuple[float, float]:
        """(x0_coef, sample_coef) of x_prev from a clipped pred_x0 whose eps is re-derived."""
        return (self.prev_x0 + self.prev_eps * self.eps_from_x0[1], self.prev_eps * self.eps_from_x0[0])

    @property
    def eps_is_model_output(self) -> bool:
        return self.eps == (0.0, 1.0)


def step_coefficients(alpha_t: float, alpha_prev: float, variance: float, eta: float,
                      prediction_type: str) -> StepCoefficients:
    """All coefficients of one DDIM step, in float64, as diffusers' DDIM step defines them.

    Args:
        alpha_t: alphas_cumprod at the step's time step.
        alpha_prev: alphas_cumprod at the time step the step goes to.
        variance: the DDIM variance of the step (0 for inversion).
        eta: weight of the noise; std = eta * sqrt(variance).
        prediction_type: `epsilon`, `sample` or `v_prediction`.

    Returns:
        StepCoefficients. Degenerate schedules (alpha_t == 0, 1 - alpha_prev < std**2)
        give inf/nan coefficients, as the float32 math in diffusers does.
    """
    maps = prediction_maps(alpha_t, prediction_type)
    # numpy scalars so that a degenerate step gives inf/nan like torch, not raising.
    with np.errstate(all="ignore"):
        std = np.float64(eta) * np.sqrt(np.float64(variance))
        prev_eps = np.sqrt(1.0 - np.float64(alpha_prev) - std * std)
        return StepCoefficients(
            x0=_floats(maps.x0), x0_split=_floats(maps.x0_split), eps=_floats(maps.eps),
            eps_from_x0=_floats(maps.eps_from_x0),
            prev_x0=float(np.sqrt(np.float64(alpha_prev))), prev_eps=float(prev_eps), std=float(std),
        )


def _floats(values) -> tuple:
    return tuple(float(v) for v in values)
