"""Adapting models to the samplers' protocol: eps = model(x, t, cond), plus alpha_bar."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .schedules import BETA_SCHEDULES, alpha_bar_from_betas, check_alpha_bar, make_alpha_bar


def resolve_model(model, alpha_bar=None, *, allow_zero_snr: bool = False) -> tuple[Callable, np.ndarray]:
    """The eps function and float64 alpha_bar of a model.

    Args:
        model: an object with `alpha_bar` (T,) or `betas` (T,) (and optionally `n_steps`)
            that is called as model(x, t, cond) -> eps, like labml's LatentDiffusion; or
            any callable (x, t, cond) -> eps together with `alpha_bar`.
        alpha_bar: overrides the model's: a (T,) array/tensor, or the name of a beta
            schedule ("linear", "scaled_linear", "cosine") with T = 1000.
        allow_zero_snr: accept a last alpha_bar of exactly 0 (zero terminal SNR).

    Returns:
        (eps_fn, alpha_bar as a float64 NumPy array of shape (T,)).
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, cond), got {type(model).__name__}")
    if alpha_bar is None:
        alpha_bar = getattr(model, "alpha_bar", None)
        betas = getattr(model, "betas", None)
        if alpha_bar is None and betas is not None:
            alpha_bar = alpha_bar_from_betas(betas)
        if alpha_bar is None:
            raise ValueError("model has no alpha_bar (or betas) attribute: pass alpha_bar= (an array or a "
                             "schedule name)")
    if isinstance(alpha_bar, str):
        if alpha_bar not in BETA_SCHEDULES:
            raise ValueError(f"alpha_bar names an unknown schedule {alpha_bar!r}; expected one of {BETA_SCHEDULES}")
        alpha_bar = make_alpha_bar(alpha_bar, getattr(model, "n_steps", 1000))
    alpha_bar = check_alpha_bar(alpha_bar, allow_zero_last=allow_zero_snr)
    n_steps = getattr(model, "n_steps", None)
    if isinstance(n_steps, (int, np.integer)) and n_steps != len(alpha_bar):
        raise ValueError(f"model.n_steps={n_steps} but alpha_bar has {len(alpha_bar)} entries")
    return model, alpha_bar


def model_device(model) -> torch.device | None:
    """The device a model asks for: its `device` attribute or its first parameter's."""
    device = getattr(model, "device", None)
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return None
