"""The step contract: everything one fused DDIM update needs besides its tensors in and out.

Per element, in fp32:
    eps     = eps_u + guidance * (eps_c - eps_u)        (guidance: model_out is [uncond; cond])
    x_prev  = x_coef * x + eps_coef * eps + noise_coef * noise
    pred_x0 = x0_coefs[0] * x + x0_coefs[1] * eps       (written when x0_out is given)
    x_prev  = orig_t * m + x_prev * (1 - m)             (paint), orig_t = orig_coef * orig + orig_noise_coef * n'

Both step functions, the Triton launcher (`ddim_fused.kernels.launch_ddim_step`) and the
torch path (`ddim_fused.torch_step.torch_ddim_step`), take
`(x, model_out, out, step: StepArgs, x0_out=None, eps_out=None)`; `ddim_fused.backend`
picks one. Noise is read from `noise` when given, else drawn from the keyed Philox
stream with `seed` when noise_coef != 0; the same holds for `orig_noise`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .masks import MaskLayout


class StepArgs(NamedTuple):
    """Coefficients (host floats, rounded once to fp32 in the kernel) and options of one step.

    Tensors are contiguous and on x's device: noise, orig and orig_noise (1 or B, *s);
    mask a MaskLayout. Immutable; a NamedTuple rather than a dataclass because a sampler
    call builds one per step and a frozen dataclass costs six times as much to build.
    """

    x_coef: float
    eps_coef: float
    guidance: Optional[float] = None
    noise_coef: float = 0.0
    noise: Optional[torch.Tensor] = None
    seed: Optional[int] = None
    step_key: int = 0
    sample_offset: int = 0
    repeat_noise: bool = False
    x0_coefs: tuple[float, float] = (0.0, 0.0)
    mask: Optional[MaskLayout] = None
    orig: Optional[torch.Tensor] = None
    orig_coef: float = 0.0
    orig_noise_coef: float = 0.0
    orig_noise: Optional[torch.Tensor] = None

    @property
    def draws_noise(self) -> bool:
        """Whether the step draws its own keyed noise (no noise tensor given)."""
        return self.noise_coef != 0.0 and self.noise is None

    @property
    def draws_orig_noise(self) -> bool:
        return self.mask is not None and self.orig_noise_coef != 0.0 and self.orig_noise is None
