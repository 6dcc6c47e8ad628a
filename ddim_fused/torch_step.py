"""The DDIM step with torch ops: the CPU path, with the kernel's arguments and semantics.

Same host coefficients and the same noise stream as kernels/ddim_step.py; the update
runs as a few fused multiply-adds into one accumulator (fp32 for fp16/bf16 inputs,
as in the kernel's registers).
"""
from __future__ import annotations

import torch

from .philox import keyed_normal_torch


def torch_ddim_step(
    x, model_out, out, *,
    x_coef, eps_coef, guidance=None,
    noise_coef=0.0, noise=None, seed=None, step_key=0, sample_offset=0, repeat_noise=False,
    x0_coefs=None, x0_out=None, eps_out=None,
    mask=None, orig=None, orig_coef=0.0, orig_noise_coef=0.0, orig_noise=None,
):
    """x_prev into `out`, exactly as `ddim_fused.kernels.launch_ddim_step` defines it.

    Args: as `ddim_fused.kernels.ddim_step`; `mask` is a MaskLayout (or None).

    Returns:
        out: (B, *s).
    """
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    B = x.shape[0]
    if guidance is not None:
        eps_u = model_out[:B].to(compute)
        eps = torch.lerp(eps_u, model_out[B:].to(compute), guidance) if B else eps_u
    else:
        eps = model_out.to(compute)
    xc = x.to(compute)
    # Results go straight into fp32 (fp64) outputs; fp16/bf16 outputs get one rounding copy.
    if x0_out is not None:
        if x0_out.dtype == compute:
            torch.mul(xc, x0_coefs[0], out=x0_out).add_(eps, alpha=x0_coefs[1])
        else:
            x0_out.copy_(torch.add(xc * x0_coefs[0], eps, alpha=x0_coefs[1]))
    if eps_out is not None:
        eps_out.copy_(eps)
    direct = out.dtype == compute and out.data_ptr() != x.data_ptr()
    acc = torch.mul(xc, x_coef, out=out) if direct else torch.mul(xc, x_coef)
    acc.add_(eps, alpha=eps_coef)
    if noise_coef != 0.0:
        if noise is None:
            noise = keyed_normal_torch(B, x[0].numel(), seed, step_key, "step", sample_offset,
                                       repeat=repeat_noise, device=x.device).view(x.shape)
        acc.add_(noise.to(compute), alpha=noise_coef)
    if mask is not None:
        orig_t = orig.to(compute) * orig_coef
        if orig_noise_coef != 0.0:
            if orig_noise is None:
                orig_noise = keyed_normal_torch(B, x[0].numel(), seed, step_key, "orig", sample_offset,
                                                device=x.device).view(x.shape)
            orig_t = torch.add(orig_t, orig_noise.to(compute), alpha=orig_noise_coef)
        acc.lerp_(orig_t, mask.mask.to(compute))  # orig_t * m + acc * (1 - m), exact at m = 0 and 1
    return out if direct else out.copy_(acc)
