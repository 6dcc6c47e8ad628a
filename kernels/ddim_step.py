"""The fused DDIM step: one launch reads x and the model output and writes x_prev.

The update it computes is the step contract of `ddim_fused.step_args` (coefficients from
the host, float64 rounded once to fp32 here); noise is read from a tensor or drawn
in-kernel (see noise.py). Inputs are validated by the caller (`ddim_fused.ops.ddim_step`
or a sampler): contiguous tensors on one device, in fp32, fp16 or bf16.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .cast import cast_for_store
from .noise import STREAM_ORIG, STREAM_STEP, keyed_normals

# Noise sources (NOISE_MODE / ORIG_NOISE_MODE).
NO_NOISE = tl.constexpr(0)
NOISE_TENSOR = tl.constexpr(1)
NOISE_PHILOX = tl.constexpr(2)
# Mask layouts (MASK_MODE): none, one value per element of a sample, or a sample
# shape whose broadcast dims form one run: offset = (e // (mid * inner)) * inner + e % inner.
NO_MASK = tl.constexpr(0)
MASK_DENSE = tl.constexpr(1)
MASK_RUN = tl.constexpr(2)

_BLOCK = 4096 if os.environ.get("TRITON_INTERPRET") == "1" else 1024


@triton.jit(do_not_specialize=["seed", "step_key", "sample_offset"])
def _ddim_step_kernel(
    x_ptr, eps_ptr, out_ptr, noise_ptr, x0_ptr, eps_out_ptr, orig_ptr, orig_noise_ptr, mask_ptr,
    N, B,
    x_coef, eps_coef, noise_coef, x0_x_coef, x0_eps_coef, guidance, orig_coef, orig_noise_coef,
    seed, step_key, sample_offset,
    noise_bstride, orig_bstride, orig_noise_bstride, mask_bstride, mask_mid, mask_inner,
    HAS_CFG: tl.constexpr, NOISE_MODE: tl.constexpr, REPEAT_NOISE: tl.constexpr,
    STORE_X0: tl.constexpr, STORE_EPS: tl.constexpr,
    MASK_MODE: tl.constexpr, ORIG_NOISE_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_e = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    first_e = pid_e.to(tl.int64) * BLOCK
    offs_e = first_e + tl.arange(0, BLOCK).to(tl.int64)
    mask_e = offs_e < N
    offs = pid_b * N + offs_e

    b_x = tl.load(x_ptr + offs, mask=mask_e).to(tl.float32)
    if HAS_CFG:
        b_eps_u = tl.load(eps_ptr + offs, mask=mask_e).to(tl.float32)
        b_eps_c = tl.load(eps_ptr + (pid_b + B) * N + offs_e, mask=mask_e).to(tl.float32)
        b_eps = b_eps_u + guidance * (b_eps_c - b_eps_u)
    else:
        b_eps = tl.load(eps_ptr + offs, mask=mask_e).to(tl.float32)

    b_out = x_coef * b_x + eps_coef * b_eps
    if NOISE_MODE == NOISE_TENSOR:
        b_noise = tl.load(noise_ptr + pid_b * noise_bstride + offs_e, mask=mask_e).to(tl.float32)
        b_out += noise_coef * b_noise
    elif NOISE_MODE == NOISE_PHILOX:
        if REPEAT_NOISE:
            # Global sample 0's noise for every sample; `pid_b * 0` keeps the key an int64
            # tensor like the other branch, so both branches give the same type.
            noise_key = pid_b * 0
        else:
            noise_key = sample_offset + pid_b
        b_out += noise_coef * keyed_normals(seed, noise_key, step_key, STREAM_STEP, first_e, BLOCK // 4)

    if STORE_X0:
        b_x0 = x0_x_coef * b_x + x0_eps_coef * b_eps
        tl.store(x0_ptr + offs, cast_for_store(b_x0, x0_ptr), mask=mask_e)
    if STORE_EPS:
        tl.store(eps_out_ptr + offs, cast_for_store(b_eps, eps_out_ptr), mask=mask_e)

    if MASK_MODE != NO_MASK:
        b_orig = tl.load(orig_ptr + pid_b * orig_bstride + offs_e, mask=mask_e).to(tl.float32)
        b_orig_t = orig_coef * b_orig
        if ORIG_NOISE_MODE == NOISE_TENSOR:
            b_orig_noise = tl.load(orig_noise_ptr + pid_b * orig_noise_bstride + offs_e, mask=mask_e).to(tl.float32)
            b_orig_t += orig_noise_coef * b_orig_noise
        elif ORIG_NOISE_MODE == NOISE_PHILOX:
            b_orig_t += orig_noise_coef * keyed_normals(seed, sample_offset + pid_b, step_key, STREAM_ORIG, first_e, BLOCK // 4)
        if MASK_MODE == MASK_DENSE:
            offs_m = offs_e
        else:
            offs_m = (offs_e // (mask_mid * mask_inner)) * mask_inner + offs_e % mask_inner
        b_m = tl.load(mask_ptr + pid_b * mask_bstride + offs_m, mask=mask_e).to(tl.float32)
        b_out = b_orig_t * b_m + b_out * (1.0 - b_m)

    tl.store(out_ptr + offs, cast_for_store(b_out, out_ptr), mask=mask_e)


def _bstride(t: torch.Tensor | None) -> int:
    """Batch stride of a (1 or B, *s) contiguous tensor: 0 broadcasts one sample."""
    if t is None or t.shape[0] == 1:
        return 0
    return t[0].numel()


def _noise_mode(coef: float, tensor) -> int:
    if coef == 0.0:
        return NO_NOISE.value
    return NOISE_TENSOR.value if tensor is not None else NOISE_PHILOX.value


def launch_ddim_step(x: torch.Tensor, model_out: torch.Tensor, out: torch.Tensor, step,
                     x0_out: torch.Tensor | None = None, eps_out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the kernel for one step (a `ddim_fused.step_args.StepArgs`) on validated inputs.

    Args:
        x: (B, *s); model_out: (B, *s), or (2B, *s) [uncond; cond] when step.guidance is set.
        out: (B, *s) buffer for x_prev (may be x itself).
        x0_out, eps_out: optional (B, *s) buffers for pred_x0 and the guided eps.

    Returns:
        out.
    """
    B = x.shape[0]
    N = x.numel() // B if B else 0
    if N == 0:
        return out
    layout = step.mask
    if layout is None:
        mask_mode, m_tensor, m_bstride, m_mid, m_inner = NO_MASK.value, None, 0, 1, 1
    else:
        m_tensor, m_bstride, m_mid, m_inner = layout
        mask_mode = MASK_DENSE.value if layout.dense else MASK_RUN.value
    guidance = step.guidance
    grid = (triton.cdiv(N, _BLOCK), B)
    _ddim_step_kernel[grid](
        x, model_out, out, step.noise, x0_out, eps_out, step.orig, step.orig_noise, m_tensor,
        N, B,
        float(step.x_coef), float(step.eps_coef), float(step.noise_coef),
        float(step.x0_coefs[0]), float(step.x0_coefs[1]),
        float(1.0 if guidance is None else guidance), float(step.orig_coef), float(step.orig_noise_coef),
        int(step.seed or 0), int(step.step_key), int(step.sample_offset),
        _bstride(step.noise), _bstride(step.orig), _bstride(step.orig_noise), m_bstride, m_mid, m_inner,
        HAS_CFG=guidance is not None, NOISE_MODE=_noise_mode(step.noise_coef, step.noise),
        REPEAT_NOISE=bool(step.repeat_noise), STORE_X0=x0_out is not None, STORE_EPS=eps_out is not None,
        MASK_MODE=mask_mode, ORIG_NOISE_MODE=_noise_mode(step.orig_noise_coef if layout is not None else 0.0,
                                                         step.orig_noise),
        BLOCK=_BLOCK,
    )
    return out
