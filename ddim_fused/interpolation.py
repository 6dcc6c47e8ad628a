"""Spherical interpolation between latents (DDIM's semantic interpolation)."""
from __future__ import annotations

import numbers
import reprlib

import torch

from .validation import check_tensor


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha) -> torch.Tensor:
    """Spherical linear interpolation between two latents, taken as flat vectors.

    Gaussian latents concentrate on a sphere; slerp stays near it where a straight
    line would pass through low-norm, unlikely latents.

    Args:
        z0, z1: tensors of one shape s (e.g. (C, H, W) or (B, C, H, W)), float dtype.
        alpha: float in [0, 1], or a 1-D tensor/sequence of K such weights.

    Returns:
        a tensor of shape s for a float alpha, (K, *s) for K weights; z0 at 0, z1 at 1.
    """
    check_tensor("z0", z0)
    check_tensor("z1", z1, shape=tuple(z0.shape), device=z0.device)
    if isinstance(alpha, bool):
        raise TypeError("alpha must be a float or a 1-D sequence of weights, got bool")
    scalar = isinstance(alpha, numbers.Real) or (isinstance(alpha, torch.Tensor) and alpha.dim() == 0)
    if isinstance(alpha, (str, bytes)) or (isinstance(alpha, torch.Tensor) and (alpha.is_complex()
                                                                              or alpha.dtype == torch.bool)):
        raise TypeError(f"alpha must be a float or a 1-D sequence of weights, got {reprlib.repr(alpha)}")
    try:
        weights = torch.as_tensor(alpha, dtype=torch.float64)
    except OverflowError:
        raise ValueError(f"alpha must lie in [0, 1], got {reprlib.repr(alpha)}") from None
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"alpha must be a float or a 1-D sequence of weights, got {reprlib.repr(alpha)}") from None
    weights = weights.reshape(1) if scalar else weights
    if weights.dim() != 1 or weights.numel() == 0:
        raise ValueError(f"alpha must be a float or a 1-D sequence of weights, got shape {tuple(weights.shape)}")
    if not torch.all((weights >= 0) & (weights <= 1)):
        raise ValueError(f"alpha must lie in [0, 1], got {weights.tolist()}")
    a, b = z0.double().flatten(), z1.double().flatten()
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    w = weights.view(-1, 1)
    if theta.item() < 1e-4:  # nearly parallel: slerp tends to lerp
        out = (1 - w) * a + w * b
    else:
        out = (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)
    out = out.to(z0.dtype).view((len(weights),) + tuple(z0.shape))
    return out[0] if scalar else out
