"""The fused DDIM step: one launch reads x and the model output and writes x_prev.

Per element, in fp32 registers:
    eps    = eps_u + g * (eps_c - eps_u)            (CFG on a batch-doubled model output)
    x_prev = x_coef * x + eps_coef * eps + noise_coef * noise
    pred_x0 = x0_x_coef * x + x0_eps_coef * eps     (stored only if asked)
    x_prev = orig_t * m + x_prev * (1 - m)          (paint), orig_t = orig_coef * orig + orig_noise_coef * n'
The coefficients come from the host (float64, rounded once to fp32 here); noise is read
from a tensor or drawn in-kernel (see noise.py).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .cast import cast_for_store
from .noise import keyed_normals

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Noise sources (NOISE_MODE / ORIG_NOISE_MODE).
_NO_NOISE, _NOISE_TENSOR, _NOISE_PHILOX = 0, 1, 2
# Mask layouts (MASK_MODE): none, one value per element of a sample, or a sample
# shape whose broadcast dims form one run: offset = (e // (mid * inner)) * inner + e % inner.
_NO_MASK, _MASK_DENSE, _MASK_RUN = 0, 1, 2

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
    if NOISE_MODE == 1:
        b_noise = tl.load(noise_ptr + pid_b * noise_bstride + offs_e, mask=mask_e).to(tl.float32)
        b_out += noise_coef * b_noise
    elif NOISE_MODE == 2:
        if REPEAT_NOISE:
            noise_key = pid_b * 0
        else:
            noise_key = sample_offset + pid_b
        b_out += noise_coef * keyed_normals(seed, noise_key, step_key, 0, first_e, BLOCK // 4)

    if STORE_X0:
        b_x0 = x0_x_coef * b_x + x0_eps_coef * b_eps
        tl.store(x0_ptr + offs, cast_for_store(b_x0, x0_ptr), mask=mask_e)
    if STORE_EPS:
        tl.store(eps_out_ptr + offs, cast_for_store(b_eps, eps_out_ptr), mask=mask_e)

    if MASK_MODE != 0:
        b_orig = tl.load(orig_ptr + pid_b * orig_bstride + offs_e, mask=mask_e).to(tl.float32)
        b_orig_t = orig_coef * b_orig
        if ORIG_NOISE_MODE == 1:
            b_orig_noise = tl.load(orig_noise_ptr + pid_b * orig_noise_bstride + offs_e, mask=mask_e).to(tl.float32)
            b_orig_t += orig_noise_coef * b_orig_noise
        elif ORIG_NOISE_MODE == 2:
            b_orig_t += orig_noise_coef * keyed_normals(seed, sample_offset + pid_b, step_key, 1, first_e, BLOCK // 4)
        if MASK_MODE == 1:
            offs_m = offs_e
        else:
            offs_m = (offs_e // (mask_mid * mask_inner)) * mask_inner + offs_e % mask_inner
        b_m = tl.load(mask_ptr + pid_b * mask_bstride + offs_m, mask=mask_e).to(tl.float32)
        b_out = b_orig_t * b_m + b_out * (1.0 - b_m)

    tl.store(out_ptr + offs, cast_for_store(b_out, out_ptr), mask=mask_e)


class MaskLayout(NamedTuple):
    """How a paint mask is indexed inside one sample (see `mask_layout`)."""

    mask: torch.Tensor  # contiguous, shape (1 or B, *m) with m broadcastable to x.shape[1:]
    batch_stride: int  # 0 when one mask serves the whole batch
    mid: int  # product of the sample dims the mask broadcasts over (1 if none)
    inner: int  # product of the sample dims after them


def mask_layout(mask: torch.Tensor, x_shape: tuple[int, ...]) -> MaskLayout:
    """Describe how `mask` broadcasts against x of shape (B, *s).

    The kernel handles masks whose broadcast dims within a sample form one contiguous
    run, e.g. (B, 1, H, W), (1, 1, H, W), (B, C, 1, 1) against (B, C, H, W). Any
    other pattern, e.g. (B, 1, H, 1), is expanded once here into a (1 or B, *s) copy.

    Args:
        mask: tensor broadcastable to x_shape, batch dim 1 or B (contiguous).
        x_shape: (B, *s).

    Returns:
        MaskLayout; ValueError if mask does not broadcast to x_shape.
    """
    sample_shape = tuple(x_shape[1:])
    padded = (1,) * (len(x_shape) - mask.dim()) + tuple(mask.shape)
    if mask.dim() > len(x_shape) or not all(m in (1, d) for m, d in zip(padded, x_shape)):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, which does not broadcast to x's shape {tuple(x_shape)}")
    mask = mask.reshape(padded)
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


def _bstride(t: torch.Tensor | None) -> int:
    """Batch stride of a (1 or B, *s) contiguous tensor: 0 broadcasts one sample."""
    if t is None or t.shape[0] == 1:
        return 0
    return t[0].numel()


def launch_ddim_step(
    x, model_out, out, *,
    x_coef, eps_coef, guidance=None,
    noise_coef=0.0, noise=None, seed=None, step_key=0, sample_offset=0, repeat_noise=False,
    x0_coefs=None, x0_out=None, eps_out=None,
    mask=None, orig=None, orig_coef=0.0, orig_noise_coef=0.0, orig_noise=None,
):
    """Launch the kernel on inputs already validated by `ddim_step` (or a sampler).

    `mask` is a MaskLayout. Noise is read from `noise` when given, else drawn from
    Philox with `seed` when noise_coef != 0; the same holds for `orig_noise`.
    """
    B = x.shape[0]
    N = x[0].numel() if B else 0
    if B == 0 or N == 0:
        return out
    if noise_coef == 0.0:
        noise_mode = _NO_NOISE
    else:
        noise_mode = _NOISE_TENSOR if noise is not None else _NOISE_PHILOX
    x0_x_coef, x0_eps_coef = x0_coefs if x0_coefs is not None else (0.0, 0.0)
    if mask is None:
        mask_mode, m_tensor, m_bstride, m_mid, m_inner = _NO_MASK, None, 0, 1, 1
    else:
        m_tensor, m_bstride, m_mid, m_inner = mask
        mask_mode = _MASK_DENSE if m_mid == 1 and m_inner == 1 else _MASK_RUN
    if orig_noise_coef == 0.0:
        orig_noise_mode = _NO_NOISE
    else:
        orig_noise_mode = _NOISE_TENSOR if orig_noise is not None else _NOISE_PHILOX
    grid = (triton.cdiv(N, _BLOCK), B)
    _ddim_step_kernel[grid](
        x, model_out, out, noise, x0_out, eps_out, orig, orig_noise, m_tensor,
        N, B,
        float(x_coef), float(eps_coef), float(noise_coef), float(x0_x_coef), float(x0_eps_coef),
        float(1.0 if guidance is None else guidance), float(orig_coef), float(orig_noise_coef),
        int(seed or 0), int(step_key), int(sample_offset),
        _bstride(noise), _bstride(orig), _bstride(orig_noise), m_bstride, m_mid, m_inner,
        HAS_CFG=guidance is not None, NOISE_MODE=noise_mode, REPEAT_NOISE=bool(repeat_noise),
        STORE_X0=x0_out is not None, STORE_EPS=eps_out is not None,
        MASK_MODE=mask_mode, ORIG_NOISE_MODE=orig_noise_mode,
        BLOCK=_BLOCK,
    )
    return out


def ddim_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    *,
    x_coef: float,
    eps_coef: float,
    out: torch.Tensor | None = None,
    guidance: float | None = None,
    noise_coef: float = 0.0,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    step_key: int = 0,
    sample_offset: int = 0,
    repeat_noise: bool = False,
    x0_coefs: tuple[float, float] | None = None,
    x0_out: torch.Tensor | None = None,
    eps_out: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    orig: torch.Tensor | None = None,
    orig_coef: float = 0.0,
    orig_noise_coef: float = 0.0,
    orig_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One fused DDIM update, validated, in a single kernel launch.

    Args:
        x: (B, *s) latent at the current step, fp32/fp16/bf16, contiguous.
        model_out: (B, *s) eps, or (2B, *s) [uncond; cond] halves when `guidance` is set.
        x_coef, eps_coef: x_prev = x_coef * x + eps_coef * eps + noise_coef * noise.
        out: (B, *s) buffer for x_prev (may be x itself); allocated like x if None.
        guidance: CFG scale g: eps = eps_u + g * (eps_c - eps_u).
        noise_coef: sigma * temperature; 0 reads and draws no noise.
        noise: (B or 1, *s) noise to read; if None and noise_coef != 0, Philox noise
            keyed by (seed, sample_offset + b, step_key) is drawn in-kernel.
        repeat_noise: in-kernel noise of global sample 0 for every sample.
        x0_coefs: (x0_x_coef, x0_eps_coef) to also write pred_x0 into `x0_out` (B, *s).
        eps_out: (B, *s) buffer to also receive the guided eps.
        mask: paint mask broadcastable to x (batch 1 or B), float or bool, 1 keeps orig.
        orig: (B or 1, *s) original; orig_t = orig_coef * orig + orig_noise_coef * orig_noise.
        orig_noise: (B or 1, *s); if None, Philox noise (stream "orig") is drawn in-kernel.

    Returns:
        out: (B, *s) x_prev, in out's dtype.
    """
    _check_tensor("x", x, x.device)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension, got a 0-d tensor")
    B, sample_shape = x.shape[0], tuple(x.shape[1:])
    _check_tensor("model_out", model_out, x.device)
    want = ((2 * B) if guidance is not None else B,) + sample_shape
    if tuple(model_out.shape) != want:
        cfg = " (batch-doubled for guidance)" if guidance is not None else ""
        raise ValueError(f"model_out has shape {tuple(model_out.shape)}, expected {want}{cfg}")
    if out is None:
        out = torch.empty_like(x)
    for name, t in (("out", out), ("x0_out", x0_out), ("eps_out", eps_out)):
        if t is not None:
            _check_tensor(name, t, x.device)
            if t.shape != x.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected x's shape {tuple(x.shape)}")
    if (x0_out is None) != (x0_coefs is None):
        raise ValueError("x0_out and x0_coefs must be given together")
    for name, t in (("noise", noise), ("orig", orig), ("orig_noise", orig_noise)):
        if t is not None:
            _check_tensor(name, t, x.device)
            if tuple(t.shape[1:]) != sample_shape or t.shape[0] not in (1, B):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected (1 or {B}, *{sample_shape})")
    if noise_coef != 0.0 and noise is None and seed is None:
        raise ValueError("noise_coef != 0 needs either a noise tensor or a seed for in-kernel noise")
    layout = None
    if (mask is None) != (orig is None):
        raise ValueError("mask and orig must be given together")
    if mask is not None:
        _check_tensor("mask", mask, x.device, allow_bool=True)
        layout = mask_layout(mask, tuple(x.shape))
        if orig_noise is None and seed is None and orig_noise_coef != 0.0:
            raise ValueError("paint needs orig_noise or a seed for in-kernel orig noise")
    if seed is not None and not (0 <= int(seed) < 2**63):
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return launch_ddim_step(
        x, model_out, out, x_coef=x_coef, eps_coef=eps_coef, guidance=guidance,
        noise_coef=noise_coef, noise=noise, seed=seed, step_key=step_key, sample_offset=sample_offset,
        repeat_noise=repeat_noise, x0_coefs=x0_coefs, x0_out=x0_out, eps_out=eps_out,
        mask=layout, orig=orig, orig_coef=orig_coef, orig_noise_coef=orig_noise_coef, orig_noise=orig_noise,
    )


def _check_tensor(name: str, t, device: torch.device, allow_bool: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES and not (allow_bool and t.dtype == torch.bool):
        kinds = "float32, float16, bfloat16" + (" or bool" if allow_bool else "")
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernel takes {kinds}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected x's device {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first); got strides {t.stride()}")
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{name} is on {t.device}: the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 "
            "set before import to run on CPU (use backend='torch' on CPU)"
        )
