"""Argument checks shared by the samplers: clear errors before any work starts.

They read only shapes, dtypes and devices, never tensor values, so they never force a
host-device synchronisation.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_int(name: str, value, low: int, high: int) -> int:
    """value as an int in [low, high], else TypeError/ValueError naming `name`."""
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def check_float(name: str, value, low: float = -math.inf) -> float:
    """value as a finite float >= low."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be finite and >= {low}, got {value}")
    return value


def check_tensor(name: str, t, *, shape=None, device=None, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """t as a tensor of the given shape (None entries match anything), device and dtypes."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}, expected one of {', '.join(str(d) for d in dtypes)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device}, expected {torch.device(device)}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(w is None or w == s for w, s in zip(shape, t.shape))
        if not ok:
            want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")
    return t


def check_shape(shape) -> tuple[int, ...]:
    """A sample shape (B, *s) of positive ints."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) < 1:
        raise TypeError(f"shape must be a tuple (B, *sample_shape), got {shape!r}")
    for i, s in enumerate(shape):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise ValueError(f"shape must hold positive ints, got {tuple(shape)} (entry {i})")
    return tuple(int(s) for s in shape)


def broadcast_batch(name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t as a contiguous (1 or B, *s) tensor matching x (B, *s); copies only if strided."""
    check_tensor(name, t, device=x.device)
    if tuple(t.shape[1:]) != tuple(x.shape[1:]) or t.dim() != x.dim() or t.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected (1 or {x.shape[0]}, *{tuple(x.shape[1:])})")
    return t.contiguous()
