"""Limiting pred_x0 inside a DDIM step: diffusers' clip_sample and dynamic thresholding.

Both are not linear in (x, model output), so a step that uses one runs as two fused
launches around it (see `ddim_fused.plan.SplitStep`): pred_x0 (and pred_eps) first, then
this in torch, then x_prev from the limited pred_x0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .validation import FLOAT32_MAX, check_float


@dataclass(frozen=True)
class X0Limit:
    """How pred_x0 is limited: clipped to [-clip_range, clip_range], or thresholded.

    Dynamic thresholding (Saharia et al. 2022, "Imagen"): per sample, s is the
    `threshold_ratio` quantile of |pred_x0| over all its elements, held in
    [1, max_value]; pred_x0 is clipped to [-s, s] and divided by s.
    """

    clip_range: Optional[float] = None
    threshold_ratio: Optional[float] = None
    max_value: float = 1.0

    @classmethod
    def from_options(cls, clip_sample: bool, clip_sample_range: float, thresholding: bool,
                     dynamic_thresholding_ratio: float, sample_max_value: float) -> Optional["X0Limit"]:
        """The limit that diffusers' DDIMScheduler options describe, or None for none.

        thresholding wins over clip_sample, as in diffusers. Raises ValueError/TypeError
        naming the option that is out of range.
        """
        for name, value in (("clip_sample", clip_sample), ("thresholding", thresholding)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if thresholding:
            ratio = _positive("dynamic_thresholding_ratio", dynamic_thresholding_ratio)
            if ratio > 1.0:
                raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {ratio}")
            max_value = _positive("sample_max_value", sample_max_value)
            if max_value < 1.0:
                raise ValueError(f"sample_max_value must be >= 1, got {max_value}")
            return cls(threshold_ratio=ratio, max_value=max_value)
        if clip_sample:
            return cls(clip_range=_positive("clip_sample_range", clip_sample_range))
        return None

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        """Limit x0 (B, *s) in place (it is the step's own buffer); returns it."""
        if self.threshold_ratio is None:
            return x0.clamp_(-self.clip_range, self.clip_range)
        flat = x0.reshape(x0.shape[0], -1)
        # torch.quantile needs float32/float64.
        work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        s = torch.quantile(work.abs(), self.threshold_ratio, dim=1).clamp_(1.0, self.max_value).unsqueeze(1)
        limited = torch.minimum(torch.maximum(work, -s), s) / s
        return x0.copy_(limited.view(x0.shape))


def _positive(name: str, value) -> float:
    # A bound on float32 values: larger ones cannot be compared with them (torch refuses).
    value = check_float(name, value, 0.0, FLOAT32_MAX)
    if value == 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value
