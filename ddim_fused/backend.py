"""Which implementation runs a DDIM step: the one module that decides it and imports the kernels.

Policy, for every caller (DDIMSampler, the diffusers schedulers, the benchmarks):
- "auto": the Triton kernel for CUDA tensors in a kernel dtype (float32, float16,
  bfloat16), torch ops otherwise (CPU tensors, float64).
- "triton": always the kernel. It needs CUDA tensors, or CPU tensors with
  TRITON_INTERPRET=1 set before triton is imported (Triton's slow CPU interpreter);
  float64 is refused.
- "torch": torch ops (`ddim_fused.torch_step`) on any device and float dtype.
- Strided inputs: the kernel reads contiguous memory, so callers make their inputs
  contiguous once at their public boundary (a copy only when a tensor is strided) and
  document it; the torch path would take any strides, but both see the same tensors.

`ddim_fused.kernels`, and so triton, is imported here only and only on first use of
the kernel: CPU-only code paths never import triton (which is not installed on every
platform), and TRITON_INTERPRET can still be set before it is.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Callable

import torch

from .philox import NOISE_STREAMS, keyed_normal_torch
from .torch_step import torch_ddim_step

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

StepFn = Callable[..., torch.Tensor]  # (x, model_out, out, step: StepArgs, x0_out=None, eps_out=None) -> out


def check_backend(backend) -> str:
    """backend if it is one of BACKENDS, else ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def interpreter_on() -> bool:
    """Whether Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def uses_kernel(backend: str, device, dtype: torch.dtype) -> bool:
    """Whether `backend` runs tensors of `device` and `dtype` with the Triton kernel.

    Raises ValueError/TypeError when backend="triton" cannot run them.
    """
    device = torch.device(device)
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and dtype in KERNEL_DTYPES
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"dtype {dtype} is not supported by the triton backend; expected one of "
                        f"{', '.join(str(d) for d in KERNEL_DTYPES)} (backend='torch' takes float64)")
    if device.type != "cuda" and not (device.type == "cpu" and interpreter_on()):
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device}), or CPU tensors with TRITON_INTERPRET=1 "
                         "set before triton is imported; use backend='torch' otherwise")
    return True


def step_function(backend: str, device, dtype: torch.dtype) -> StepFn:
    """The step function (see `ddim_fused.step_args`) for tensors of `device` and `dtype`.

    The kernel's is `launch_step`: launch_ddim_step with its launch layout bound once per
    shapes, dtypes and flags, and the compiled kernel called directly.
    """
    return kernels().launch_step if uses_kernel(backend, device, dtype) else torch_ddim_step


def step_launcher(step_fn: StepFn, x: torch.Tensor, model_out: torch.Tensor, out=None, x0_out=None,
                  eps_out=None) -> StepFn:
    """step_fn for tensors of the signature of these (shapes, dtypes, device): the kernel's
    launcher bound to that signature (`kernels.launcher_for`), else step_fn itself."""
    if step_fn is torch_ddim_step:
        return step_fn
    return kernels().launcher_for(x, model_out, out, x0_out, eps_out)


def bind_launches(step_fn: StepFn, shape, dtype: torch.dtype):
    """A per-call lean launcher of the kernel (`kernels.bind_ddim_step`) for (B, *s) tensors of dtype.

    None when step_fn is the torch path: it has its own (`torch_step_runner`).
    """
    if step_fn is torch_ddim_step:
        return None
    return kernels().bind_ddim_step(torch.empty(tuple(shape), dtype=dtype, device="meta"))


@functools.cache
def kernels() -> ModuleType:
    """`ddim_fused.kernels`, imported on first use (this imports triton)."""
    return importlib.import_module("ddim_fused.kernels")


def keyed_normal(shape, seed, step_key=0, stream: str = "step", sample_offset=0, *,
                 device, dtype: torch.dtype = torch.float32, backend: str = "auto",
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Keyed Philox normals of `shape` (B, *s), by the kernel or by torch ops (same values).

    Args: as `ddim_fused.philox.keyed_normal_torch` (seed and sample_offset may be 0-d
    int64 device tensors; an int step_key on the kernel); the result has `dtype` on
    `device`, written into `out` when given (a contiguous tensor of that shape and dtype).
    """
    if uses_kernel(backend, device, dtype):  # the kernel's launcher checks out itself
        return kernels().keyed_normal(shape, seed, step_key, NOISE_STREAMS[stream], sample_offset, device=device,
                                      dtype=dtype, out=out)
    if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous()
                            or out.device.type != torch.device(device).type):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    numel = 1
    for s in shape[1:]:
        numel *= int(s)
    noise = keyed_normal_torch(shape[0], numel, seed, step_key, stream, sample_offset, device=device)
    noise = noise.view(tuple(shape)).to(dtype)
    return noise if out is None else out.copy_(noise)
