"""DDIM as a k-diffusion sampler: `sample_ddim(model, x, sigmas, ...)`, one fused launch per step.

k-diffusion's conventions (crowsonkb/k-diffusion, and the A1111 / ComfyUI samplers built on
it): x lives in sigma space (x = x0 + sigma * eps, no sqrt(alpha) scaling), the model is a
denoiser called as `model(x, sigma * s_in, **extra_args)` that returns the denoised x0, and
`sigmas` runs down to 0 (`k_diffusion.sampling.get_sigmas_karras(...)` and friends).

In sigma space DDIM with eta = 0 is Euler's method on the probability-flow ODE
(`k_diffusion.sampling.sample_euler`):

    x_next = (s_next / s) * x + (1 - s_next / s) * denoised

With eta > 0 it is k-diffusion's ancestral step (`sample_euler_ancestral`): step down to
sigma_down, then add sigma_up of fresh noise,

    sigma_up   = min(s_next, eta * sqrt(s_next^2 * (s^2 - s_next^2) / s^2))
    sigma_down = sqrt(s_next^2 - sigma_up^2)
    x_next     = (sigma_down / s) * x + (1 - sigma_down / s) * denoised + s_noise * sigma_up * noise

which for eta <= 1 is exactly DDIM's eta noise rewritten in sigma space (the cap at s_next
only binds for eta > 1). Each step is one linear update of (x, denoised, noise): one launch
of the fused DDIM kernel on CUDA, the same update with torch ops elsewhere. Coefficients are
computed once, in float64, from the host copy of `sigmas` (one device read per call).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import trange

from .backend import BACKENDS, check_backend, step_function, uses_kernel
from .philox import keyed_normal_torch
from .step_args import StepArgs
from .validation import FLOAT32_MAX, check_float, check_int, check_sample_offset

__all__ = ["BACKENDS", "KeyedNoiseSampler", "keyed_noise_sampler", "sample_ddim"]


class KeyedNoiseSampler:
    """A k-diffusion noise sampler whose noise does not depend on the batch.

    Call k of the sampler returns the Philox normal stream keyed by (seed, global sample
    index, k): sample b of the batch gets the noise of index `sample_offset + b`, whatever
    the batch size or however a batch is split. It follows k-diffusion's noise-sampler
    protocol, `noise_sampler(sigma, sigma_next) -> tensor shaped like x`, so any
    k-diffusion sampler accepts it; `sample_ddim` draws the same stream inside its fused
    step instead of materialising it. Like a torch.Generator it advances with every call:
    make one per sampling run.
    """

    def __init__(self, seed: int, x: torch.Tensor, *, sample_offset: int = 0):
        seed = check_int("seed", seed, 0, 2**63 - 1)
        _check_latent(x)
        # Sample indices are 32-bit keys: sample_offset + b past 2**32 would repeat sample 0's noise.
        sample_offset = check_sample_offset(sample_offset, x.shape[0])
        self.seed, self.sample_offset = seed, sample_offset
        self.shape, self.dtype, self.device = tuple(x.shape), x.dtype, x.device
        self.calls = 0

    def next_key(self) -> int:
        """The step key of the next draw, advancing the sampler (used by the fused step)."""
        key = self.calls
        self.calls += 1
        return key

    def matches(self, x: torch.Tensor) -> bool:
        """Whether this sampler draws noise for tensors like `x` (shape, device)."""
        return tuple(x.shape) == self.shape and x.device == self.device

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        """The next draw: a tensor of x's shape, dtype and device (the sigmas are not used)."""
        batch = self.shape[0]
        numel = math.prod(self.shape[1:])
        noise = keyed_normal_torch(batch, numel, self.seed, self.next_key(), "step", self.sample_offset,
                                   device=self.device)
        return noise.view(self.shape).to(self.dtype)


def keyed_noise_sampler(seed: int, x: torch.Tensor, *, sample_offset: int = 0) -> KeyedNoiseSampler:
    """Batch-invariant noise for k-diffusion samplers: `noise_sampler=keyed_noise_sampler(seed, x)`.

    Args:
        seed: int in [0, 2**63).
        x: the (B, ...) latent to be sampled (its shape, dtype and device are used).
        sample_offset: global index of the batch's first sample.

    Returns:
        KeyedNoiseSampler; each call returns a (B, ...) tensor like x.
    """
    return KeyedNoiseSampler(seed, x, sample_offset=sample_offset)


def _ancestral_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step, in float64 (k-diffusion's definition)."""
    if eta == 0.0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


def _fused_update(x: torch.Tensor, denoised: torch.Tensor, x_coef: float, d_coef: float,
                  noise_coef: float = 0.0, noise: torch.Tensor | None = None, *,
                  keyed: tuple[int, int, int] | None = None, backend: str = "auto",
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """x_next = x_coef * x + d_coef * denoised + noise_coef * noise, as one fused step.

    Every update of this module goes through here. `keyed` = (seed, step_key,
    sample_offset) draws the noise inside the step from the keyed Philox stream instead
    of reading `noise`. `ddim_fused.backend` picks the kernel or the torch path, as for
    the sampler; strided inputs, and noise the kernel cannot read as (1 or B, *s), are
    copied once into its layout. The sum is formed in float32 (float64 for a float64
    result) and rounded once to `dtype` (default x's).

    Returns:
        a new tensor of x's shape in `dtype`.
    """
    dtype = x.dtype if dtype is None else dtype
    if dtype == torch.float64 and x.dtype != torch.float64:
        x = x.double()  # the torch path accumulates in x's dtype
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    seed, step_key, sample_offset = keyed if keyed is not None else (None, 0, 0)
    if noise is not None and (noise.dim() != x.dim() or noise.shape[1:] != x.shape[1:]
                              or noise.shape[0] not in (1, x.shape[0])):
        noise = noise.expand(x.shape)
    step = StepArgs(x_coef, d_coef, noise_coef=noise_coef, noise=None if noise is None else noise.contiguous(),
                    seed=seed, step_key=step_key, sample_offset=sample_offset)
    step_function(backend, x.device, dtype)(x.contiguous(), denoised.contiguous(), out, step)
    return out


def _check_sigmas(sigmas, eta: float) -> list[float]:
    """The host float64 copy of `sigmas`, after checking what the steps divide by."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or not sigmas.dtype.is_floating_point:
        shape = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        raise TypeError(f"sigmas must be a 1-D floating-point tensor, got {shape}")
    if len(sigmas) < 1:
        raise ValueError("sigmas must hold at least one noise level")
    values = sigmas.detach().to("cpu", torch.float64).tolist()
    if not all(math.isfinite(s) and s >= 0 for s in values):
        raise ValueError(f"sigmas must be finite and >= 0, got {values}")
    if not all(s > 0 for s in values[:-1]):
        raise ValueError(f"every sigma but the last must be > 0 (a step divides by it), got {values}")
    if eta > 0 and any(b > a for a, b in zip(values, values[1:])):
        raise ValueError(f"with eta > 0 sigmas must not increase (an ancestral step needs s_next <= s), got {values}")
    return values


def _check_latent(x) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() < 1:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor of shape (B, ...), got {got}")


def _check_like_x(name: str, t, x: torch.Tensor, exact_shape: bool) -> None:
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if exact_shape:
        ok = t.shape == x.shape
    else:
        try:
            ok = torch.broadcast_shapes(t.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected x's shape {tuple(x.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, x on {x.device}")


@torch.no_grad()
def sample_ddim(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None, eta: float = 0.0,
                s_noise: float = 1.0, noise_sampler: Callable | None = None, *, backend: str = "auto") -> torch.Tensor:
    """DDIM sampling with k-diffusion's sampler signature and conventions, one fused step each.

    Args:
        model: denoiser, `model(x, sigma, **extra_args) -> denoised` with sigma of shape (B,)
            (e.g. a `k_diffusion.external.CompVisDenoiser`).
        x: (B, ...) float tensor: the starting noise, already scaled by sigmas[0].
        sigmas: 1-D float tensor of N + 1 noise levels (N steps), all but the last > 0,
            usually decreasing to 0. Read to the host once.
        extra_args: keyword arguments for every model call (e.g. `cond`, `uncond`).
        callback: called after the model at each step with
            `{"x", "i", "sigma", "sigma_hat", "denoised"}` (sigma_hat == sigma).
        disable: disable the tqdm progress bar (shown unless True).
        eta: 0 for deterministic DDIM (Euler); > 0 for the ancestral step (1: DDPM-like).
        s_noise: scale of the added noise (eta > 0).
        noise_sampler: `noise_sampler(sigma, sigma_next) -> tensor like x`, called once per
            step with sigma_next > 0 when eta > 0 (as k-diffusion's samplers do); default
            `torch.randn_like(x)`. A `keyed_noise_sampler` is drawn inside the fused step.
        backend: "auto" (kernel on CUDA tensors, torch ops elsewhere), "triton" (always the
            kernel; on a CPU only with TRITON_INTERPRET=1) or "torch".

    Returns:
        (B, ...) tensor: the sample at sigmas[-1], x itself unmodified. Its dtype is the one
        k-diffusion's Euler step gives: torch's promotion of x, the model output and sigmas
        (bfloat16 x with float32 sigmas becomes float32 after the first step, as there).
        Each step is formed in float32 (float64 for a float64 result) and rounded once.
    """
    if not callable(model):
        raise TypeError(f"model must be callable (x, sigma, **extra_args) -> denoised, got {type(model).__name__}")
    _check_latent(x)
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict or None, got {type(extra_args).__name__}")
    for name, fn in (("callback", callback), ("noise_sampler", noise_sampler)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
    check_backend(backend)
    uses_kernel(backend, x.device, x.dtype)  # a clear error where backend="triton" cannot run x
    eta = check_float("eta", eta, low=0.0)
    s_noise = check_float("s_noise", s_noise, -FLOAT32_MAX, FLOAT32_MAX)  # scales float32 noise
    host_sigmas = _check_sigmas(sigmas, eta)
    extra_args = {} if extra_args is None else extra_args
    if eta > 0 and noise_sampler is None:
        initial = x  # k-diffusion's default draws like the x the sampler was called with
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(initial)  # noqa: E731
    if isinstance(noise_sampler, KeyedNoiseSampler) and not noise_sampler.matches(x):
        raise ValueError(f"noise_sampler was made for tensors of shape {noise_sampler.shape} on "
                         f"{noise_sampler.device}; x has shape {tuple(x.shape)} on {x.device}")
    in_kernel = isinstance(noise_sampler, KeyedNoiseSampler)

    s_in = x.new_ones([x.shape[0]])
    if len(host_sigmas) == 1:
        return x.clone()
    for i in trange(len(host_sigmas) - 1, disable=disable):
        sigma, sigma_next = host_sigmas[i], host_sigmas[i + 1]
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _check_like_x("model output", denoised, x, exact_shape=True)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        sigma_down, sigma_up = _ancestral_sigmas(sigma, sigma_next, eta)
        ratio = sigma_down / sigma
        noise, keyed, noise_coef = None, None, 0.0
        if eta > 0 and sigma_next > 0:
            noise_coef = s_noise * sigma_up
            if in_kernel:
                keyed = (noise_sampler.seed, noise_sampler.next_key(), noise_sampler.sample_offset)
            else:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                _check_like_x("noise_sampler output", noise, x, exact_shape=False)
        # The dtype k-diffusion's Euler step gives x: torch's promotion of x, denoised and
        # sigmas (its (x - denoised) / sigma broadcasts sigma as a tensor with dims).
        dtype = torch.promote_types(torch.promote_types(x.dtype, denoised.dtype), sigmas.dtype)
        x = _fused_update(x, denoised, ratio, 1.0 - ratio, noise_coef, noise, keyed=keyed, backend=backend,
                          dtype=dtype)
    return x
