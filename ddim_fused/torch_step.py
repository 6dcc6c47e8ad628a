"""The DDIM step with torch ops: the CPU path, with the kernel's contract and semantics.

Same host coefficients and the same noise stream as kernels/ddim_step.py; the update
runs as a few fused multiply-adds into one accumulator (fp32 for fp16/bf16 inputs,
as in the kernel's registers).
"""
from __future__ import annotations

import torch

from .philox import keyed_normal_torch
from .step_args import StepArgs


def torch_ddim_step(x: torch.Tensor, model_out: torch.Tensor, out: torch.Tensor, step: StepArgs,
                    x0_out: torch.Tensor | None = None, eps_out: torch.Tensor | None = None) -> torch.Tensor:
    """x_prev into `out`, exactly as `ddim_fused.step_args` defines the step.

    Args:
        x: (B, *s); model_out: (B, *s), or (2B, *s) [uncond; cond] under guidance.
        out: (B, *s) buffer for x_prev (may be x itself).
        step: the step's coefficients and options.
        x0_out, eps_out: optional (B, *s) buffers for pred_x0 and the guided eps.

    Returns:
        out: (B, *s).
    """
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    B = x.shape[0]
    if step.guidance is not None:
        eps_u = _as(model_out[:B], compute)
        eps = torch.lerp(eps_u, _as(model_out[B:], compute), step.guidance) if B else eps_u
    else:
        eps = _as(model_out, compute)
    xc = _as(x, compute)
    # Results go straight into fp32 (fp64) outputs; fp16/bf16 outputs get one rounding copy.
    if x0_out is not None:
        x0_x, x0_eps = step.x0_coefs
        if x0_out.dtype == compute:
            torch.mul(xc, x0_x, out=x0_out).add_(eps, alpha=x0_eps)
        else:
            x0_out.copy_(torch.add(xc * x0_x, eps, alpha=x0_eps))
    if eps_out is not None:
        eps_out.copy_(eps)
    direct = out.dtype == compute and out.data_ptr() != x.data_ptr()
    acc = torch.mul(xc, step.x_coef, out=out) if direct else torch.mul(xc, step.x_coef)
    acc.add_(eps, alpha=step.eps_coef)
    if step.noise_coef != 0.0:
        noise = step.noise
        if noise is None:
            noise = _keyed(x, step, "step", step.repeat_noise)
        acc.add_(_as(noise, compute), alpha=step.noise_coef)
    if step.mask is not None:
        orig_t = _as(step.orig, compute) * step.orig_coef
        if step.orig_noise_coef != 0.0:
            orig_noise = step.orig_noise if step.orig_noise is not None else _keyed(x, step, "orig", False)
            orig_t = torch.add(orig_t, _as(orig_noise, compute), alpha=step.orig_noise_coef)
        # orig_t * m + acc * (1 - m), exact at m = 0 and 1.
        acc.lerp_(orig_t, _as(step.mask.mask, compute))
    return out if direct else out.copy_(acc)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; t itself when it already is (a no-op .to() still costs a dispatch per step)."""
    return t if t.dtype is dtype else t.to(dtype)


def _keyed(x: torch.Tensor, step: StepArgs, stream: str, repeat: bool) -> torch.Tensor:
    numel = x.numel() // x.shape[0] if x.shape[0] else 0
    return keyed_normal_torch(x.shape[0], numel, step.seed, step.step_key, stream, step.sample_offset,
                              repeat=repeat, device=x.device).view(x.shape)



def torch_step_runner(step: StepArgs, dtype: torch.dtype):
    """A step function bound to one step's arguments, for a loop that knows them in advance.

    run(x, model_out, out, x0_out=None) -> out computes what
    `torch_ddim_step(x, model_out, out, step, x0_out)` computes, with the same torch ops
    in the same order (so the same bits), minus its per-call decisions: for x, out and
    x0_out of `dtype` float32 or float64, no mask, and noise either given or not needed,
    a step is 2 to 5 torch ops. Otherwise, or when the model's output comes in another
    dtype, it calls torch_ddim_step.

    Args:
        step: the step's StepArgs (a noise tensor is converted to `dtype` once here).
        dtype: of x, out and x0_out.

    Returns:
        run(x (B, *s), model_out (B or 2B, *s), out (B, *s), x0_out (B, *s) | None) -> out.
        out must not share memory with x or model_out (the torch_ddim_step fallback allows it).
    """

    def generic(x, model_out, out, x0_out=None):
        return torch_ddim_step(x, model_out, out, step, x0_out)

    if dtype not in (torch.float32, torch.float64) or step.mask is not None or step.draws_noise:
        return generic
    x_coef, eps_coef, guidance = step.x_coef, step.eps_coef, step.guidance
    x0_x, x0_eps = step.x0_coefs
    noise_coef = step.noise_coef
    noise = None
    if noise_coef != 0.0:
        noise = _as(step.noise, dtype)

    def run(x, model_out, out, x0_out=None):
        if model_out.dtype is not dtype or x.dtype is not dtype:
            return generic(x, model_out, out, x0_out)
        if guidance is None:
            eps = model_out
        else:
            uncond, cond = model_out.tensor_split(2)
            eps = torch.lerp(uncond, cond, guidance)
        if x0_out is not None:
            torch.mul(x, x0_x, out=x0_out).add_(eps, alpha=x0_eps)
        torch.mul(x, x_coef, out=out).add_(eps, alpha=eps_coef)
        if noise is not None:
            out.add_(noise, alpha=noise_coef)
        return out

    return run
