"""A sampler call's plan: its per-step records, its noise policy and its guided model call.

`DDIMSampler` builds one `Plan` per call (sample, paint, invert, or a single step), so
the denoising loop does only a table lookup, a model call and one fused launch per step
(two around a torch clip of pred_x0 when the sampler limits it, see `SplitStep`).
`initial_noise` is the public form of the keyed initial latent x_T.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .backend import keyed_normal
from .philox import keyed_normal_torch
from .step_args import StepArgs
from .torch_step import COMPUTE_DTYPES, torch_ddim_step, torch_step_runner
from .validation import (FLOAT32_MAX, FLOAT_DTYPES, check_device, check_float, check_int, check_sample_offset,
                         check_shape)

NOISE_SOURCES = ("philox", "torch")
# Elements of keyed noise (16 MB in fp32) that a torch-path loop draws for all its steps at once.
_PREDRAW_LIMIT = 1 << 22


class Guide(NamedTuple):
    """The model call of one sampler call: conditioning and classifier-free guidance.

    With guidance the model runs once on the batch-doubled [uncond; cond] input and the
    kernel combines the halves: eps = eps_u + scale * (eps_c - eps_u).
    """

    model: Callable
    cond: object
    uncond_cond: Optional[torch.Tensor] = None
    scale: Optional[float] = None  # None: no guidance (uncond_scale == 1)

    @classmethod
    def checked(cls, model, cond, uncond_scale, uncond_cond, batch: int) -> "Guide":
        """A Guide for `batch` samples, or ValueError/TypeError naming the bad argument."""
        uncond_scale = check_float("uncond_scale", uncond_scale, -FLOAT32_MAX, FLOAT32_MAX)
        if uncond_scale == 1.0:
            return cls(model, cond)
        if uncond_cond is None:
            raise ValueError(f"uncond_scale={uncond_scale} needs uncond_cond (the unconditional conditioning)")
        for name, c in (("cond", cond), ("uncond_cond", uncond_cond)):
            if not isinstance(c, torch.Tensor) or c.dim() < 1 or c.shape[0] != batch:
                got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                raise ValueError(f"guidance needs {name} as a tensor with batch {batch} first, got {got}")
        if cond.shape[1:] != uncond_cond.shape[1:]:
            raise ValueError(f"cond {tuple(cond.shape)} and uncond_cond {tuple(uncond_cond.shape)} must match")
        return cls(model, torch.cat([uncond_cond, cond]), uncond_cond, uncond_scale)

    def model_out(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's output for x (B, *s) at time steps t (B,): (B, *s), or (2B, *s) guided."""
        return self.call(x, t if self.scale is None else torch.cat([t, t]))

    def call(self, x: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        """model_out with the model's time steps given: t_model (B,), or (2B,) under guidance."""
        if self.scale is None:
            return check_model_out(self.model(x, t_model, self.cond), x, 1)
        return self.call_doubled(torch.cat([x, x]), t_model)

    def call_doubled(self, x_in: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        """The guided model_out (2B, *s) for x_in, the batch-doubled [x; x] (2B, *s) a loop keeps."""
        return check_model_out(self.model(x_in, t_model, self.cond), x_in, 1)  # the (2B, *s) of x_in

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided eps (B, *s), combined with torch ops."""
        out = self.model_out(x, t)
        if self.scale is None:
            return out
        uncond, conditional = out.chunk(2)
        return uncond + (conditional - uncond) * self.scale


def check_model_out(out, x: torch.Tensor, factor: int) -> torch.Tensor:
    """The model output as a contiguous (factor * B, *s) float tensor on x's device."""
    # The common case in one expression: it runs once per step.
    if (not isinstance(out, torch.Tensor) or out.device != x.device or out.dtype not in FLOAT_DTYPES
            or (out.shape != x.shape if factor == 1 else (out.shape[0] != factor * x.shape[0]
                                                          or out.shape[1:] != x.shape[1:]))):
        _bad_model_out(out, x, factor)
    # A strided model output (e.g. a transposed view) is copied once per step here.
    return out if out.is_contiguous() else out.contiguous()


def _bad_model_out(out, x: torch.Tensor, factor: int) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}, expected a tensor of eps")
    want = (factor * x.shape[0],) + tuple(x.shape[1:])
    if tuple(out.shape) != want:
        raise ValueError(f"the model returned eps of shape {tuple(out.shape)}, expected {want}")
    raise ValueError(f"the model returned a {out.dtype} tensor on {out.device}; expected a float tensor on {x.device}")


def initial_noise(shape, seed: int, sample_offset: int = 0, *, device=None,
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The initial latent x_T that DDIMSampler.sample and `ddim-fused generate` draw.

    Row b is global sample sample_offset + b of a run with this seed: its x_T comes from the
    Philox stream keyed by (seed, sample index, "initial"), so it depends on nothing else.
    `initial_noise(shape, seed, sample_offset=i)` with shape (1, *s) is what `generate
    --seed seed` starts sample i from (and what DDIMSampler(..., noise_source="philox")
    .sample(shape, ..., seed=seed, sample_offset=i) starts from), so any other sampler can
    be started from the same x_T.

    Args:
        shape: (B, *s), e.g. (B, C, H, W).
        seed: int in [0, 2**63).
        sample_offset: global index of row 0, in [0, 2**32 - B].
        device: where to draw it (default cpu; on CUDA the kernel draws the same numbers up
            to float rounding of the Box-Muller transform).
        dtype: float32 (default), float16, bfloat16 or float64; drawn in float32 and rounded.

    Returns:
        (B, *s) tensor of standard normal values.
    """
    shape = check_shape(shape)
    check_int("seed", seed, 0, 2**63 - 1)
    check_sample_offset(sample_offset, shape[0])
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(map(str, FLOAT_DTYPES))}, got {dtype!r}")
    device = torch.device("cpu") if device is None else check_device(device)
    return keyed_normal(shape, seed, 0, "initial", sample_offset, device=device, dtype=dtype)


@dataclass(frozen=True)
class KeyedNoise:
    """Noise keyed by (seed, global sample index, step, stream): independent of batching."""

    seed: int
    sample_offset: int = 0
    repeat: bool = False

    def step_fields(self) -> dict:
        """StepArgs fields that let a step draw its own keyed noise."""
        return {"seed": self.seed, "sample_offset": self.sample_offset, "repeat_noise": self.repeat}

    def initial(self, shape, device, dtype) -> torch.Tensor:
        return initial_noise(shape, self.seed, self.sample_offset, device=device, dtype=dtype)

    def orig(self, x0: torch.Tensor, index: int) -> torch.Tensor:
        numel = x0.numel() // x0.shape[0]
        noise = keyed_normal_torch(x0.shape[0], numel, self.seed, index, "orig", self.sample_offset, device=x0.device)
        return noise.view(x0.shape)

    def predraw(self, step_keys: Sequence[int], coefs: Sequence[float], shape, dtype: torch.dtype, device, step_fn,
                out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """(K, B, *s) noise, row k = coefs[k] * the noise of step step_keys[k], for a small torch-path loop.

        None for the kernel path, no keys, or more than _PREDRAW_LIMIT elements. Per step,
        the keyed stream costs a call (the C kernel) or about 130 small integer-tensor ops,
        which dominates the step for small latents; drawn and scaled for all steps at once,
        it costs that once. The rows hold what a step would draw and scale itself (so a
        step given a row takes noise_coef 1), in the torch path's compute dtype for x of
        `dtype`; written into `out` when given (a buffer an earlier call returned).
        """
        numel = int(np.prod(shape[1:]))
        if step_fn is not torch_ddim_step or not step_keys or len(step_keys) * shape[0] * numel > _PREDRAW_LIMIT:
            return None
        compute = dtype if dtype in COMPUTE_DTYPES else torch.float32
        drawn = keyed_normal_torch(shape[0], numel, self.seed, list(step_keys), "step", self.sample_offset,
                                   repeat=self.repeat, device=device)
        if out is None:
            out = torch.empty((len(step_keys), *shape), dtype=compute, device=device)
        scale = torch.tensor(coefs, dtype=compute, device=device).view(-1, 1, 1)
        # In the compute dtype, as torch_ddim_step scales a step's noise: the same bits.
        torch.mul(drawn, scale, out=out.view(drawn.shape))
        return out

    def fills(self, step: StepArgs) -> bool:
        """Whether `fill` adds noise to the step: never, it draws from its keys."""
        return False

    def fill(self, step: StepArgs, x: torch.Tensor) -> StepArgs:
        return step  # the step draws what it needs from its keys


@dataclass(frozen=True)
class TorchNoise:
    """labml's noise: torch.randn from torch's global generator, drawn as labml draws it."""

    repeat: bool = False

    def step_fields(self) -> dict:
        return {"repeat_noise": self.repeat}

    def initial(self, shape, device, dtype) -> torch.Tensor:
        return torch.randn(shape, device=device).to(dtype)

    def orig(self, x0: torch.Tensor, index: int) -> torch.Tensor:
        return torch.randn_like(x0)

    def predraw(self, step_keys, coefs, shape, dtype, device, step_fn, out=None) -> None:
        return None

    def fills(self, step: StepArgs) -> bool:
        """Whether `fill` draws torch.randn noise for the step (so it must run per step, in order)."""
        return (step.noise is None and step.noise_coef != 0.0) or (step.mask is not None and step.orig_noise is None)

    def fill(self, step: StepArgs, x: torch.Tensor) -> StepArgs:
        """The step with this step's torch.randn noise (step noise first, then paint's)."""
        noise, orig_noise = step.noise, step.orig_noise
        if noise is None and step.noise_coef != 0.0:
            noise = torch.randn((1, *x.shape[1:]) if self.repeat else x.shape, device=x.device)
        if step.mask is not None and orig_noise is None:
            orig_noise = torch.randn_like(step.orig)
        if noise is step.noise and orig_noise is step.orig_noise:
            return step
        return step._replace(noise=noise, orig_noise=orig_noise)


def make_noise_policy(source: str, seed: Optional[int], sample_offset: int, repeat: bool):
    """KeyedNoise for source "philox" (seed required), TorchNoise for "torch"."""
    return TorchNoise(repeat) if source == "torch" else KeyedNoise(seed, sample_offset, repeat)


class SplitStep(NamedTuple):
    """The first launch of a step that limits pred_x0 (clip_sample, thresholding) between two.

    Launch 1 reads (x, model output) and writes pred_x0 and pred_eps; the sampler's
    X0Limit changes pred_x0 in torch; launch 2 (the StepPlan's args) reads (pred_x0,
    pred_eps) as its (x, eps) and writes x_prev = sqrt(a_prev) * pred_x0 + dir * pred_eps
    + noise, with the paint blend if any. For epsilon models pred_eps is the (guided) model
    output and pred_x0 is formed as diffusers forms it: subtract, then divide (at high
    noise pred_x0 is a small difference of two large terms, and the clip exposes it).
    """

    first: StepArgs
    x0_divisor: float  # 1.0 except for epsilon models
    eps_is_output: bool  # epsilon models: launch 1 writes the x0 numerator, eps_out is pred_eps

    def run(self, step_fn, x: torch.Tensor, model_out: torch.Tensor, want_output: bool,
            x0_out: Optional[torch.Tensor] = None):
        """Launch 1: (pred_x0, pred_eps, guided model output | None), each (B, *s).

        pred_x0 is written into x0_out when given (a (B, *s) buffer), else a new tensor.
        """
        x0 = torch.empty_like(x) if x0_out is None else x0_out
        eps = torch.empty_like(x)
        if self.eps_is_output:
            step_fn(x, model_out, x0, self.first, None, eps)
            if self.x0_divisor != 1.0:
                x0.div_(self.x0_divisor)
            return x0, eps, eps if want_output else None
        output = torch.empty_like(x) if want_output else None
        step_fn(x, model_out, eps, self.first, x0, output)
        return x0, eps, output


class StepPlan(NamedTuple):
    """One step of a plan: DDIM index, training time step, the model's time steps, arguments.

    t_batch is the time-step tensor the model is called with: (B,), or (2B,) under
    guidance (the batch-doubled call). run(x, model_out, out, x0_out=None) -> out is the
    plan's step function bound to args (and to the call's noise policy), see `step_runner`.
    With `split`, args is the step's second launch and run does both (see SplitStep).
    """

    index: int
    t: int
    t_batch: torch.Tensor
    args: StepArgs
    run: Callable
    split: Optional[SplitStep] = None


def step_runner(step_fn: Callable, policy, args: StepArgs, dtype: torch.dtype, device, launches=None,
                split: Optional[SplitStep] = None, limit: Optional[Callable] = None) -> Callable:
    """run(x, model_out, out, x0_out=None) -> out: one step of a plan, decided once per call.

    The torch path gets `torch_step_runner` (a few torch ops, same bits as torch_ddim_step)
    and the kernel path the step bound in `launches` (the call's `backend.bind_launches`:
    arguments fixed once, the compiled kernel launched directly), unless the step draws
    torch.randn noise; every other step calls step_fn with the args its noise policy fills in.
    A split step (with `split` and its X0Limit `limit`) runs launch 1, the limit, launch 2.
    """
    if split is not None:
        return _split_runner(step_fn, policy, args, split, limit)
    if not policy.fills(args):
        if step_fn is torch_ddim_step:
            return torch_step_runner(args, dtype, device)
        bound = launches.step(args) if launches is not None else None
        if bound is not None:
            return bound
    fill = policy.fill

    def run(x, model_out, out, x0_out=None):
        return step_fn(x, model_out, out, fill(args, x), x0_out)

    return run


def _split_runner(step_fn: Callable, policy, args: StepArgs, split: SplitStep, limit: Callable) -> Callable:
    """run(x, model_out, out, x0_out=None) -> out for a step that limits pred_x0 (x0_out gets the limited one)."""
    fill = policy.fill

    def run(x, model_out, out, x0_out=None):
        x0, pred_eps, _ = split.run(step_fn, x, model_out, False, x0_out)
        limit(x0)
        return step_fn(x0, pred_eps, out, fill(args, x0))

    return run


class StepTable(NamedTuple):
    """A plan's steps, with the predrawn noise their runners read (see KeyedNoise.predraw).

    reusable: whether the records depend on nothing of the call but that noise and the
    seed and sample offset of kernel launches that draw their own (`launches`, rebound by
    `CallLaunch.rekey`), so a later call with the same steps, shape, dtype, device,
    guidance, temperature and noise source may run them after `refill`.
    """

    records: tuple[StepPlan, ...]
    reusable: bool
    noise: Optional[torch.Tensor] = None  # (K, B, *s) scaled noise of the noisy steps
    noise_keys: tuple[int, ...] = ()
    noise_coefs: tuple[float, ...] = ()
    launches: object = None  # the kernel path's CallLaunch when its steps draw keyed noise

    def refill(self, policy, step_fn) -> None:
        """Give the steps this call's noise: its predrawn rows, or its keys for the kernel's own draws."""
        if self.noise is not None:
            policy.predraw(self.noise_keys, self.noise_coefs, self.noise.shape[1:], self.noise.dtype,
                           self.noise.device, step_fn, out=self.noise)
        if self.launches is not None:
            self.launches.rekey(policy.seed, policy.sample_offset)


@dataclass(frozen=True)
class Plan:
    """Everything a sampler call decides once: step function, model call, noise, steps."""

    step_fn: Callable
    guide: Guide
    noise: object  # KeyedNoise | TorchNoise
    steps: tuple[StepPlan, ...]
    has_x0: bool  # whether the steps define pred_x0 (not for inversion)
    limit: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # X0Limit of split steps
    reuse: Optional[tuple] = None  # (key, StepTable) to hand back to the sampler after the loop
