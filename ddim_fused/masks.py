"""How a paint mask is laid out against x: host code shared by the kernel and the torch path."""
from __future__ import annotations

from typing import NamedTuple

import torch


class MaskLayout(NamedTuple):
    """How a paint mask is indexed inside one sample (see `mask_layout`)."""

    mask: torch.Tensor  # contiguous, shape (1 or B, *m) with m broadcastable to x.shape[1:]
    batch_stride: int  # 0 when one mask serves the whole batch
    mid: int  # product of the sample dims the mask broadcasts over (1 if none)
    inner: int  # product of the sample dims after them

    @property
    def dense(self) -> bool:
        """True when the mask holds one value per element of a sample."""
        return self.mid == 1 and self.inner == 1


def mask_layout(mask: torch.Tensor, x_shape: tuple[int, ...]) -> MaskLayout:
    """Describe how `mask` broadcasts against x of shape (B, *s).

    The kernel handles masks whose broadcast dims within a sample form one contiguous
    run, e.g. (B, 1, H, W), (1, 1, H, W), (B, C, 1, 1) against (B, C, H, W). Any
    other pattern, e.g. (B, 1, H, 1), is expanded once here into a (1 or B, *s) copy.

    Args:
        mask: tensor broadcastable to x_shape, batch dim 1 or B (made contiguous here,
            a copy only if it is strided).
        x_shape: (B, *s).

    Returns:
        MaskLayout; ValueError if mask does not broadcast to x_shape.
    """
    sample_shape = tuple(x_shape[1:])
    padded = (1,) * (len(x_shape) - mask.dim()) + tuple(mask.shape)
    if mask.dim() > len(x_shape) or not all(m in (1, d) for m, d in zip(padded, x_shape)):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, which does not broadcast to x's shape {tuple(x_shape)}")
    mask = mask.contiguous().reshape(padded)
    per_sample = padded[1:]
    batch_stride = 0 if padded[0] == 1 else mask[0].numel()
    broadcast = [i for i, (m, d) in enumerate(zip(per_sample, sample_shape)) if m == 1 and d != 1]
    if not broadcast:
        return MaskLayout(mask, batch_stride, 1, 1)
    first, last = broadcast[0], broadcast[-1]
    if all(per_sample[i] == 1 or sample_shape[i] == 1 for i in range(first, last + 1)):
        mid = 1
        for d in sample_shape[first : last + 1]:
            mid *= d
        inner = 1
        for d in sample_shape[last + 1 :]:
            inner *= d
        return MaskLayout(mask, batch_stride, mid, inner)
    dense = mask.expand((padded[0],) + sample_shape).contiguous()
    return MaskLayout(dense, 0 if padded[0] == 1 else dense[0].numel(), 1, 1)
