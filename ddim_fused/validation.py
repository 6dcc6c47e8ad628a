"""Argument checks shared by the samplers: clear errors before any work starts.

They read only shapes, dtypes and devices, never tensor values, so they never force a
host-device synchronisation.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Scalars the steps use in float32 (coefficients, guidance, temperature) must fit it.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# Elements of one tensor: the keyed noise counts them in int64 with room to spare.
MAX_NUMEL = 2**62


def check_int(name: str, value, low: int, high: int) -> int:
    """value as an int in [low, high], else TypeError/ValueError naming `name`."""
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def check_sample_offset(sample_offset, batch: int) -> int:
    """sample_offset as an int with every sample index sample_offset + b (b < batch) below 2**32,
    the range keyed noise indexes samples in; ValueError naming the batch when it alone exceeds it."""
    if batch > 2**32:
        raise ValueError(f"a batch of {batch} samples exceeds the 2**32 sample indices of the keyed noise; "
                         "split it into batches (with sample_offset) instead")
    return check_int("sample_offset", sample_offset, 0, 2**32 - batch)


def check_device(device) -> torch.device:
    """device as a torch.device that exists here, else ValueError (torch would raise an AssertionError)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} needs CUDA, which is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_float(name: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    """value (any real number but a bool) as a finite float in [low, high], else TypeError/ValueError."""
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        try:
            value = float(value)
        except OverflowError:
            raise ValueError(f"{name} must be finite, got an int too large for a float") from None
    if not (math.isfinite(value) and low <= value <= high):
        bounds = (f"in [{low:g}, {high:g}]" if math.isfinite(low) and math.isfinite(high)
                  else f">= {low:g}" if math.isfinite(low) else f"<= {high:g}" if math.isfinite(high) else "")
        raise ValueError(f"{name} must be finite{' and ' + bounds if bounds else ''}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """value as a bool (Python's or numpy's), else TypeError: a string such as "no" is not False."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


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
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) > MAX_NUMEL:
        raise ValueError(f"shape {shape} has {math.prod(shape)} elements, more than the 2**62 the keyed noise "
                         "can index")
    return shape


def broadcast_batch(name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t as a contiguous (1 or B, *s) tensor matching x (B, *s); copies only if strided."""
    check_tensor(name, t, device=x.device)
    if tuple(t.shape[1:]) != tuple(x.shape[1:]) or t.dim() != x.dim() or t.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected (1 or {x.shape[0]}, *{tuple(x.shape[1:])})")
    return t.contiguous()
