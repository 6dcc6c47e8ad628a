"""`ddim_step`: one validated fused DDIM update on tensors, for code with its own loop."""
from __future__ import annotations

from dataclasses import replace

import torch

from .backend import KERNEL_DTYPES, check_backend, step_function, uses_kernel
from .masks import mask_layout
from .step_args import StepArgs
from .validation import FLOAT_DTYPES, check_int


def ddim_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    x0_out: torch.Tensor | None = None,
    eps_out: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    **step,
) -> torch.Tensor:
    """One fused DDIM update, validated, in a single kernel launch (or torch ops off CUDA).

    Args:
        x: (B, *s) latent at the current step, contiguous.
        model_out: (B, *s) eps, or (2B, *s) [uncond; cond] halves when `guidance` is set.
        out: (B, *s) buffer for x_prev (may be x itself); allocated like x if None.
        x0_out: (B, *s) buffer for pred_x0 (needs `x0_coefs`).
        eps_out: (B, *s) buffer for the guided eps.
        mask: paint mask broadcastable to x (batch 1 or B), float or bool, 1 keeps `orig`.
        backend: "auto", "triton" or "torch" (see `ddim_fused.backend`).
        **step: the fields of `ddim_fused.step_args.StepArgs`: x_coef, eps_coef (required),
            guidance, noise_coef, noise (B or 1, *s), seed, step_key, sample_offset,
            repeat_noise, x0_coefs, orig (B or 1, *s), orig_coef, orig_noise_coef,
            orig_noise (B or 1, *s). Noise that is needed and not given is drawn from the
            keyed Philox stream of `seed`: seed an int in [0, 2**63), step_key in
            [0, 2**32), sample_offset + B <= 2**32 (TypeError/ValueError otherwise).

    Returns:
        out: (B, *s) x_prev, in out's dtype.
    """
    check_backend(backend)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    kernel = backend == "triton" or (backend == "auto" and x.device.type == "cuda" and x.dtype in KERNEL_DTYPES)
    allowed = KERNEL_DTYPES if kernel else FLOAT_DTYPES
    _check_tensor("x", x, x.device, allowed)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension, got a 0-d tensor")
    uses_kernel(backend, x.device, x.dtype)  # a clear error where the kernel cannot run x
    try:
        args = StepArgs(**step)
    except TypeError as exc:
        raise TypeError(f"ddim_step: {exc}") from None
    B, sample_shape = x.shape[0], tuple(x.shape[1:])
    _check_tensor("model_out", model_out, x.device, allowed)
    want = ((2 * B) if args.guidance is not None else B,) + sample_shape
    if tuple(model_out.shape) != want:
        cfg = " (batch-doubled for guidance)" if args.guidance is not None else ""
        raise ValueError(f"model_out has shape {tuple(model_out.shape)}, expected {want}{cfg}")
    if out is None:
        out = torch.empty_like(x)
    for name, t in (("out", out), ("x0_out", x0_out), ("eps_out", eps_out)):
        if t is not None:
            _check_tensor(name, t, x.device, allowed)
            if t.shape != x.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected x's shape {tuple(x.shape)}")
    if x0_out is not None and "x0_coefs" not in step:
        raise ValueError("x0_out needs x0_coefs=(x0_x_coef, x0_eps_coef)")
    for name in ("noise", "orig", "orig_noise"):
        t = getattr(args, name)
        if t is not None:
            _check_tensor(name, t, x.device, allowed)
            if tuple(t.shape[1:]) != sample_shape or t.shape[0] not in (1, B):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected (1 or {B}, *{sample_shape})")
    if (mask is None) != (args.orig is None):
        raise ValueError("mask and orig must be given together")
    if mask is not None:
        _check_tensor("mask", mask, x.device, allowed + (torch.bool,))
        args = replace(args, mask=mask_layout(mask, tuple(x.shape)))
    # Noise keys are Philox words: a value past its word would wrap onto another key's noise.
    if args.seed is not None:
        check_int("seed", args.seed, 0, 2**63 - 1)
    check_int("step_key", args.step_key, 0, 2**32 - 1)
    check_int("sample_offset", args.sample_offset, 0, 2**32 - max(B, 1))
    if args.seed is None and (args.draws_noise or args.draws_orig_noise):
        raise ValueError("noise_coef != 0 needs either a noise tensor or a seed for in-kernel noise "
                         "(and orig_noise_coef != 0 an orig_noise tensor or a seed)")
    return step_function(backend, x.device, x.dtype)(x, model_out, out, args, x0_out, eps_out)


def _check_tensor(name: str, t, device, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {', '.join(str(d) for d in dtypes)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected x's device {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first); got strides {t.stride()}")
