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


def nonfinite_hint(guidance, dtype: str, model_check: str, outcome: str) -> str:
    """The likely causes of NaN/Inf output, for NonFiniteError's `hint`.

    Args:
        guidance: the classifier-free guidance scale (None or 1 for none).
        dtype: the run's dtype name, e.g. "float16".
        model_check: what to check when the model itself returns NaN (e.g. "--weights").
        outcome: what happened to the output, e.g. "nothing was written".
    """
    causes = []
    if guidance is not None and abs(guidance) > 20:
        causes.append(f"the guidance scale {guidance:g} is far too large (1 to 10 is usual)")
    if dtype == "float16":
        causes.append("float16 overflowed (try float32 or bfloat16)")
    causes.append(f"the model returns NaN or Inf (check {model_check})")
    return "likely cause: " + "; or ".join(causes) + f"; {outcome}"
