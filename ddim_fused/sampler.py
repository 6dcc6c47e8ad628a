"""DDIMSampler: labml's DDIM sampler API, one model call and one fused step per step."""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import numpy as np
import torch

from . import graph
from .backend import bind_launches, check_backend, step_function
from .coefficients import ddim_coefficients
from .masks import mask_layout
from .model import model_device, resolve_model
from .plan import (NOISE_SOURCES, Guide, Plan, SplitStep, StepPlan, StepTable, check_model_out, make_noise_policy,
                   step_runner)
from .schedules import ddim_timesteps
from .step_args import StepArgs
from .validation import (FLOAT32_MAX, FLOAT_DTYPES, broadcast_batch, check_bool, check_device, check_float, check_int,
                         check_sample_offset, check_shape, check_tensor)
from .x0_clip import X0Limit

PAINT_BLENDS = ("alpha", "alpha_prev")
PREV_TIMESTEP_RULES = ("previous", "ratio")
# Step tables a sampler keeps for reuse by later calls (one per shape, dtype and options).
_REUSED_TABLES = 4


class DDIMSampler:
    """DDIM sampling (Song et al. 2020) with the per-step update fused into one kernel.

    Args:
        model: eps-model with `alpha_bar` (T,) called as model(x, t, cond) -> eps (labml's
            protocol), or any such callable together with `alpha_bar=`. With another
            prediction_type it returns v or x0 instead of eps.
        n_steps: S, the number of DDIM steps.
        ddim_discretize: "uniform" | "quad" (labml, with its +1), "leading" | "trailing" |
            "linspace" (diffusers' timestep_spacing), or an increasing list of time steps.
        ddim_eta: eta >= 0, or "sigma_hat" (the DDIM paper's larger-variance sigma).
        alpha_bar: (T,) array/tensor or a schedule name; overrides model.alpha_bar.
        set_alpha_to_one: a_prev of the last step is 1 instead of alpha_bar[0].
        steps_offset: offset of "leading" time steps.
        prev_timestep: the time step each step goes to: "previous", the previous entry of
            the time steps (labml), or "ratio", t - T // S as diffusers' DDIMScheduler
            (the same for uniform and leading; not for trailing and linspace).
        prediction_type: what the model returns: "epsilon", "v_prediction" or "sample"
            (default: the model's `prediction_type` attribute, else "epsilon"). The update
            is linear in the model output for all three, so one fused launch serves them.
        clip_sample, clip_sample_range: clip pred_x0 to [-range, range] in every step
            (diffusers' DDIMScheduler option); the step then runs as two launches around
            a torch clamp, and callbacks see the clipped pred_x0.
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding
            of pred_x0 instead (Imagen; diffusers' options, same defaults); wins over
            clip_sample. `invert` never limits pred_x0.
        backend: "auto" (Triton for CUDA tensors, torch ops otherwise), "triton" (CUDA,
            or CPU under TRITON_INTERPRET=1) or "torch"; see `ddim_fused.backend`. Strided
            inputs (x_last, x, orig, mask, noise) are copied once per call, never written.
        noise_source: "philox": noise keyed by (seed, global sample index, step), so a
            sample does not depend on the batch it is in; "torch": torch.randn drawn
            exactly as labml's sampler draws it.
        seed: default Philox seed; None draws one from torch's global generator per call.
        paint_blend: "alpha" noises the original to the step's own alpha, as labml does;
            "alpha_prev" to alpha_prev, the level of the new x (the clean original at the end).
    """

    def __init__(
        self,
        model,
        n_steps: int,
        ddim_discretize="uniform",
        ddim_eta=0.0,
        *,
        alpha_bar=None,
        set_alpha_to_one: bool = False,
        steps_offset: int = 0,
        prev_timestep: str = "previous",
        prediction_type: Optional[str] = None,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        backend: str = "auto",
        noise_source: str = "philox",
        seed: Optional[int] = None,
        paint_blend: str = "alpha",
    ):
        check_backend(backend)
        _check_choice("noise_source", noise_source, NOISE_SOURCES)
        _check_choice("paint_blend", paint_blend, PAINT_BLENDS)
        _check_choice("prev_timestep", prev_timestep, PREV_TIMESTEP_RULES)
        if seed is not None:
            check_int("seed", seed, 0, 2**63 - 1)
        if prediction_type is None:
            prediction_type = getattr(model, "prediction_type", "epsilon")
        self.limit = X0Limit.from_options(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                                          sample_max_value)
        self.model, alpha_bar = resolve_model(model, alpha_bar, allow_zero_snr=True)
        self.n_steps = len(alpha_bar)
        self.time_steps = ddim_timesteps(self.n_steps, n_steps, ddim_discretize, steps_offset)
        prev = None
        if prev_timestep == "ratio":
            spacing = n_steps if isinstance(ddim_discretize, str) else len(self.time_steps)
            prev = self.time_steps - self.n_steps // spacing
        final = 1.0 if check_bool("set_alpha_to_one", set_alpha_to_one) else None
        self.coefs = ddim_coefficients(alpha_bar, self.time_steps, ddim_eta, final,
                                       prediction_type=prediction_type, prev_time_steps=prev)
        self.prediction_type = prediction_type
        self.backend, self.noise_source, self.seed, self.paint_blend = backend, noise_source, seed, paint_blend
        # labml's attribute names, for code that reads them.
        self.ddim_alpha = torch.from_numpy(self.coefs.alpha).float()
        self.ddim_alpha_sqrt = self.ddim_alpha.sqrt()
        self.ddim_alpha_prev = torch.from_numpy(self.coefs.alpha_prev).float()
        self.ddim_sigma = torch.from_numpy(self.coefs.sigma).float()
        self.ddim_sqrt_one_minus_alpha = (1.0 - torch.from_numpy(self.coefs.alpha)).sqrt().float()
        self._reused: dict = {}  # key -> StepTable of finished calls (see _plan)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def sample(
        self,
        shape,
        cond,
        repeat_noise: bool = False,
        temperature: float = 1.0,
        x_last: Optional[torch.Tensor] = None,
        uncond_scale: float = 1.0,
        uncond_cond=None,
        skip_steps: int = 0,
        *,
        seed: Optional[int] = None,
        sample_offset: int = 0,
        callback: Optional[Callable[[dict], None]] = None,
        device=None,
        dtype: Optional[torch.dtype] = None,
        cuda_graph: bool = False,
    ) -> torch.Tensor:
        """Generate samples, from x_last or fresh noise at time_steps[-1 - skip_steps].

        Args:
            shape: (B, *s), e.g. (B, C, H, W), (B, C, F, H, W) or (B, N, D).
            cond: conditioning passed to the model (any type; batch-first tensor for CFG).
            repeat_noise: one noise image shared by the whole batch at every step.
            temperature: scale of the step noise (>= 0).
            x_last: (B, *s) starting latent (not modified); else noise is drawn.
            uncond_scale: classifier-free guidance scale; needs uncond_cond when != 1.
            uncond_cond: unconditional conditioning, same batch as cond.
            skip_steps: number of the noisiest DDIM steps to skip, in [0, S).
            seed: Philox seed of this call (see the constructor).
            sample_offset: global index of sample 0, so split batches draw the noise the
                whole batch would have drawn.
            callback: called after each step with a dict of index, t, x, pred_x0 (views of
                the sampler's buffers: clone what you keep).
            device, dtype: of the drawn latent when x_last is None (default: the model's
                device, float32).
            cuda_graph: capture the whole loop, model included, in a CUDA graph on the
                first call for a given shape, dtype and options, then replay it; see
                `ddim_fused.graph` (warm-up, memory pool, what invalidates a capture).
                CUDA and noise_source="philox" only, no callback.

        Returns:
            x: (B, *s) the sample x_0 (the latent at alpha_prev of index 0).
        """
        shape = check_shape(shape)
        skip_steps = check_int("skip_steps", skip_steps, 0, self.coefs.n_steps - 1)
        if x_last is not None:
            check_tensor("x_last", x_last, shape=shape)
            device, dtype = x_last.device, x_last.dtype
        else:
            device = check_device(device) if device is not None else (model_device(self.model) or torch.device("cpu"))
            dtype = dtype or torch.float32
        temperature = check_float("temperature", temperature, 0.0, FLOAT32_MAX)
        repeat_noise = check_bool("repeat_noise", repeat_noise)
        if check_bool("cuda_graph", cuda_graph):
            graph.check_graph_call(self, device, callback)
            return graph.sample_captured(self, shape, device, dtype, cond, repeat_noise=repeat_noise,
                                         temperature=temperature, x_last=x_last, uncond_scale=uncond_scale,
                                         uncond_cond=uncond_cond, skip_steps=skip_steps, seed=seed,
                                         sample_offset=sample_offset)
        plan = self._plan(range(self.coefs.n_steps - 1 - skip_steps, -1, -1), shape, device, dtype, cond,
                          uncond_scale, uncond_cond, seed=seed, sample_offset=sample_offset,
                          repeat_noise=repeat_noise, temperature=temperature, reuse=True)
        x = x_last.contiguous() if x_last is not None else plan.noise.initial(shape, device, dtype)
        return self._denoise(x, plan, callback)

    @torch.no_grad()
    def paint(
        self,
        x: torch.Tensor,
        cond,
        t_start: int,
        *,
        orig: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        orig_noise: Optional[torch.Tensor] = None,
        uncond_scale: float = 1.0,
        uncond_cond=None,
        seed: Optional[int] = None,
        sample_offset: int = 0,
        callback: Optional[Callable[[dict], None]] = None,
        cuda_graph: bool = False,
    ) -> torch.Tensor:
        """Denoise x from DDIM index t_start - 1 down, keeping `orig` where mask is 1.

        Args:
            x: (B, *s) latent at time_steps[t_start - 1] (e.g. q_sample of an image); not modified.
            cond, uncond_scale, uncond_cond: as in `sample`.
            t_start: number of DDIM steps to run, in [1, S].
            orig: (B or 1, *s) original (e.g. clean latent) to keep where mask is 1.
            mask: broadcastable to x with batch B or 1 (e.g. (B, 1, H, W)); float in [0, 1]
                or bool (ValueError otherwise: its values are read once, a host sync).
                After each step x = orig_t * mask + x * (1 - mask).
            orig_noise: (B or 1, *s) fixed noise for orig_t; else fresh noise each step.
            cuda_graph: capture the loop in a CUDA graph and replay it, as in `sample`.

        Returns:
            x: (B, *s).
        """
        x = _check_batched("x", x)
        t_start = check_int("t_start", t_start, 1, self.coefs.n_steps)
        if (orig is None) != (mask is None):
            raise ValueError("paint needs orig and mask together (got only one of them)")
        paint = None
        if orig is not None:
            check_tensor("mask", mask, device=x.device, dtypes=FLOAT_DTYPES + (torch.bool,))
            # One reduction and one host sync per call: a mask outside [0, 1] (or NaN) would
            # extrapolate between x and orig, or make every painted value NaN.
            if mask.dtype != torch.bool and not bool(((mask >= 0) & (mask <= 1)).all()):
                raise ValueError("mask values must lie in [0, 1] (1 keeps orig, 0 regenerates); got values outside "
                                 "it, or NaN")
            paint = {"mask": mask_layout(mask, tuple(x.shape)), "orig": broadcast_batch("orig", orig, x),
                     "orig_noise": None if orig_noise is None else broadcast_batch("orig_noise", orig_noise, x)}
        elif orig_noise is not None:
            raise ValueError("orig_noise given without orig and mask")
        if check_bool("cuda_graph", cuda_graph):
            graph.check_graph_call(self, x.device, callback)
            return graph.paint_captured(self, x, cond, t_start, orig=orig, mask=mask, orig_noise=orig_noise,
                                        uncond_scale=uncond_scale, uncond_cond=uncond_cond, seed=seed,
                                        sample_offset=sample_offset)
        plan = self._plan(range(t_start - 1, -1, -1), x.shape, x.device, x.dtype, cond, uncond_scale, uncond_cond,
                          seed=seed, sample_offset=sample_offset, paint=paint)
        return self._denoise(x.contiguous(), plan, callback)

    @torch.no_grad()
    def invert(
        self,
        x0: torch.Tensor,
        cond,
        *,
        uncond_scale: float = 1.0,
        uncond_cond=None,
        callback: Optional[Callable[[dict], None]] = None,
    ) -> torch.Tensor:
        """Deterministic DDIM inversion: encode x0 into the latent at the noisiest step.

        Step i evaluates eps at time step tau_i on x (at level alpha_prev_i) and moves x
        to level alpha_i with the same fused kernel (eta = 0). `sample(x_last=...)` with
        this sampler then reconstructs x0 up to the discretization error.

        Args:
            x0: (B, *s) clean sample (not modified).
            cond, uncond_scale, uncond_cond: as in `sample`.
            callback: called after each step with a dict of index, t, x.

        Returns:
            x_T: (B, *s) latent at time_steps[-1].
        """
        x0 = _check_batched("x0", x0)
        if not (np.all(np.isfinite(self.coefs.inv_x_coef)) and np.all(np.isfinite(self.coefs.inv_eps_coef))):
            raise ValueError(f"a {self.prediction_type!r} model cannot be inverted from alpha_prev = 1 "
                             "(set_alpha_to_one): its eps is undefined on clean samples")
        plan = self._plan(range(self.coefs.n_steps), x0.shape, x0.device, x0.dtype, cond, uncond_scale,
                          uncond_cond, invert=True, reuse=True)
        return self._denoise(x0.contiguous(), plan, callback)

    @torch.no_grad()
    def p_sample(self, x, c, t, step, index, *, repeat_noise=False, temperature=1.0, uncond_scale=1.0,
                 uncond_cond=None, noise=None, seed=None, sample_offset=0):
        """One DDIM step at DDIM index `index` (time step `step`, t its (B,) tensor).

        Args:
            x: (B, *s); c: conditioning; t: (B,) long time steps; index: in [0, S).
            noise: (B or 1, *s) explicit step noise (else drawn per noise_source).

        Returns:
            (x_prev, pred_x0, e_t), each (B, *s); e_t is the guided model output (eps for
            an epsilon model).
        """
        x, index, noise = self._check_step_args(x, index, noise)
        _check_time_steps(t, x)
        plan = self._plan([index], x.shape, x.device, x.dtype, c, uncond_scale, uncond_cond, seed=seed,
                          sample_offset=sample_offset, repeat_noise=repeat_noise,
                          temperature=check_float("temperature", temperature, 0.0, FLOAT32_MAX), noise=noise)
        return self._step(x, plan.guide.model_out(x, t), plan, plan.steps[0], want_eps=True)

    @torch.no_grad()
    def get_x_prev_and_pred_x0(self, e_t, index, x, *, temperature=1.0, repeat_noise=False, noise=None,
                               seed=None, sample_offset=0):
        """The update alone: (x_prev, pred_x0) from the model output e_t (B, *s) at DDIM index `index`."""
        x, index, noise = self._check_step_args(x, index, noise)
        plan = self._plan([index], x.shape, x.device, x.dtype, None, 1.0, None, seed=seed,
                          sample_offset=sample_offset, repeat_noise=repeat_noise,
                          temperature=check_float("temperature", temperature, 0.0, FLOAT32_MAX), noise=noise)
        x_prev, pred_x0, _ = self._step(x, check_model_out(e_t, x, 1), plan, plan.steps[0])
        return x_prev, pred_x0

    @torch.no_grad()
    def q_sample(self, x0, index, noise=None, *, seed=None, sample_offset=0):
        """Noise x0 (B, *s) to the level of DDIM index `index`: sqrt(a) x0 + sqrt(1 - a) noise.

        Returns:
            (B, *s) in x0's dtype.
        """
        x0 = _check_batched("x0", x0)
        index = check_int("index", index, 0, self.coefs.n_steps - 1)
        check_sample_offset(sample_offset, x0.shape[0])
        if seed is not None:
            check_int("seed", seed, 0, 2**63 - 1)
        if noise is None:
            noise = make_noise_policy(self.noise_source, self._call_seed(seed), sample_offset, False).orig(x0, index)
        else:
            noise = broadcast_batch("noise", noise, x0)
        sqrt_a, sqrt_one_minus_a = self.coefs.q_sample_coefs(index)
        return torch.add(x0 * sqrt_a, noise.to(x0.dtype), alpha=sqrt_one_minus_a)

    def get_eps(self, x, t, c, *, uncond_scale=1.0, uncond_cond=None):
        """The model's output for x (B, *s), guided when uncond_scale != 1 (labml's get_eps).

        For an epsilon model it is eps; otherwise the v or x0 prediction.
        """
        x = _check_batched("x", x)
        _check_time_steps(t, x)
        return Guide.checked(self.model, c, uncond_scale, uncond_cond, x.shape[0]).eps(x, t)

    # ------------------------------------------------------------------ internals
    def _plan(self, indices, shape, device, dtype, cond, uncond_scale, uncond_cond, *, seed=None, sample_offset=0,
              repeat_noise=False, temperature=1.0, noise=None, paint=None, invert=False, reuse=False) -> Plan:
        """Check a call's arguments and build its per-step records, before any model call.

        Args:
            indices: DDIM indices in the order they run.
            shape, device, dtype: of x (B, *s).
            noise: explicit (1 or B, *s) step noise of a single-step call.
            paint: dict of mask (MaskLayout), orig, orig_noise for paint.
            invert: inversion steps (alpha_prev up to alpha, no noise).
            reuse: take the steps of an earlier call with the same key (see `StepTable`)
                when they depend on nothing of that call but its noise; they are handed
                back with `_give_back` after the loop.
        """
        batch = shape[0]
        check_sample_offset(sample_offset, batch)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype {dtype} is not supported; expected one of {', '.join(map(str, FLOAT_DTYPES))}")
        step_fn = step_function(self.backend, device, dtype)
        guide = Guide.checked(self.model, cond, uncond_scale, uncond_cond, batch)
        policy = make_noise_policy(self.noise_source, self._call_seed(seed), sample_offset,
                                   check_bool("repeat_noise", repeat_noise))
        key = None
        if reuse and paint is None and noise is None:
            key = (tuple(indices), tuple(shape), device, dtype, step_fn, guide.scale, temperature, type(policy),
                   policy.repeat, invert, self.limit)
        # Popped while in use, so a concurrent call with the same key builds its own.
        table = self._reused.pop(key, None) if key is not None else None
        if table is not None:
            table.refill(policy, step_fn)
        else:
            # Ordinary tensors even when this call runs under inference mode: a later call,
            # in or out of that mode, refills the kept noise in place. (inference_mode(False)
            # turns grad mode on, hence no_grad.)
            with torch.inference_mode(False), torch.no_grad():
                table = self._step_table(list(indices), shape, device, dtype, step_fn, guide.scale, policy,
                                         temperature, noise, paint or {}, invert)
        return Plan(step_fn, guide, policy, table.records, has_x0=not invert, limit=self.limit,
                    reuse=(key, table) if key is not None and table.reusable else None)

    def _step_table(self, indices: list, shape, device, dtype, step_fn, guidance, policy, temperature, noise,
                    paint: dict, invert: bool) -> StepTable:
        """The StepTable of a call: its steps' records, the model's time steps, the predrawn noise."""
        table = self._coef_table
        # Every step's model time steps from one tensor: (S, B) rows, (S, 2B) under guidance.
        per_call = shape[0] if guidance is None else 2 * shape[0]
        t_rows = (torch.as_tensor(self.coefs.time_steps[indices], device=device).view(-1, 1)
                  .expand(len(indices), per_call).contiguous().unbind(0))
        drawn, noisy = None, {}
        if not invert and noise is None:
            noisy = {i: table["noise_scale"][i] * temperature for i in indices
                     if table["noise_scale"][i] * temperature != 0.0}
            drawn = policy.predraw(list(noisy), list(noisy.values()), shape, dtype, device, step_fn)
        rows = None if drawn is None else dict(zip(noisy, drawn.unbind(0)))
        launches = bind_launches(step_fn, shape, dtype)
        # What every step of the call shares (guidance, noise keys, paint inputs), built once:
        # a step replaces only its coefficients, step key and noise.
        shared = StepArgs(0.0, 0.0, guidance, **policy.step_fields(), **paint)
        if invert:
            steps = [(i, StepArgs(table["inv_x_coef"][i], table["inv_eps_coef"][i], guidance), None)
                     for i in indices]
        else:
            steps = [self._step_args(shared, i, temperature, noise, rows, paint) for i in indices]
        records = tuple(StepPlan(i, table["time_steps"][i], t_batch, args,
                                 step_runner(step_fn, policy, args, dtype, device, launches, split, self.limit), split)
                        for (i, args, split), t_batch in zip(steps, t_rows))
        # Steps that draw from the call's seed (torch.randn noise is drawn per run instead):
        # the kernel's bound launches can be rekeyed to another call's; the torch path and
        # split steps carry the seed in their arguments.
        draws = [(not policy.fills(args) and (args.draws_noise or args.draws_orig_noise), split)
                 for _, args, split in steps]
        rekeyed = launches if any(d for d, _ in draws) else None
        reusable = not any(d and (launches is None or split is not None) for d, split in draws)
        if drawn is None:
            return StepTable(records, reusable, launches=rekeyed)
        return StepTable(records, reusable, drawn, tuple(noisy), tuple(noisy.values()), rekeyed)

    def _give_back(self, plan: Plan) -> None:
        """Keep a finished call's reusable steps for the next call with the same key (the newest few)."""
        if plan.reuse is not None:
            key, table = plan.reuse
            self._reused[key] = table
            while len(self._reused) > _REUSED_TABLES:
                try:
                    self._reused.pop(next(iter(self._reused)), None)
                except (RuntimeError, StopIteration):  # another thread changed it meanwhile
                    break

    def __getstate__(self) -> dict:
        """Pickled and copied samplers start without kept steps (they hold closures and buffers)."""
        return {**self.__dict__, "_reused": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"_reused": {}, **state})  # also samplers pickled before steps were kept

    def _step_args(self, shared: StepArgs, i: int, temperature: float, noise, drawn, paint: dict):
        """(i, StepArgs, SplitStep | None) of DDIM step i: `shared` with the step's own fields.

        noise: the call's explicit step noise (or None); drawn: {i: predrawn, scaled noise} or None.
        """
        table = self._coef_table
        noise_coef = table["noise_scale"][i] * temperature
        if drawn is not None and noise_coef != 0.0:
            noise, noise_coef = drawn[i], 1.0  # drawn already scaled (see KeyedNoise.predraw)
        own = {"noise_coef": noise_coef, "noise": noise, "step_key": i}
        if paint:
            own["orig_coef"], own["orig_noise_coef"] = self.coefs.q_sample_coefs(i, self.paint_blend)
        if self.limit is None:
            return i, shared._replace(x_coef=table["x_coef"][i], eps_coef=table["eps_coef"][i],
                                      x0_coefs=(table["x0_x_coef"][i], table["x0_eps_coef"][i]), **own), None
        return i, shared._replace(x_coef=table["sqrt_alpha_prev"][i], eps_coef=table["dir_coef"][i], guidance=None,
                                  **own), self._split_first(i, shared.guidance)

    def _split_first(self, index: int, guidance) -> SplitStep:
        """Launch 1 of a step that limits pred_x0: pred_x0 and pred_eps from (x, model output)."""
        c = self.coefs
        if c.prediction_type == "epsilon":
            p, q, d = (float(v) for v in c.x0_split[:, index])
            return SplitStep(StepArgs(p, q, guidance), d, True)
        first = StepArgs(float(c.pred_eps_coefs[0, index]), float(c.pred_eps_coefs[1, index]), guidance,
                         x0_coefs=(float(c.x0_x_coef[index]), float(c.x0_eps_coef[index])))
        return SplitStep(first, 1.0, False)

    @functools.cached_property
    def _coef_table(self) -> dict:
        """The coefficient arrays as lists of Python floats (time steps as ints), built once."""
        c = self.coefs
        names = ("x_coef", "eps_coef", "noise_scale", "x0_x_coef", "x0_eps_coef", "inv_x_coef", "inv_eps_coef",
                 "dir_coef", "time_steps")
        table = {name: getattr(c, name).tolist() for name in names}
        table["sqrt_alpha_prev"] = np.sqrt(c.alpha_prev).tolist()
        return table

    def _denoise(self, x: torch.Tensor, plan: Plan, callback) -> torch.Tensor:
        """The denoising loop of sample, paint and invert: model call, one fused step, callback.

        Without a callback the steps alternate between two output buffers (nothing outside
        sees them but the model, which gets each as its input x); with one, every step
        writes fresh tensors, so the callback may keep what it is given. Under guidance
        without a callback the buffers are batch-doubled: a step writes x_prev into both
        halves (in its one launch where the step is bound to the kernel, else by a copy
        into the second), and the model's next input is the whole buffer, so no step pays
        a torch.cat of [x; x] (only the first).

        Without a callback the loop runs under torch.inference_mode, which makes every
        small torch op on the host cheaper (about a third on a CPU); the buffers are made
        outside it, so the result is an ordinary tensor the caller may update in place.
        """
        if callback is None and plan.guide.scale is not None and len(plan.steps) > 1:
            return self._denoise_doubled(x, plan)
        return self._denoise_loop(x, plan, callback)

    def _denoise_loop(self, x: torch.Tensor, plan: Plan, callback) -> torch.Tensor:
        """_denoise with (B, *s) buffers, or fresh outputs per step with a callback (see there)."""
        want_x0 = callback is not None and plan.has_x0
        buffers = (torch.empty_like(x), torch.empty_like(x)) if callback is None else None
        call_model = plan.guide.call
        try:
            if callback is not None and not callable(callback):
                raise TypeError(f"callback must be callable (it gets a dict per step), got {type(callback).__name__}")
            # (inference_mode(False) would turn grad mode on inside sample's no_grad.)
            with torch.inference_mode() if callback is None else contextlib.nullcontext():
                for n, step in enumerate(plan.steps):
                    model_out = call_model(x, step.t_batch)
                    out = buffers[n & 1] if buffers is not None else torch.empty_like(x)
                    if model_out.data_ptr() == out.data_ptr():  # the model returned an earlier step's input
                        out = torch.empty_like(x)
                    pred_x0 = torch.empty_like(x) if want_x0 else None
                    x = step.run(x, model_out, out, pred_x0)
                    if callback is not None:
                        info = {"index": step.index, "t": step.t, "x": x}
                        if plan.has_x0:
                            info["pred_x0"] = pred_x0
                        callback(info)
        finally:
            self._give_back(plan)
        if x.is_inference() and not torch.is_inference_mode_enabled():
            x = x.clone()  # made inside the loop (the model-returned-its-input case): an ordinary copy
        return x

    def _denoise_doubled(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        """_denoise under guidance without a callback: batch-doubled ping-pong buffers (see there)."""
        batch = x.shape[0]
        pairs = tuple(x.new_empty((2 * batch,) + tuple(x.shape[1:])) for _ in range(2))
        halves = tuple((pair[:batch], pair[batch:]) for pair in pairs)
        spans = tuple((pair.data_ptr(), pair.data_ptr() + pair.numel() * pair.element_size()) for pair in pairs)
        result = torch.empty_like(x)  # the last step's output: not a view of a doubled buffer
        call_model, last = plan.guide.call_doubled, len(plan.steps) - 1
        # Steps bound to the kernel store x_prev in both halves in their one launch; the
        # others (torch and C paths, split steps) are followed by a copy into the second.
        twice = [getattr(step.run, "stores_twice", False) for step in plan.steps]
        try:
            with torch.inference_mode():
                x_in = torch.cat([x, x])
                for n, step in enumerate(plan.steps):
                    model_out = call_model(x_in, step.t_batch)
                    (low, high), (start, end) = halves[n & 1], spans[n & 1]
                    out = result if n == last else low
                    if start <= model_out.data_ptr() < end:  # the model returned the buffer this step writes
                        out = torch.empty_like(x)
                    if out is low and twice[n]:  # one launch writes both halves
                        x = step.run(x, model_out, out, None, True)
                    else:
                        x = step.run(x, model_out, out, None)
                        if out is low:
                            high.copy_(low)
                    if n != last:  # (the last step's out is never low)
                        x_in = pairs[n & 1] if out is low else torch.cat([x, x])
        finally:
            self._give_back(plan)
        if x.is_inference() and not torch.is_inference_mode_enabled():
            x = x.clone()
        return x

    @staticmethod
    def _step(x, model_out, plan: Plan, step: StepPlan, *, want_x0=True, want_eps=False):
        """One fused update; returns (x_prev, pred_x0 | None, guided model output | None).

        A split step (pred_x0 limited) always returns pred_x0: it computes it anyway.
        """
        out = torch.empty_like(x)
        if step.split is not None:
            x0, pred_eps, output = step.split.run(plan.step_fn, x, model_out, want_eps)
            plan.limit(x0)
            plan.step_fn(x0, pred_eps, out, plan.noise.fill(step.args, x0))
            return out, x0, output
        x0_out = torch.empty_like(x) if want_x0 else None
        eps_out = torch.empty_like(x) if want_eps else None
        plan.step_fn(x, model_out, out, plan.noise.fill(step.args, x), x0_out, eps_out)
        return out, x0_out, eps_out

    def _check_step_args(self, x, index, noise):
        x = _check_batched("x", x)
        index = check_int("index", index, 0, self.coefs.n_steps - 1)
        if noise is not None:
            noise = broadcast_batch("noise", noise, x)
        return x.contiguous(), index, noise

    def _call_seed(self, seed):
        """The Philox seed of a call: the call's, the sampler's, or one drawn from torch's generator."""
        if self.noise_source == "torch":
            return None
        if seed is not None:
            return check_int("seed", seed, 0, 2**63 - 1)
        if self.seed is not None:
            return self.seed
        return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_time_steps(t, x: torch.Tensor) -> None:
    """t as the model's (B,) time steps for x (B, *s): a tensor on x's device (values are not read)."""
    if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_complex():
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"t must be a (B,) tensor of time steps, got {got}")
    if tuple(t.shape) != (x.shape[0],):
        raise ValueError(f"t has shape {tuple(t.shape)}, expected ({x.shape[0]},): one time step per sample of x")
    if t.device != x.device:
        raise ValueError(f"t is on {t.device}, expected x's device {x.device}")


def _check_batched(name: str, x) -> torch.Tensor:
    check_tensor(name, x)
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension")
    return x
