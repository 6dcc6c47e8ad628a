"""Drop-in fused DDIM schedulers for Hugging Face diffusers.

    from ddim_fused.diffusers import use_fused
    pipe = use_fused(pipe)          # pipe.scheduler is now a FusedDDIMScheduler

`FusedDDIMScheduler` and `FusedDDIMInverseScheduler` subclass diffusers' `DDIMScheduler`
and `DDIMInverseScheduler`: same config, same `set_timesteps`, same `step()` signature.
Results, per dtype of `sample` and `model_output`:
- float32: within 5e-6 of diffusers' step (relative to the output's max), same rounding
  noise, not bit-identical;
- float64 (torch path): computed in float64 from float64 coefficients, where diffusers
  computes its coefficients in float32: the two agree to ~1e-6 relative;
- float16 / bfloat16: NOT diffusers' numbers by design. The fused step computes in
  float32 and rounds once on store, where diffusers computes in the half dtype and rounds
  after every operation, so the two differ by a few units in the last place of the
  output. Against diffusers' step evaluated in float32 on the same inputs, the fused error
  is at most diffusers' (0.12-0.73 of it over 20-step trajectories, see
  tests/test_diffusers_scheduler.py).

Saving: configs are written with the stock class name (`"_class_name": "DDIMScheduler"`)
and `use_fused` records the stock class in a pipeline's model_index.json, so a saved
pipeline loads with any diffusers install, with or without ddim_fused; the loaded
pipeline has the stock schedulers, so call `use_fused` again after loading.

`set_timesteps` tabulates alpha_t, alpha_prev and the DDIM variance for every
training time step on the host (float64, from diffusers' own float32 alphas_cumprod);
`step()` turns them into the coefficients of one linear update

    x_prev  = x_coef * sample + m_coef * model_output + std * noise
    pred_x0 = a * sample + b * model_output

and runs it as one fused kernel on CUDA, or on the torch path elsewhere (one pass of the
C kernel for float32 on the CPU; `ddim_fused.backend` decides, as for the sampler; float64
runs on the torch path, strided inputs are copied once). At eta > 0 the noise is drawn as
diffusers draws it, with the caller's generator, already scaled by std, into the buffer
that becomes prev_sample. clip_sample and thresholding are not
linear: pred_x0 is written first, clipped in torch, and a second fused launch finishes.

Host-device synchronisation: none per step when the timestep is an int, a float, a CPU
tensor, or a 0-d tensor taken from `scheduler.timesteps` (as every diffusers pipeline
does): such a tensor is a view of the schedule, and its index is its storage offset,
so its value is read from the host copy. A device tensor from anywhere else is read
with `.item()`, one sync. `alphas_cumprod` is copied to the host once per scheduler
(a sync only if `add_noise` has already moved it to a GPU).

Importing this module imports diffusers; `import ddim_fused` does not.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

try:
    from diffusers import DDIMInverseScheduler, DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ddim_fused.diffusers needs Hugging Face diffusers: pip install 'ddim-fused[diffusers]'"
    ) from exc

from .backend import BACKENDS, check_backend, step_function
from .coefficients import StepCoefficients, ddim_variance, step_coefficients
from .step_args import StepArgs
from .validation import check_bool, check_float

# Per-eta coefficient tables a scheduler keeps before starting over (eta is usually fixed).
_MAX_ETA_TABLES = 8

__all__ = ["BACKENDS", "FusedDDIMInverseScheduler", "FusedDDIMScheduler", "StepCoefficients",
           "step_coefficients", "use_fused"]


class _FusedStepMixin:
    """Host schedule tables, timestep lookup and the fused launches shared by both schedulers."""

    _backend = "auto"
    # The diffusers class this one reproduces: its name is what saved configs carry.
    _stock_scheduler: type

    # --- identity towards diffusers: compatibles and saved configs ----------------------

    @classmethod
    def _get_compatibles(cls) -> list[type]:
        """This class, then every class the stock scheduler lists (itself included).

        diffusers resolves `_compatibles` names in its own namespace, where no fused
        class lives, so the inherited lookup would drop this class (and list nothing at
        all for the inverse scheduler).
        """
        stock = cls._stock_scheduler._get_compatibles()
        return [cls] + sorted((c for c in stock if c is not cls), key=lambda c: c.__name__)

    def to_json_string(self) -> str:
        """The config as diffusers writes it, but naming the stock class in `_class_name`.

        Every save (`save_config`, `save_pretrained`, a pipeline's save) goes through
        here, so a saved config loads as DDIMScheduler / DDIMInverseScheduler with any
        diffusers install, even one without ddim_fused; `Fused*.from_pretrained` reads
        it back as the fused class. The in-memory config keeps this class's name.
        """
        config = json.loads(super().to_json_string())
        config["_class_name"] = self._stock_scheduler.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @property
    def backend(self) -> str:
        """`auto` (kernel for CUDA tensors, torch otherwise), `triton` (always the kernel) or `torch`."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(value)

    # --- schedule ------------------------------------------------------------------

    def _host_alphas_cumprod(self) -> np.ndarray:
        cached = self.__dict__.get("_alphas_cumprod_host")
        if cached is None:
            cached = self.alphas_cumprod.detach().to("cpu", torch.float64).numpy().copy()
            self._alphas_cumprod_host = cached
        return cached

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Set the inference time steps (as diffusers) and tabulate every step's alphas on the host.

        Args:
            num_inference_steps: number of sampling steps, 1..num_train_timesteps.
            device: where `self.timesteps` goes; the host tables stay on the host.
        """
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        super().set_timesteps(int(num_inference_steps))  # on the CPU: the host copy costs no sync
        self._host_timestep_list = self.timesteps.tolist()
        if device is not None:
            self.timesteps = self.timesteps.to(device)
        self._timesteps_ref = self.timesteps
        self._timesteps_version = self.timesteps._version
        self._tables = self._schedule_tables(self._host_alphas_cumprod(),
                                             self.config.num_train_timesteps // self.num_inference_steps)
        self._step_tables = {}
        self._step_table(0.0)  # eta = 0, the pipelines' default: tabulated now, not in the first step

    def _step_table(self, eta) -> dict:
        """{training time step: (StepCoefficients, (x_coef, m_coef))} of the schedule for one eta.

        Built once per eta and per set_timesteps (every time step of the schedule, in
        float64 with `step_coefficients`), so a step is a dictionary lookup. A time step
        outside the schedule is computed on the fly.
        """
        if type(eta) is not float or eta not in self._step_tables:  # (a list could not even be looked up)
            eta = check_float("eta", eta, low=0.0)
        table = self._step_tables.get(eta)
        if table is None:
            if len(self._step_tables) >= _MAX_ETA_TABLES:
                self._step_tables.clear()
            table = {t: self._coefficient_row(t, eta) for t in self._host_timestep_list}
            self._step_tables[eta] = table
        return table

    def _coefficient_row(self, t: int, eta: float) -> tuple:
        a_t, a_prev, variance = self._tables[:, t]
        coefs = step_coefficients(a_t, a_prev, variance, eta, self.config.prediction_type)
        if coefs.prev_eps != coefs.prev_eps and coefs.std > 0.0:  # NaN: sqrt of 1 - alpha_prev - std**2 < 0
            raise ValueError(f"eta={eta} makes the noise variance exceed 1 - alpha_prev at timestep {t} "
                             "(stock diffusers would return NaN); use a smaller eta")
        return coefs, coefs.linear

    def _coefficients(self, t: int, eta) -> tuple:
        """(StepCoefficients, (x_coef, m_coef)) of the step from training time step t."""
        row = self._step_table(eta).get(t)
        return row if row is not None else self._coefficient_row(t, float(eta))

    def _timestep_value(self, timestep) -> int:
        """The training time step `timestep` names, as a host int, without a device sync if possible."""
        if isinstance(timestep, torch.Tensor):
            index = self._schedule_index(timestep)
            if index is not None:  # a pipeline's case: a view of self.timesteps, in range by construction
                return self._host_timestep_list[index]
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}")
            if timestep.dtype.is_complex or timestep.dtype == torch.bool:
                raise TypeError(f"timestep must be an integer or float tensor, got dtype {timestep.dtype}")
            value = timestep.item()
        elif isinstance(timestep, (bool, np.bool_)):
            raise TypeError("timestep must be an int, a float or a tensor, got a bool")
        elif isinstance(timestep, (int, np.integer, float, np.floating)):
            value = timestep.item() if isinstance(timestep, np.generic) else timestep
        else:
            raise TypeError(f"timestep must be an int, a float or a tensor, got {type(timestep).__name__}")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"timestep must be a whole number (a training time step), got {value}")
            value = int(value)
        n_train = self.config.num_train_timesteps
        if not 0 <= value < n_train:
            raise ValueError(f"timestep {value} is outside the training time steps [0, {n_train - 1}]")
        return value

    def _schedule_index(self, timestep: torch.Tensor) -> int | None:
        """Index of `timestep` in the schedule if it is a 0-d or 1-element view of an unchanged `self.timesteps`."""
        ref = self.__dict__.get("_timesteps_ref")
        if (ref is None or timestep._base is not ref or self.timesteps is not ref
                or ref._version != self._timesteps_version or timestep.dtype != ref.dtype or timestep.numel() != 1):
            return None
        index = timestep.storage_offset() - ref.storage_offset()
        return index if 0 <= index < len(self._host_timestep_list) else None

    # --- checks and launches --------------------------------------------------------

    def _check_ready(self) -> None:
        if self.num_inference_steps is None or self.__dict__.get("_tables") is None:
            raise ValueError("Number of inference steps is 'None': call set_timesteps(num_inference_steps) "
                             "on the scheduler before step()")

    @staticmethod
    def _check_inputs(model_output, sample) -> None:
        # The common case in one expression (it runs every step); the rest names the problem.
        if (isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor)
                and model_output.shape == sample.shape and model_output.dtype.is_floating_point
                and sample.dtype.is_floating_point and model_output.device == sample.device):
            return
        for name, t in (("model_output", model_output), ("sample", sample)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)}, expected sample's shape "
                             f"{tuple(sample.shape)} (split a learned-variance output before step())")
        if model_output.device != sample.device:
            raise ValueError(f"model_output is on {model_output.device}, sample on {sample.device}")

    def _launcher(self, sample, dtype, noise, noise_is_scaled: bool = False):
        """(step function, noise) for this step; see `ddim_fused.backend` for the policy.

        float64 runs on the torch path under backend="auto"; inputs are made contiguous
        by the caller. Noise that does not have the kernel's (1 or B, *s) layout (e.g.
        broadcast over channels) is expanded once into it; scaled noise (drawn here) has it.
        """
        key = (self._backend, sample.device, dtype)
        cache = self.__dict__.setdefault("_step_functions", {})
        run = cache.get(key)
        if run is None:
            run = cache[key] = step_function(*key)
        if noise is None or noise_is_scaled:
            return run, noise
        if (noise.shape[1:] != sample.shape[1:] or noise.shape[0] not in (1, sample.shape[0])
                or noise.dim() != sample.dim()):
            noise = noise.expand(sample.shape)
        return run, noise.contiguous()

    def _fused_update(self, model_output, sample, coefs: StepCoefficients, linear, noise, clip, use_clipped: bool,
                      noise_is_scaled: bool = False):
        """(prev_sample, pred_original_sample): one launch, or two around a torch clip of pred_x0.

        noise: (1 or B, *s) standard normal noise, or with noise_is_scaled std * noise in a
        fresh contiguous (B, *s) buffer of the promoted dtype, which becomes prev_sample
        (the update writes over the noise it reads: one buffer less, one op less).
        """
        if sample.dim() == 0:  # diffusers takes a 0-d sample; the fused update needs a batch dim
            noise = None if noise is None else noise.reshape(1)
            prev, x0 = self._fused_update(model_output.reshape(1), sample.reshape(1), coefs, linear, noise, clip,
                                          use_clipped, noise_is_scaled)
            return prev.reshape(()), x0.reshape(())
        dtype = sample.dtype if model_output.dtype is sample.dtype else torch.promote_types(model_output.dtype,
                                                                                              sample.dtype)
        if dtype == torch.float64:
            # The torch path accumulates in sample's dtype; diffusers promotes to float64.
            sample, model_output = sample.double(), model_output.double()
        elif model_output.dtype != sample.dtype:
            sample, model_output = sample.to(dtype), model_output.to(dtype)
        # The kernel reads contiguous memory: a strided input is copied once here.
        if not sample.is_contiguous():
            sample = sample.contiguous()
        if not model_output.is_contiguous():
            model_output = model_output.contiguous()
        run, noise = self._launcher(sample, dtype, noise, noise_is_scaled)
        std = 0.0 if noise is None else 1.0 if noise_is_scaled else coefs.std
        prev = noise if noise_is_scaled else torch.empty_like(sample)
        x0 = torch.empty_like(sample)
        if clip is None:
            x_coef, m_coef = linear
            run(sample, model_output, prev, StepArgs(x_coef, m_coef, noise_coef=std, noise=noise, x0_coefs=coefs.x0),
                x0)
            return prev, x0
        eps = None
        if use_clipped or coefs.eps_is_model_output:
            # Subtract, then divide, as diffusers does: at high noise pred_x0 of an eps-model
            # is a small difference of two terms ~1/sqrt(alpha_t) large, and a clip range
            # far below them would expose the rounding of x0[0] * sample + x0[1] * model_output.
            p, q, d = coefs.x0_split
            run(sample, model_output, x0, StepArgs(p, q))
            if d != 1.0:
                x0.div_(d)
        else:  # sample / v_prediction: x0_split[2] == 1, pred_x0 and pred_eps in one launch
            eps = torch.empty_like(prev)
            run(sample, model_output, eps, StepArgs(coefs.eps[0], coefs.eps[1], x0_coefs=coefs.x0), x0)
        x0 = clip(x0)
        if use_clipped:
            x0_coef, s_coef = coefs.from_clipped_x0
            run(x0, sample, prev, StepArgs(x0_coef, s_coef, noise_coef=std, noise=noise))
        else:
            run(x0, model_output if eps is None else eps, prev,
                StepArgs(coefs.prev_x0, coefs.prev_eps, noise_coef=std, noise=noise))
        return prev, x0


class FusedDDIMScheduler(_FusedStepMixin, DDIMScheduler):
    """`diffusers.DDIMScheduler` whose step runs as the fused DDIM kernel (torch path off CUDA).

    Same config, same `set_timesteps`, same `step()` arguments; every DDIMScheduler option
    is supported. Results equal diffusers' to float32 rounding in float32; in float16 /
    bfloat16 they are computed in float32 and rounded once, so they differ from diffusers'
    by a few units in the last place and are at least as close to a float32 evaluation
    (see the module docstring). `scheduler.backend` picks `auto` / `triton` / `torch`.
    `compatibles` lists this class and DDIMScheduler's compatibles; saved configs name
    DDIMScheduler.
    """

    _stock_scheduler = DDIMScheduler

    def _schedule_tables(self, alphas_cumprod: np.ndarray, ratio: int) -> np.ndarray:
        """(3, T) float64: alpha_t, alpha_prev, variance for a step from each training time step t.

        The step goes to t - num_train_timesteps // num_inference_steps whatever the
        spacing (diffusers' rule), or to final_alpha_cumprod below 0.
        """
        final = 1.0 if self.config.set_alpha_to_one else alphas_cumprod[0]
        t = np.arange(len(alphas_cumprod))
        prev = t - ratio
        a_t = alphas_cumprod
        a_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final)
        return np.stack([a_t, a_prev, ddim_variance(a_t, a_prev)])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        """One DDIM step from `timestep`, as `diffusers.DDIMScheduler.step`, fused.

        Args:
            model_output: (B, *s) float tensor, the model's eps / x0 / v prediction.
            timestep: int, whole float or 1-element tensor: a training time step.
            sample: (B, *s) float tensor x_t, same device as model_output.
            eta: noise weight, >= 0 (0: deterministic DDIM, 1: DDPM-like).
            use_clipped_model_output: re-derive eps from the clipped/thresholded pred_x0.
            generator: torch.Generator for the variance noise (used when eta > 0), drawn
                with diffusers' randn_tensor so seeded results match diffusers.
            variance_noise: noise broadcastable to sample (used when eta > 0); not with generator.
            return_dict: return a DDIMSchedulerOutput, else a (prev_sample, pred_original_sample) tuple.

        Returns:
            DDIMSchedulerOutput(prev_sample, pred_original_sample), both (B, *s) in the
            promoted dtype of sample and model_output, or the same as a tuple.
        """
        self._check_ready()
        self._check_inputs(model_output, sample)
        # Stricter than diffusers, which takes any truthy value: a string such as "no" is not False.
        # (DDIMPipeline passes None for "not set".) Python's bools, the usual case, need no call.
        if use_clipped_model_output is not None and type(use_clipped_model_output) is not bool:
            use_clipped_model_output = check_bool("use_clipped_model_output", use_clipped_model_output)
        if type(return_dict) is not bool:
            return_dict = check_bool("return_dict", return_dict)
        if generator is not None and not isinstance(generator, (torch.Generator, list)):
            raise TypeError(f"generator must be a torch.Generator, a list of them, or None; got "
                            f"{type(generator).__name__}")
        t = self._timestep_value(timestep)
        coefs, linear = self._coefficients(t, eta)  # checks eta the first time it is seen
        if self.config.thresholding and sample.dim() < 2:
            raise ValueError(f"thresholding needs sample of shape (B, C, ...), got {tuple(sample.shape)}")
        noise, noise_is_scaled = None, False
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both: one of them must be None")
            if variance_noise is not None:
                _check_noise(variance_noise, sample)
                noise = variance_noise
            elif _draws_like_randn(generator, model_output, sample, coefs.std):
                # What randn_tensor draws, times std, in one op and in the buffer prev_sample
                # becomes: normal_(0, std) consumes the generator as randn does and returns
                # std * the same normals (to the last bit, or one unit in the last place).
                noise = torch.empty_like(sample, memory_format=torch.contiguous_format)
                noise.normal_(0.0, coefs.std, generator=generator)
                noise_is_scaled = True
            else:
                # diffusers draws the noise even where std is 0, so the generator advances identically.
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=model_output.dtype)
        if self.config.thresholding:
            clip = self._threshold_sample
        elif self.config.clip_sample:
            r = self.config.clip_sample_range
            clip = lambda x0: x0.clamp_(-r, r)  # noqa: E731 - x0 is our own fresh buffer
        else:
            clip = None
        prev, x0 = self._fused_update(model_output, sample, coefs, linear, noise, clip, use_clipped_model_output,
                                      noise_is_scaled)
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class FusedDDIMInverseScheduler(_FusedStepMixin, DDIMInverseScheduler):
    """`diffusers.DDIMInverseScheduler` (DDIM inversion, x_t -> x_{t+1}) with the fused step.

    Same per-dtype meaning of "same results" as FusedDDIMScheduler. `compatibles` lists
    this class and DDIMInverseScheduler; saved configs name DDIMInverseScheduler.
    """

    _stock_scheduler = DDIMInverseScheduler

    def _schedule_tables(self, alphas_cumprod: np.ndarray, ratio: int) -> np.ndarray:
        """(3, T) float64: alpha_t, alpha_prev, variance (0) for an inversion step named by t.

        diffusers' rule: the step goes from min(t - ratio, T - 1) (initial_alpha_cumprod
        below 0) up to t, the time step it was called with.
        """
        n_train = len(alphas_cumprod)
        initial = 1.0 if self.config.set_alpha_to_one else alphas_cumprod[0]
        t = np.arange(n_train)
        src = np.minimum(t - ratio, n_train - 1)
        a_t = np.where(src >= 0, alphas_cumprod[np.maximum(src, 0)], initial)
        return np.stack([a_t, alphas_cumprod, np.zeros(n_train)])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One DDIM inversion step to `timestep`, as `diffusers.DDIMInverseScheduler.step`, fused.

        Args:
            model_output: (B, *s) float tensor, the model's prediction at the lower level.
            timestep: int, whole float or 1-element tensor: the training time step to reach.
            sample: (B, *s) float tensor, same device as model_output.
            return_dict: return a DDIMSchedulerOutput, else a tuple.

        Returns:
            DDIMSchedulerOutput(prev_sample, pred_original_sample) (prev_sample is the
            noisier latent), or the same as a tuple.
        """
        self._check_ready()
        self._check_inputs(model_output, sample)
        return_dict = check_bool("return_dict", return_dict)
        t = self._timestep_value(timestep)
        coefs, linear = self._coefficients(t, 0.0)  # the table's variance is 0: no eta
        r = self.config.clip_sample_range
        clip = (lambda x0: x0.clamp_(-r, r)) if self.config.clip_sample else None
        prev, x0 = self._fused_update(model_output, sample, coefs, linear, None, clip, False)
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


def _draws_like_randn(generator, model_output: torch.Tensor, sample: torch.Tensor, std: float) -> bool:
    """Whether std * randn_tensor(model_output.shape, generator, ...) can be drawn as normal_(0, std).

    It can when the draw happens where randn_tensor draws it (no generator, or one on
    model_output's device), in the dtype the update computes in (float32 or float64,
    model_output's and sample's), and std is a valid standard deviation.
    """
    return (model_output.dtype is sample.dtype and sample.dtype in (torch.float32, torch.float64)
            and (generator is None or (isinstance(generator, torch.Generator) and generator.device == sample.device))
            and math.isfinite(std) and std >= 0.0)


def _check_noise(noise, sample: torch.Tensor) -> None:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"variance_noise must be a torch.Tensor, got {type(noise).__name__}")
    if not noise.dtype.is_floating_point:
        raise TypeError(f"variance_noise must be a floating-point tensor, got dtype {noise.dtype}")
    try:
        shape = torch.broadcast_shapes(noise.shape, sample.shape)
    except RuntimeError:
        shape = None
    if shape != sample.shape:
        raise ValueError(f"variance_noise has shape {tuple(noise.shape)}, which does not broadcast to "
                         f"sample's shape {tuple(sample.shape)}")
    if noise.device != sample.device:
        raise ValueError(f"variance_noise is on {noise.device}, sample on {sample.device}")


def _fused_class_for(scheduler) -> type | None:
    """The fused class that reproduces `scheduler` exactly, or None."""
    for stock, fused in ((DDIMInverseScheduler, FusedDDIMInverseScheduler), (DDIMScheduler, FusedDDIMScheduler)):
        # A subclass with its own step() computes something else: do not replace it.
        if isinstance(scheduler, stock) and type(scheduler).step in (stock.step, fused.step):
            return fused
    return None


def use_fused(pipe, *, backend: str = "auto", convert: bool = False):
    """Swap a pipeline's DDIM scheduler(s) for the fused ones, keeping their config.

    Every scheduler component that is a DDIMScheduler or DDIMInverseScheduler (e.g.
    `scheduler`, `inverse_scheduler`) is replaced by FusedDDIMScheduler /
    FusedDDIMInverseScheduler built `from_config` of its config (a fused one is kept).
    The pipeline's config (model_index.json once saved) keeps naming the stock class, so
    `pipe.save_pretrained` writes a pipeline that any diffusers install loads, with the
    stock schedulers: call `use_fused` again after `from_pretrained`.

    Args:
        pipe: a diffusers pipeline (anything with a `scheduler` attribute).
        backend: `auto`, `triton` or `torch` for the new schedulers.
        convert: also replace a non-DDIM `pipe.scheduler` whose config DDIM accepts (any
            scheduler listed in DDIMScheduler.compatibles, e.g. PNDM, Euler, DPM-Solver)
            by a FusedDDIMScheduler: this changes the sampling algorithm to DDIM.

    Returns:
        pipe, modified in place.
    """
    check_backend(backend)
    convert = check_bool("convert", convert)
    if not hasattr(pipe, "scheduler"):
        raise TypeError(f"use_fused needs a diffusers pipeline with a `scheduler`, got {type(pipe).__name__}")
    components = getattr(pipe, "components", None) or {"scheduler": pipe.scheduler}
    names = [n for n, c in components.items() if isinstance(c, SchedulerMixin)] or ["scheduler"]
    replaced = {}
    for name in names:
        scheduler = getattr(pipe, name)
        fused = _fused_class_for(scheduler)
        if fused is None and name == "scheduler" and convert:
            compatible = {c.__name__ for c in DDIMScheduler._get_compatibles()}
            if type(scheduler).__name__ in compatible and hasattr(scheduler, "config"):
                fused = FusedDDIMScheduler
        if fused is None:
            if name == "scheduler":
                raise TypeError(
                    f"pipe.scheduler is a {type(scheduler).__name__}; use_fused replaces DDIMScheduler and "
                    "DDIMInverseScheduler (without an overridden step()). To switch a DDIM-compatible "
                    "scheduler (PNDM, Euler, DPM-Solver, ...) to fused DDIM sampling, pass convert=True"
                )
            continue
        if type(scheduler) is fused:
            new = scheduler
        else:
            new = fused.from_config(scheduler.config)
        new.backend = backend
        replaced[name] = new
    for name, new in replaced.items():
        setattr(pipe, name, new)
        _record_stock_class(pipe, name, new)
    return pipe


def _record_stock_class(pipe, name: str, scheduler) -> None:
    """Make the pipeline's config entry for `name` name the stock diffusers class.

    Assigning a component makes diffusers record (its module, its class name), here
    ("ddim_fused.diffusers", "FusedDDIMScheduler"), and `from_pretrained` refuses that
    entry in any process that has not imported ddim_fused itself.
    """
    config, register = getattr(pipe, "config", None), getattr(pipe, "register_to_config", None)
    if register is None or not hasattr(config, "get") or not isinstance(config.get(name), (list, tuple)):
        return  # not a DiffusionPipeline: nothing is saved for it
    register(**{name: ("diffusers", scheduler._stock_scheduler.__name__)})
