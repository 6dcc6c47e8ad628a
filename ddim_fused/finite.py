"""Refusing NaN and Inf results before they are written or reported as success."""
from __future__ import annotations

import torch


class NonFiniteError(RuntimeError):
    """Generated values hold NaN or Inf."""


def check_finite(x: torch.Tensor, what: str, *, first_index: int = 0, hint: str = "") -> None:
    """Raise NonFiniteError if any value of the batch x is NaN or +-Inf.

    Costs one reduction on x's device and one host synchronisation; only a failing batch
    pays for locating its first bad sample.

    Args:
        x: (B, ...) tensor of B samples, any float dtype and device.
        what: what x is, for the message (e.g. "generated samples").
        first_index: the global index of x[0], so the message names the sample in the run.
        hint: the likely cause, appended to the message.

    Raises:
        TypeError: x is not a tensor with a batch dimension.
        NonFiniteError: naming the first bad sample, how many of the batch are bad, and `hint`.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        got = f"a {x.dim()}-d tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a (B, ...) tensor, got {got}")
    if bool(torch.isfinite(x).all()):
        return
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    rows = bad.nonzero().flatten().tolist()
    message = (f"{what}: sample {first_index + rows[0]} is not finite (NaN or Inf); "
               f"{len(rows)} of the {x.shape[0]} in its batch are")
    raise NonFiniteError(f"{message}; {hint}" if hint else message)
