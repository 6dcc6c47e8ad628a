"""The DDIM step off the GPU (the "torch" backend), with the kernel's contract and semantics.

Same host coefficients, the same noise stream and the same formula as
ddim_fused/kernels/ddim_step.py (guided eps = eps_u + g * (eps_c - eps_u)). A float32 step on
contiguous CPU tensors runs as one pass of the C kernel `ddim_update_f32`, or with paint's
mask blend `ddim_paint_f32` (`ddim_fused/cpu_kernels.c`: float32, every product and sum
rounded, no fused multiply-adds), when that library is available (`ddim_fused.native`).
Every other step, and every step without the library, is torch ops on one accumulator
(fp32 for fp16/bf16 inputs, as in the kernel's registers), as few as the inputs allow:

    eps  = lerp(eps_u, eps_c, g)               (under guidance)
    acc  = noise_coef * noise + x_coef * x     (torch.add; torch.mul without noise)
    acc += eps_coef * eps                      (add_)
    acc.lerp_(orig_coef * orig + orig_noise_coef * orig_noise, mask)   (paint)

The two paths differ by a few units in the last place.
"""
from __future__ import annotations

import torch

from . import native
from .philox import keyed_normal_torch
from .step_args import StepArgs

COMPUTE_DTYPES = (torch.float32, torch.float64)


def torch_ddim_step(x: torch.Tensor, model_out: torch.Tensor, out: torch.Tensor, step: StepArgs,
                    x0_out: torch.Tensor | None = None, eps_out: torch.Tensor | None = None) -> torch.Tensor:
    """x_prev into `out`, exactly as `ddim_fused.step_args` defines the step.

    Args:
        x: (B, *s); model_out: (B, *s), or (2B, *s) [uncond; cond] under guidance.
        out: (B, *s) buffer for x_prev; it may be x itself, or the step's noise tensor.
        step: the step's coefficients and options.
        x0_out, eps_out: optional (B, *s) buffers for pred_x0 and the guided eps.

    Returns:
        out: (B, *s).
    """
    noise = orig_noise = None
    if step.noise_coef != 0.0:
        noise = step.noise if step.noise is not None else _keyed(x, step, "step", step.repeat_noise)
    if step.mask is not None and step.orig_noise_coef != 0.0:
        orig_noise = step.orig_noise if step.orig_noise is not None else _keyed(x, step, "orig", False)
    lib = _native(x, model_out, out, x0_out, eps_out, noise, step.guidance is not None)
    if lib is not None and (step.mask is None or _native_paint(x, step, orig_noise)):
        _native_update(lib, x, model_out, out, x0_out, eps_out, noise, step, orig_noise)
        return out
    compute = x.dtype if x.dtype in COMPUTE_DTYPES else torch.float32
    xc, mo = _as(x, compute), _as(model_out, compute)
    eps = mo if step.guidance is None else torch.lerp(*mo.tensor_split(2), step.guidance)
    # Results go straight into fp32 (fp64) outputs; fp16/bf16 outputs get one rounding copy.
    if x0_out is not None:
        x0_x, x0_eps = step.x0_coefs
        if x0_out.dtype == compute:
            torch.mul(xc, x0_x, out=x0_out).add_(eps, alpha=x0_eps)
        else:
            x0_out.copy_(torch.add(xc * x0_x, eps, alpha=x0_eps))
    if eps_out is not None:
        eps_out.copy_(eps)
    noise_term = None if noise is None else _scaled(_as(noise, compute), step.noise_coef)
    direct = out.dtype == compute and out.data_ptr() != x.data_ptr()
    acc = _update(xc, eps, step.x_coef, step.eps_coef, noise_term, out if direct else None)
    if step.mask is not None:
        orig_t = _as(step.orig, compute) * step.orig_coef
        if orig_noise is not None:
            orig_t = torch.add(orig_t, _as(orig_noise, compute), alpha=step.orig_noise_coef)
        # orig_t * m + acc * (1 - m), exact at m = 0 and 1.
        acc.lerp_(orig_t, _as(step.mask.mask, compute))
    return out if direct else out.copy_(acc)


def _native(x, model_out, out, x0_out, eps_out, noise, guided: bool):
    """The C library when these tensors can take `ddim_update_f32`, else None.

    It can when every tensor is float32, contiguous, on the CPU and of the step's sizes
    (the C side reads and writes through raw pointers): x, out, x0_out, eps_out (B, *s),
    model_out (B or 2B, *s), noise (1 or B, *s) or None. Checked in one expression with
    no loop: it runs every step.
    """
    size = x.numel()
    if not (_f32_cpu(x) and _f32_cpu(out) and out.numel() == size and _f32_cpu(model_out)
            and model_out.numel() == (size + size if guided else size)
            and (x0_out is None or (_f32_cpu(x0_out) and x0_out.numel() == size))
            and (eps_out is None or (_f32_cpu(eps_out) and eps_out.numel() == size))
            and (noise is None or (_f32_cpu(noise) and noise.numel() in (size, size // max(x.shape[0], 1))))):
        return None
    return native.library()


def _native_paint(x, step: StepArgs, orig_noise) -> bool:
    """Whether `ddim_paint_f32` can take the step's paint inputs (as `_native`, for tensors
    it already accepted): orig and orig_noise float32, contiguous (1 or B, *s) CPU tensors,
    the mask on the CPU (not float32: converted per call)."""
    size = x.numel()
    sizes = (size, size // max(x.shape[0], 1))
    return (_f32_cpu(step.orig) and step.orig.numel() in sizes
            and (orig_noise is None or (_f32_cpu(orig_noise) and orig_noise.numel() in sizes))
            and step.mask.mask.is_cpu)


def _f32_cpu(t: torch.Tensor) -> bool:
    return t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()


def _rows(t, batch: int, numel: int) -> int:
    """Rows of a (1 or B, *s) input: 1 when one sample serves the batch, else batch."""
    return 1 if t.numel() == numel and batch != 1 else batch


def _native_update(lib, x, model_out, out, x0_out, eps_out, noise, step: StepArgs, orig_noise=None) -> None:
    """`ddim_update_f32` (no mask) or `ddim_paint_f32` on tensors `_native` (`_native_paint`)
    accepted; noise and orig_noise (1 or B, *s) or None."""
    batch = x.shape[0]
    numel = x.numel() // batch if batch else 0
    guided = step.guidance is not None  # eps_c: the second half of model_out, 4 bytes per element
    args = (out.data_ptr(), None if x0_out is None else x0_out.data_ptr(),
            None if eps_out is None else eps_out.data_ptr(), x.data_ptr(), model_out.data_ptr(),
            model_out.data_ptr() + 4 * batch * numel if guided else None,
            None if noise is None else noise.data_ptr(), batch, numel,
            0 if noise is None else _rows(noise, batch, numel), step.x_coef,
            step.eps_coef, step.guidance if guided else 0.0, step.noise_coef, *step.x0_coefs)
    layout = step.mask
    if layout is None:
        lib.ddim_update_f32(*args)
        return
    mask = _as(layout.mask, torch.float32)
    # A dense mask is one run of numel values per sample (mid 1, inner numel).
    mid, inner = (1, numel) if layout.dense else (layout.mid, layout.inner)
    lib.ddim_paint_f32(*args, step.orig.data_ptr(), _rows(step.orig, batch, numel),
                       None if orig_noise is None else orig_noise.data_ptr(),
                       0 if orig_noise is None else _rows(orig_noise, batch, numel),
                       mask.data_ptr(), layout.batch_stride, mid, inner, step.orig_coef, step.orig_noise_coef)


def _update(xc, eps, x_coef: float, eps_coef: float, noise_term, out):
    """noise_term + x_coef * xc + eps_coef * eps, into out (a new tensor when out is None).

    xc, eps: (B, *s); noise_term: (1 or B, *s) or None (it may be out itself).
    """
    if noise_term is None:
        acc = torch.mul(xc, x_coef, out=out)
    else:
        acc = torch.add(noise_term, xc, alpha=x_coef, out=out)
    return acc.add_(eps, alpha=eps_coef)


def _scaled(t: torch.Tensor, coef: float) -> torch.Tensor:
    return t if coef == 1.0 else t * coef


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; t itself when it already is (a no-op .to() still costs a dispatch per step)."""
    return t if t.dtype is dtype else t.to(dtype)


def _keyed(x: torch.Tensor, step: StepArgs, stream: str, repeat: bool) -> torch.Tensor:
    numel = x.numel() // x.shape[0] if x.shape[0] else 0
    return keyed_normal_torch(x.shape[0], numel, step.seed, step.step_key, stream, step.sample_offset,
                              repeat=repeat, device=x.device).view(x.shape)


def torch_step_runner(step: StepArgs, dtype: torch.dtype, device):
    """A step function bound to one step's arguments, for a loop that knows them in advance.

    run(x, model_out, out, x0_out=None) -> out computes what
    `torch_ddim_step(x, model_out, out, step, x0_out)` computes, with the same torch ops
    in the same order (so the same bits), minus its per-call work: for x, out and x0_out
    of `dtype` float32 or float64 on `device`, no mask, and noise either given or not
    needed, a step is one C kernel call (float32 on the CPU) or 2 to 5 torch ops (noise
    predrawn with its coefficient costs no op to scale). Otherwise, or when the model's
    output comes in another dtype, it calls torch_ddim_step.

    Args:
        step: the step's StepArgs.
        dtype, device: of x, out and x0_out.

    Returns:
        run(x (B, *s), model_out (B or 2B, *s), out (B, *s), x0_out (B, *s) | None) -> out.
        out must not share memory with x or model_out (the torch_ddim_step fallback allows it).
    """

    def generic(x, model_out, out, x0_out=None):
        return torch_ddim_step(x, model_out, out, step, x0_out)

    if dtype not in COMPUTE_DTYPES or step.mask is not None or step.draws_noise:
        return generic
    x_coef, eps_coef, guidance = step.x_coef, step.eps_coef, step.guidance
    x0_x, x0_eps = step.x0_coefs
    noise_coef = step.noise_coef
    lib = native.library() if dtype is torch.float32 and torch.device(device).type == "cpu" else None
    if lib is not None:
        return _native_runner(lib, step, generic)
    # Read per run, not copied here: callers refill the noise tensor in place between runs.
    noise = None if noise_coef == 0.0 else _as(step.noise, dtype)

    def run(x, model_out, out, x0_out=None):
        if model_out.dtype is not dtype or x.dtype is not dtype:
            return generic(x, model_out, out, x0_out)
        eps = model_out if guidance is None else torch.lerp(*model_out.tensor_split(2), guidance)
        if x0_out is not None:
            torch.mul(x, x0_x, out=x0_out).add_(eps, alpha=x0_eps)
        _update(x, eps, x_coef, eps_coef, None if noise is None else _scaled(noise, noise_coef), out)
        return out

    return run


def _native_runner(lib, step: StepArgs, generic):
    """run() of `torch_step_runner` for float32 CPU tensors: one `ddim_update_f32` call per step.

    Like the kernel's bound steps it trusts its plan for what cannot change between runs:
    x, out and x0_out are contiguous (B, *s) CPU tensors of the plan's dtype and model_out
    a contiguous (B or 2B, *s) CPU tensor (`ddim_fused.plan.check_model_out`); it checks
    per run only the dtypes, which a model may change. The step's noise tensor is held
    here and read at each run. Same choice between the C pass and torch ops as
    torch_ddim_step on such tensors, so the same bits.
    """
    noise = step.noise if step.noise_coef != 0.0 else None
    if noise is not None and not _f32_cpu(noise):
        return generic

    def run(x, model_out, out, x0_out=None):
        if model_out.dtype is not torch.float32 or x.dtype is not torch.float32:
            return generic(x, model_out, out, x0_out)
        _native_update(lib, x, model_out, out, x0_out, None, noise, step)
        return out

    return run
