"""The step implementations compared in one run.

Each provider turns (case, inputs) into a zero-argument callable returning x_prev,
doing what its sampler does per step (allocating its outputs, reading host
coefficients), so that the timed call is the per-step cost a user pays:
    triton    the fused kernel (ddim_fused.backend.step_function("triton", ...))
    torch     the fused sampler's torch backend (step_function("torch", ...))
    eager     ddim_fused.reference.ReferenceDDIMSampler (the tests' oracle)
    compile   torch.compile(fullgraph=True) of the eager step
    diffusers diffusers.DDIMScheduler.step (optional)
The fused providers use DDIMSampler(...).coefs, the coefficients the sampler uses.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

from ddim_fused import DDIMSampler, ReferenceDDIMSampler
from ddim_fused.backend import interpreter_on, step_function
from ddim_fused.masks import mask_layout
from ddim_fused.schedules import make_alpha_bar
from ddim_fused.step_args import StepArgs

from .cases import ALPHA_BAR, DISCRETIZE, GUIDANCE, INDEX, N_STEPS, SEED, Case
from .timing import sync

FUSED = ("triton", "torch")
BASELINES = ("eager", "compile", "diffusers")
ALL = FUSED + BASELINES


def _identity_model(x, t, cond):
    return x


class Samplers:
    """The fused and reference samplers (and a diffusers scheduler) for one eta, built once."""

    def __init__(self, eta: float):
        self.eta = eta
        self.fused = DDIMSampler(_identity_model, N_STEPS, DISCRETIZE, eta, alpha_bar=ALPHA_BAR, backend="torch")
        self.ref = ReferenceDDIMSampler(_identity_model, N_STEPS, DISCRETIZE, eta, alpha_bar=ALPHA_BAR)
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
            return False, f"diffusers is not installed ({err})"
        return True, ""
    return True, ""


def fused_args(s: Samplers, case: Case, inputs: dict) -> StepArgs:
    """The step contract for this case at INDEX, as the sampler builds it."""
    c = s.fused.coefs
    paint = {}
    if case.paint:
        orig_coef, orig_noise_coef = c.q_sample_coefs(INDEX, "alpha")
        paint = dict(mask=mask_layout(inputs["mask"], tuple(inputs["x"].shape)), orig=inputs["orig"],
                     orig_coef=orig_coef, orig_noise_coef=orig_noise_coef, orig_noise=inputs["orig_noise"])
    return StepArgs(float(c.x_coef[INDEX]), float(c.eps_coef[INDEX]), GUIDANCE if case.cfg else None,
                    noise_coef=float(c.noise_scale[INDEX]), noise=inputs["noise"], seed=SEED, step_key=INDEX,
                    x0_coefs=(float(c.x0_x_coef[INDEX]), float(c.x0_eps_coef[INDEX])), **paint)


def _fused_fn(step_fn, s, case, inputs):
    args = fused_args(s, case, inputs)
    x, model_out = inputs["x"], inputs["model_out"]

    def run():
        # The sampler allocates its outputs every step; so does this.
        x0_out = torch.empty_like(x) if case.x0 else None
        out = step_fn(x, model_out, torch.empty_like(x), args, x0_out)
        return (out, x0_out) if case.x0 else out

    return run


def eager_step(ref: ReferenceDDIMSampler, case: Case):
    """The reference's per-step work as a function of tensors (also what torch.compile gets).

    Returns:
        f(x, model_out, noise, orig, orig_noise, mask) -> x_prev (or (x_prev, pred_x0) for x0).
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
        return (x_prev, pred_x0) if case.x0 else x_prev

    return step


def _tensor_args(inputs):
    return (inputs["x"], inputs["model_out"], inputs["noise"], inputs["orig"], inputs["orig_noise"], inputs["mask"])


def diffusers_step(sched, eta: float, case: Case):
    """DDIMScheduler.step with a pipeline's CFG combine and an inpainting pipeline's blend.

    Returns:
        f(x, model_out, noise, orig, orig_noise, mask) -> x_prev.
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
        return (x_prev, pred_x0) if case.x0 else x_prev

    return step


def _graph_friendly(ref: ReferenceDDIMSampler) -> ReferenceDDIMSampler:
    """A copy of the reference whose noise sigmas are Python floats.

    The reference branches on `noise_sigma == 0.0` with a 0-d tensor, which would break
    the compiled step into several graphs; as floats the branch is resolved at trace
    time and the step compiles to one graph (fullgraph=True), the strongest
    torch.compile baseline. The formulas and every other coefficient are unchanged.
    """
    twin = copy.copy(ref)
    twin.ddim_noise_sigma = ref.ddim_noise_sigma.tolist()
    return twin


class Providers:
    """Builds each provider's callable; caches samplers and compiled functions across sizes."""

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
        """Zero-argument callable running provider `name` on `inputs` (x_prev first in its result)."""
        s = self.samplers(case.eta)
        if name in ("torch", "triton"):
            return _fused_fn(step_function(name, self.device, inputs["x"].dtype), s, case, inputs)
        args = _tensor_args(inputs)
        if name == "eager":
            f = eager_step(s.ref, case)
            return lambda: f(*args)
        if name == "compile":
            key = (case.name, dtype_id)
            if key not in self._compiled:
                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
                self._compiled[key] = torch.compile(eager_step(_graph_friendly(s.ref), case),
                                                    dynamic=True, fullgraph=True)
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
        if name == "diffusers":
            f = diffusers_step(s.diffusers, case.eta, case)
            return lambda: f(*args)
        raise ValueError(f"unknown provider {name!r}; expected one of {ALL}")


def first_call_seconds(fn, device: torch.device) -> float:
    """Wall time of the first call (compilation included for torch.compile and Triton)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def x_prev_of(result) -> torch.Tensor:
    """x_prev from a provider's result (a tensor, or a tuple whose first item is x_prev)."""
    return result[0] if isinstance(result, tuple) else result
