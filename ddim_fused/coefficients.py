"""Per-step DDIM coefficients, computed once per sampler in float64 on the host.

The DDIM update is linear in (x, eps, noise):
    pred_x0 = (x - sqrt(1 - a) * eps) / sqrt(a)
    x_prev  = sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev - sigma**2) * eps + noise_scale * noise
            = x_coef * x + eps_coef * eps + noise_scale * noise
Both the Triton kernel and the torch path consume these arrays; neither recomputes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

SIGMA_HAT = "sigma_hat"
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


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
    # DDIM inversion, from the level alpha_prev up to alpha (eta = 0):
    # x_next = sqrt(a) * pred_x0(x, eps at a_prev) + sqrt(1 - a) * eps.
    inv_x_coef: np.ndarray
    inv_eps_coef: np.ndarray

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
) -> DDIMCoefficients:
    """Compute every step's coefficients.

    Args:
        alpha_bar: (T,) float64, validated (see schedules.check_alpha_bar).
        time_steps: (S,) increasing int64 in [0, T).
        eta: DDIM's eta >= 0 (0 deterministic, 1 DDPM-like), or "sigma_hat": the DDIM
            paper's sigma-hat (Table 1), whose noise scale is sqrt(1 - a / a_prev) while
            dir_xt keeps sigma(eta=1).
        final_alpha_bar: a_prev of the last step; None for alpha_bar[0] as labml's
            sampler, 1.0 for diffusers' set_alpha_to_one.

    Returns:
        DDIMCoefficients.
    """
    if isinstance(eta, str):
        if eta != SIGMA_HAT:
            raise ValueError(f"eta must be a float >= 0 or {SIGMA_HAT!r}, got {eta!r}")
        dir_eta = 1.0
    else:
        if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating, np.integer)):
            raise TypeError(f"eta must be a float or {SIGMA_HAT!r}, got {type(eta).__name__}")
        dir_eta = float(eta)
        if not (math.isfinite(dir_eta) and dir_eta >= 0):
            raise ValueError(f"eta must be finite and >= 0, got {eta}")
    first = float(alpha_bar[0]) if final_alpha_bar is None else float(final_alpha_bar)
    if not 0.0 < first <= 1.0:
        raise ValueError(f"final_alpha_bar must be in (0, 1], got {first}")

    alpha = alpha_bar[time_steps]
    alpha_prev = np.concatenate(([first], alpha_bar[time_steps[:-1]]))
    if np.any(alpha >= 1.0):
        bad = int(np.flatnonzero(alpha >= 1.0)[0])
        raise ValueError(f"alpha_bar at time step {int(time_steps[bad])} is 1: the step divides by 1 - alpha_bar")
    sigma = dir_eta * np.sqrt(ddim_variance(alpha, alpha_prev))
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
    sqrt_alpha = np.sqrt(alpha)
    sqrt_one_minus_alpha = np.sqrt(1 - alpha)
    x0_x_coef = 1 / sqrt_alpha
    x0_eps_coef = -sqrt_one_minus_alpha / sqrt_alpha
    x_coef = np.sqrt(alpha_prev) * x0_x_coef
    eps_coef = np.sqrt(alpha_prev) * x0_eps_coef + np.sqrt(dir_sq)
    inv_x_coef = np.sqrt(alpha / alpha_prev)
    inv_eps_coef = np.sqrt(1 - alpha) - np.sqrt(alpha) * np.sqrt(1 - alpha_prev) / np.sqrt(alpha_prev)
    coefs = DDIMCoefficients(
        time_steps=np.asarray(time_steps, dtype=np.int64),
        alpha=alpha,
        alpha_prev=alpha_prev,
        sigma=sigma,
        noise_scale=noise_scale,
        x_coef=x_coef,
        eps_coef=eps_coef,
        x0_x_coef=x0_x_coef,
        x0_eps_coef=x0_eps_coef,
        inv_x_coef=inv_x_coef,
        inv_eps_coef=inv_eps_coef,
    )
    for name in ("sigma", "noise_scale", "x_coef", "eps_coef", "x0_x_coef", "x0_eps_coef", "inv_x_coef", "inv_eps_coef"):
        values = getattr(coefs, name)
        if not np.all(np.isfinite(values)):
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise ValueError(f"coefficient {name} is not finite at step index {bad} (time step {int(time_steps[bad])})")
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
    # numpy scalars so that a zero-SNR step divides to inf/nan like torch, not raising.
    with np.errstate(all="ignore"):
        a, a_prev = np.float64(alpha_t), np.float64(alpha_prev)
        sa, sb = np.sqrt(a), np.sqrt(1.0 - a)
        if prediction_type == "epsilon":
            x0_split, eps = (1.0, -sb, sa), (0.0, 1.0)
        elif prediction_type == "sample":
            x0_split, eps = (0.0, 1.0, 1.0), (1.0 / sb, -sa / sb)
        elif prediction_type == "v_prediction":
            x0_split, eps = (sa, -sb, 1.0), (sb, sa)
        else:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        x0 = (x0_split[0] / x0_split[2], x0_split[1] / x0_split[2])
        std = np.float64(eta) * np.sqrt(np.float64(variance))
        prev_eps = np.sqrt(1.0 - a_prev - std * std)
        return StepCoefficients(
            x0=(float(x0[0]), float(x0[1])), x0_split=tuple(float(c) for c in x0_split), eps=(float(eps[0]), float(eps[1])),
            eps_from_x0=(float(1.0 / sb), float(-sa / sb)),
            prev_x0=float(np.sqrt(a_prev)), prev_eps=float(prev_eps), std=float(std),
        )
