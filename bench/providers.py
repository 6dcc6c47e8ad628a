"""The step implementations compared in one run.

Each provider turns (case, inputs) into a zero-argument callable returning the case's
outputs as a tuple, (x_prev,) or (x_prev, pred_x0) (`Case.outputs`), doing what its
sampler does per step (allocating its outputs, reading host coefficients), so that the
timed call is the per-step cost a user pays:

    triton     the fused kernel (ddim_fused.backend.step_function("triton", ...))
    torch      the fused sampler's torch backend (step_function("torch", ...))
    labml      the seed's eager formula: ReferenceDDIMSampler, labml's code term by term
               (pred_x0, dir_xt, sigma * noise, even at eta = 0). Context only: it does
               several times the work of the fused step.
    minimal    the fewest eager torch ops that produce exactly the fused step's outputs
               (x_prev = x * x_coef + eps_coef * eps as one mul and one add(alpha=...)),
               with the same fp32 host coefficients. Claims are made against this one...
    compile    ...and against this one: torch.compile of `minimal`, static shapes
               (dynamic=False, one compile per shape), coefficients as Python floats
               baked into the graph, fullgraph, mode="max-autotune-no-cudagraphs" on CUDA.
    diffusers  diffusers.DDIMScheduler.step (optional), with a pipeline's CFG combine.

Drawn noise (case eta-drawn): the fused providers draw the keyed Philox stream; the
others torch.randn from torch's global generator (the compiled one through
`fallback_random`, so that it draws torch.randn's numbers rather than inductor's own).
`drawn_noise` reproduces each provider's draw, so the parity gate checks it exactly.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ddim_fused import DDIMSampler, ReferenceDDIMSampler, native
from ddim_fused.backend import interpreter_on, step_function
from ddim_fused.masks import mask_layout
from ddim_fused.philox import keyed_normal_torch
from ddim_fused.schedules import make_alpha_bar
from ddim_fused.step_args import StepArgs

from .cases import ALPHA_BAR, DISCRETIZE, GUIDANCE, INDEX, N_STEPS, SEED, Case
from .timing import sync

FUSED = ("triton", "torch")
BASELINES = ("labml", "minimal", "compile", "diffusers")
# The baselines that claims are made against (the others are context).
CLAIM_BASELINES = ("minimal", "compile")
# Eager baselines whose own low-precision error sets the parity bound.
EAGER = ("labml", "minimal")
ALL = FUSED + BASELINES


def _identity_model(x, t, cond):
    return x


@dataclass(frozen=True)
class StepCoefs:
    """One step's coefficients as Python floats (the fused sampler's float64 tables)."""

    x_coef: float
    eps_coef: float
    noise_coef: float
    x0_x: float
    x0_eps: float
    orig_coef: float
    orig_noise_coef: float


class Samplers:
    """The fused and reference samplers (and a diffusers scheduler) for one eta, built once."""

    def __init__(self, eta: float):
        self.eta = eta
        self.fused = DDIMSampler(_identity_model, N_STEPS, DISCRETIZE, eta, alpha_bar=ALPHA_BAR, backend="torch")
        self.ref = ReferenceDDIMSampler(_identity_model, N_STEPS, DISCRETIZE, eta, alpha_bar=ALPHA_BAR)
        c = self.fused.coefs
        orig_coef, orig_noise_coef = c.q_sample_coefs(INDEX, "alpha")
        self.coefs = StepCoefs(float(c.x_coef[INDEX]), float(c.eps_coef[INDEX]), float(c.noise_scale[INDEX]),
                               float(c.x0_x_coef[INDEX]), float(c.x0_eps_coef[INDEX]), float(orig_coef),
                               float(orig_noise_coef))
        self._diffusers = None

    @property
    def diffusers(self):
        if self._diffusers is None:
            self._diffusers = diffusers_scheduler(make_alpha_bar(ALPHA_BAR, self.fused.n_steps))
        return self._diffusers


def diffusers_scheduler(alpha_bar: np.ndarray, n_steps: int = N_STEPS):
    """A diffusers DDIMScheduler on the same alpha_bar and "leading" time steps.

    Args:
        alpha_bar: (T,) float64; passed as trained_betas = 1 - alpha_bar[t] / alpha_bar[t-1].
        n_steps: number of inference steps.

    Returns:
        DDIMScheduler with set_timesteps(n_steps) applied.
    """
    from diffusers import DDIMScheduler  # noqa: PLC0415 - optional dependency

    ab = np.asarray(alpha_bar, dtype=np.float64)
    betas = 1.0 - ab / np.concatenate(([1.0], ab[:-1]))
    sched = DDIMScheduler(num_train_timesteps=len(ab), trained_betas=betas.tolist(), clip_sample=False,
                          set_alpha_to_one=False, steps_offset=0, timestep_spacing="leading",
                          prediction_type="epsilon")
    sched.set_timesteps(n_steps)
    return sched


def availability(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether provider `name` can be timed on `device`, and why not."""
    if name == "triton":
        if device.type == "cuda":
            return True, ""
        if interpreter_on():
            return False, "CPU: Triton runs only through its interpreter, whose timing is meaningless (parity only)"
        return False, "no CUDA device and TRITON_INTERPRET is not set"
    if name == "compile":
        if not hasattr(torch, "compile"):
            return False, "torch.compile is not available in this torch"
        return True, ""
    if name == "diffusers":
        try:
            import diffusers  # noqa: F401, PLC0415
        except ImportError as err:
            return False, f"diffusers is not installed ({err}); the diffusers baseline is skipped"
        return True, ""
    if name not in ALL:
        return False, f"unknown provider {name!r}; expected one of {ALL}"
    return True, ""


def fused_args(s: Samplers, case: Case, inputs: dict) -> StepArgs:
    """The step contract for this case at INDEX, as the sampler builds it."""
    c = s.coefs
    paint = {}
    if case.paint:
        paint = dict(mask=mask_layout(inputs["mask"], tuple(inputs["x"].shape)), orig=inputs["orig"],
                     orig_coef=c.orig_coef, orig_noise_coef=c.orig_noise_coef, orig_noise=inputs["orig_noise"])
    return StepArgs(c.x_coef, c.eps_coef, GUIDANCE if case.cfg else None,
                    noise_coef=c.noise_coef, noise=inputs["noise"], seed=SEED,
                    step_key=INDEX, x0_coefs=(c.x0_x, c.x0_eps), **paint)


def _fused_fn(step_fn, s, case, inputs):
    args = fused_args(s, case, inputs)
    x, model_out = inputs["x"], inputs["model_out"]

    def run():
        # The sampler allocates its outputs every step; so does this.
        x0_out = torch.empty_like(x) if case.x0 else None
        out = step_fn(x, model_out, torch.empty_like(x), args, x0_out)
        return (out, x0_out) if case.x0 else (out,)

    return run


def labml_step(ref: ReferenceDDIMSampler, case: Case):
    """The reference's per-step work as a function of tensors (labml's formula).

    Returns:
        f(x, model_out, noise, orig, orig_noise, mask) -> the case's outputs (a tuple).
    """

    def step(x, model_out, noise, orig, orig_noise, mask):
        if case.cfg:
            # ReferenceDDIMSampler.get_eps without the model call.
            e_t_uncond, e_t_cond = model_out.chunk(2)
            e_t = e_t_uncond + (e_t_cond - e_t_uncond) * GUIDANCE
        else:
            e_t = model_out
        x_prev, pred_x0 = ref.get_x_prev_and_pred_x0(e_t, INDEX, x, temperature=1.0, repeat_noise=False,
                                                     noise=noise)
        if case.paint:
            # ReferenceDDIMSampler.paint's blend after its step.
            orig_t = ref.q_sample(orig, INDEX, noise=orig_noise)
            x_prev = orig_t * mask + x_prev * (1 - mask)
        return (x_prev, pred_x0) if case.x0 else (x_prev,)

    return step


def minimal_step(c: StepCoefs, case: Case):
    """The fewest eager ops giving the fused step's outputs, on Python-float coefficients.

    x * x_coef is one op and add(..., alpha=eps_coef) the second, so the eta = 0 step is
    two passes, as the fused torch path's. Guidance folds into the coefficients of the
    two halves (no eps tensor); noise is one more add; paint one add and one lerp.

    Returns:
        f(x, model_out, noise, orig, orig_noise, mask) -> the case's outputs (a tuple).
    """
    g = GUIDANCE

    def step(x, model_out, noise, orig, orig_noise, mask):
        if case.cfg:
            B = x.shape[0]
            # x_coef x + eps_coef (u + g (c - u)) = x_coef x + eps_coef (1 - g) u + eps_coef g c
            out = torch.add(x * c.x_coef, model_out[:B], alpha=c.eps_coef * (1 - g))
            out = out.add_(model_out[B:], alpha=c.eps_coef * g)
        else:
            out = torch.add(x * c.x_coef, model_out, alpha=c.eps_coef)
        if case.noise == "tensor":
            out = out.add_(noise, alpha=c.noise_coef)
        elif case.noise == "drawn":
            out = out.add_(torch.randn(x.shape, device=x.device, dtype=x.dtype), alpha=c.noise_coef)
        if case.paint:
            out = out.lerp_(torch.add(orig * c.orig_coef, orig_noise, alpha=c.orig_noise_coef), mask)
        if case.x0:
            if case.cfg:
                B = x.shape[0]
                x0 = torch.add(x * c.x0_x, model_out[:B], alpha=c.x0_eps * (1 - g))
                return out, x0.add_(model_out[B:], alpha=c.x0_eps * g)
            return out, torch.add(x * c.x0_x, model_out, alpha=c.x0_eps)
        return (out,)

    return step


def diffusers_step(sched, eta: float, case: Case):
    """DDIMScheduler.step with a pipeline's CFG combine and an inpainting pipeline's blend.

    Returns:
        f(x, model_out, noise, orig, orig_noise, mask) -> the case's outputs (a tuple).
    """
    t = int(sched.timesteps[N_STEPS - 1 - INDEX])
    t_tensor = torch.tensor([t])

    def step(x, model_out, noise, orig, orig_noise, mask):
        if case.cfg:
            uncond, cond = model_out.chunk(2)
            model_out = uncond + GUIDANCE * (cond - uncond)
        x_prev, pred_x0 = sched.step(model_out, t, x, eta=eta, variance_noise=noise, return_dict=False)
        if case.paint:
            orig_t = sched.add_noise(orig, orig_noise, t_tensor.to(x.device))
            x_prev = orig_t * mask + x_prev * (1 - mask)
        return (x_prev, pred_x0) if case.x0 else (x_prev,)

    return step


def drawn_noise(name: str, inputs: dict) -> torch.Tensor:
    """The noise provider `name` draws in an eta-drawn step, reproduced.

    For the fused providers it is the keyed Philox stream (seed SEED, step INDEX, stream
    "step"), whatever torch's generator holds; for the others call this right after
    seeding torch's generator as it was seeded before their step: labml draws fp32
    torch.randn and casts, minimal, compile (fallback_random) and diffusers draw
    torch.randn in x's dtype.
    """
    x = inputs["x"]
    if name in FUSED:
        numel = x[0].numel()
        return keyed_normal_torch(x.shape[0], numel, SEED, INDEX, "step", 0, device=x.device).view(x.shape)
    if name == "labml":
        return torch.randn(x.shape, device=x.device).to(x.dtype)
    return torch.randn(x.shape, device=x.device, dtype=x.dtype)


def _tensor_args(inputs):
    return (inputs["x"], inputs["model_out"], inputs["noise"], inputs["orig"], inputs["orig_noise"], inputs["mask"])


def compile_options(device: torch.device, case: Case) -> dict:
    """Inductor options of the compiled baseline (see the module docstring)."""
    options = {}
    if device.type == "cuda":
        from torch._inductor import list_mode_options  # noqa: PLC0415 - inductor is imported lazily by torch

        options.update(list_mode_options("max-autotune-no-cudagraphs"))
    if case.noise == "drawn":
        options["fallback_random"] = True
    return options


class Providers:
    """Builds each provider's callable; caches samplers and compiled functions across calls."""

    def __init__(self, device: torch.device):
        self.device = device
        self._samplers: dict[float, Samplers] = {}
        self._compiled: dict[tuple, object] = {}
        self.compile_seconds: dict[tuple, float] = {}

    def samplers(self, eta: float) -> Samplers:
        if eta not in self._samplers:
            self._samplers[eta] = Samplers(eta)
        return self._samplers[eta]

    def make(self, name: str, case: Case, inputs: dict, dtype_id: str = ""):
        """Zero-argument callable running provider `name` on `inputs`; returns the case's outputs."""
        s = self.samplers(case.eta)
        if name in FUSED:
            return _fused_fn(step_function(name, self.device, inputs["x"].dtype), s, case, inputs)
        args = _tensor_args(inputs)
        if name == "labml":
            f = labml_step(s.ref, case)
            return lambda: f(*args)
        if name == "minimal":
            f = minimal_step(s.coefs, case)
            return lambda: f(*args)
        if name == "compile":
            return self._compiled_fn(s, case, inputs, dtype_id, args)
        if name == "diffusers":
            f = diffusers_step(s.diffusers, case.eta, case)
            return lambda: f(*args)
        raise ValueError(f"unknown provider {name!r}; expected one of {ALL}")

    def _compiled_fn(self, s, case, inputs, dtype_id, args):
        # Static shapes: one compiled function (and one compile) per (case, dtype, shape).
        key = (case.name, dtype_id, tuple(inputs["x"].shape))
        if key not in self._compiled:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._compiled[key] = torch.compile(minimal_step(s.coefs, case), dynamic=False, fullgraph=True,
                                                options=compile_options(self.device, case))
        f = self._compiled[key]
        if key in self.compile_seconds:
            return lambda: f(*args)

        def first():
            # The first call compiles: its time is reported separately, not timed as a step.
            t0 = time.perf_counter()
            result = f(*args)
            sync(self.device)
            self.compile_seconds.setdefault(key, time.perf_counter() - t0)
            return result

        return first


def with_torch_ops(fn):
    """fn with the CPU C kernel switched off for the duration of each call (its torch-ops path)."""

    def run():
        os.environ[native.DISABLE_ENV] = "0"
        try:
            return fn()
        finally:
            os.environ.pop(native.DISABLE_ENV, None)

    return run


def first_call_seconds(fn, device: torch.device) -> float:
    """Wall time of the first call (compilation included for torch.compile and Triton)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0
