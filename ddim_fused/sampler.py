"""DDIMSampler: labml's DDIM sampler API, one model call and one fused step per step."""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch

from .coefficients import ddim_coefficients
from .model import model_device, resolve_model
from .philox import keyed_normal_torch
from .schedules import ddim_timesteps
from .torch_step import torch_ddim_step
from .validation import FLOAT_DTYPES, broadcast_batch, check_float, check_int, check_shape, check_tensor

BACKENDS = ("auto", "triton", "torch")
NOISE_SOURCES = ("philox", "torch")
PAINT_BLENDS = ("seed", "prev")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PREDRAW_LIMIT = 1 << 22  # elements of noise (16 MB in fp32) drawn up front on the torch path


class DDIMSampler:
    """DDIM sampling (Song et al. 2020) with the per-step update fused into one kernel.

    Args:
        model: eps-model with `alpha_bar` (T,) called as model(x, t, cond) -> eps (labml's
            protocol), or any such callable together with `alpha_bar=`.
        n_steps: S, the number of DDIM steps.
        ddim_discretize: "uniform" | "quad" (labml, with its +1), "leading" | "trailing" |
            "linspace" (diffusers' timestep_spacing), or an increasing list of time steps.
        ddim_eta: eta >= 0, or "sigma_hat" (the DDIM paper's larger-variance sigma).
        alpha_bar: (T,) array/tensor or a schedule name; overrides model.alpha_bar.
        set_alpha_to_one: a_prev of the last step is 1 instead of alpha_bar[0].
        steps_offset: offset of "leading" time steps.
        backend: "auto" (Triton for CUDA tensors, torch ops otherwise), "triton" (CUDA,
            or CPU under TRITON_INTERPRET=1) or "torch".
        noise_source: "philox": noise keyed by (seed, global sample index, step), so a
            sample does not depend on the batch it is in; "torch": torch.randn drawn
            exactly as labml's sampler draws it.
        seed: default Philox seed; None draws one from torch's global generator per call.
        paint_blend: "seed" noises the original to the step's own alpha as labml does;
            "prev" to alpha_prev, the level of the new x (the clean original at the end).
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
        backend: str = "auto",
        noise_source: str = "philox",
        seed: Optional[int] = None,
        paint_blend: str = "seed",
    ):
        _check_choice("backend", backend, BACKENDS)
        _check_choice("noise_source", noise_source, NOISE_SOURCES)
        _check_choice("paint_blend", paint_blend, PAINT_BLENDS)
        if seed is not None:
            check_int("seed", seed, 0, 2**63 - 1)
        self.model, alpha_bar = resolve_model(model, alpha_bar)
        self.n_steps = len(alpha_bar)
        self.time_steps = ddim_timesteps(self.n_steps, n_steps, ddim_discretize, steps_offset)
        self.coefs = ddim_coefficients(alpha_bar, self.time_steps, ddim_eta, 1.0 if set_alpha_to_one else None)
        self.backend, self.noise_source, self.seed, self.paint_blend = backend, noise_source, seed, paint_blend
        # labml's attribute names, for code that reads them.
        self.ddim_alpha = torch.from_numpy(self.coefs.alpha).float()
        self.ddim_alpha_sqrt = self.ddim_alpha.sqrt()
        self.ddim_alpha_prev = torch.from_numpy(self.coefs.alpha_prev).float()
        self.ddim_sigma = torch.from_numpy(self.coefs.sigma).float()
        self.ddim_sqrt_one_minus_alpha = (1.0 - torch.from_numpy(self.coefs.alpha)).sqrt().float()

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

        Returns:
            x: (B, *s) the sample x_0 (the latent at alpha_prev of index 0).
        """
        shape = check_shape(shape)
        skip_steps = check_int("skip_steps", skip_steps, 0, self.coefs.n_steps - 1)
        if x_last is not None:
            check_tensor("x_last", x_last, shape=shape)
            device, dtype = x_last.device, x_last.dtype
        else:
            device = torch.device(device) if device is not None else (model_device(self.model) or torch.device("cpu"))
            dtype = dtype or torch.float32
        self._check_run(shape[0], device, dtype, temperature, uncond_scale, uncond_cond, cond, sample_offset)
        step_fn = self._step_fn(device)
        seed = self._call_seed(seed)

        # A strided x_last is copied once; it is never written to.
        x = x_last.contiguous() if x_last is not None else self._initial_noise(shape, device, dtype, seed, sample_offset)
        time_steps = np.flip(self.time_steps)[skip_steps:]
        step_noise = self._predrawn_noise(step_fn, shape, device, seed, sample_offset, repeat_noise,
                                          [len(time_steps) - i - 1 for i in range(len(time_steps))])
        for i, step in enumerate(time_steps):
            index = len(time_steps) - i - 1
            ts = x.new_full((shape[0],), int(step), dtype=torch.long)
            model_out, guidance = self._model_out(x, cond, ts, uncond_scale, uncond_cond)
            x, pred_x0, _ = self._step(step_fn, x, model_out, guidance, index, temperature=temperature,
                                       repeat_noise=repeat_noise, seed=seed, sample_offset=sample_offset,
                                       noise=None if step_noise is None else step_noise[i].view(shape),
                                       want_x0=callback is not None)
            if callback is not None:
                callback({"index": index, "t": int(step), "x": x, "pred_x0": pred_x0})
        return x

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
    ) -> torch.Tensor:
        """Denoise x from DDIM index t_start - 1 down, keeping `orig` where mask is 1.

        Args:
            x: (B, *s) latent at time_steps[t_start - 1] (e.g. q_sample of an image); not modified.
            cond, uncond_scale, uncond_cond: as in `sample`.
            t_start: number of DDIM steps to run, in [1, S].
            orig: (B or 1, *s) original (e.g. clean latent) to keep where mask is 1.
            mask: broadcastable to x with batch B or 1 (e.g. (B, 1, H, W)); float in [0, 1]
                or bool. After each step x = orig_t * mask + x * (1 - mask).
            orig_noise: (B or 1, *s) fixed noise for orig_t; else fresh noise each step.

        Returns:
            x: (B, *s).
        """
        check_tensor("x", x)
        if x.dim() < 1:
            raise ValueError("x must have a batch dimension")
        x = x.contiguous()
        t_start = check_int("t_start", t_start, 1, self.coefs.n_steps)
        if (orig is None) != (mask is None):
            raise ValueError("paint needs orig and mask together (got only one of them)")
        self._check_run(x.shape[0], x.device, x.dtype, 1.0, uncond_scale, uncond_cond, cond, sample_offset)
        paint = None
        if orig is not None:
            from .kernels import mask_layout  # noqa: PLC0415 - pure host code, no GPU needed

            orig = broadcast_batch("orig", orig, x)
            if orig_noise is not None:
                orig_noise = broadcast_batch("orig_noise", orig_noise, x)
            paint = (_check_mask(mask, x, mask_layout), orig, orig_noise)
        elif orig_noise is not None:
            raise ValueError("orig_noise given without orig and mask")
        step_fn = self._step_fn(x.device)
        seed = self._call_seed(seed)

        time_steps = np.flip(self.time_steps[:t_start])
        for i, step in enumerate(time_steps):
            index = len(time_steps) - i - 1
            ts = x.new_full((x.shape[0],), int(step), dtype=torch.long)
            model_out, guidance = self._model_out(x, cond, ts, uncond_scale, uncond_cond)
            x, pred_x0, _ = self._step(step_fn, x, model_out, guidance, index, temperature=1.0, repeat_noise=False,
                                       seed=seed, sample_offset=sample_offset, want_x0=callback is not None,
                                       paint=paint)
            if callback is not None:
                callback({"index": index, "t": int(step), "x": x, "pred_x0": pred_x0})
        return x

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
        check_tensor("x0", x0)
        if x0.dim() < 1:
            raise ValueError("x0 must have a batch dimension")
        self._check_run(x0.shape[0], x0.device, x0.dtype, 1.0, uncond_scale, uncond_cond, cond, 0)
        step_fn = self._step_fn(x0.device)
        c = self.coefs
        x = x0.contiguous()
        for index, step in enumerate(self.time_steps):
            ts = x.new_full((x.shape[0],), int(step), dtype=torch.long)
            model_out, guidance = self._model_out(x, cond, ts, uncond_scale, uncond_cond)
            x = step_fn(x, model_out, torch.empty_like(x), x_coef=float(c.inv_x_coef[index]),
                        eps_coef=float(c.inv_eps_coef[index]), guidance=guidance)
            if callback is not None:
                callback({"index": index, "t": int(step), "x": x})
        return x

    @torch.no_grad()
    def p_sample(self, x, c, t, step, index, *, repeat_noise=False, temperature=1.0, uncond_scale=1.0,
                 uncond_cond=None, noise=None, seed=None, sample_offset=0):
        """One DDIM step at DDIM index `index` (time step `step`, t its (B,) tensor).

        Args:
            x: (B, *s); c: conditioning; t: (B,) long time steps; index: in [0, S).
            noise: (B or 1, *s) explicit step noise (else drawn per noise_source).

        Returns:
            (x_prev, pred_x0, e_t), each (B, *s); e_t is the guided eps.
        """
        x, index, noise = self._check_step_args(x, index, noise)
        self._check_run(x.shape[0], x.device, x.dtype, temperature, uncond_scale, uncond_cond, c, sample_offset)
        step_fn = self._step_fn(x.device)
        model_out, guidance = self._model_out(x, c, t, uncond_scale, uncond_cond)
        return self._step(step_fn, x, model_out, guidance, index, temperature=temperature, repeat_noise=repeat_noise,
                          noise=noise, seed=self._call_seed(seed), sample_offset=sample_offset,
                          want_x0=True, want_eps=True)

    @torch.no_grad()
    def get_x_prev_and_pred_x0(self, e_t, index, x, *, temperature=1.0, repeat_noise=False, noise=None,
                               seed=None, sample_offset=0):
        """The update alone: (x_prev, pred_x0) from eps e_t (B, *s) at DDIM index `index`."""
        x, index, noise = self._check_step_args(x, index, noise)
        self._check_run(x.shape[0], x.device, x.dtype, temperature, 1.0, None, None, sample_offset)
        e_t = self._check_model_out(e_t, x, 1)
        x_prev, pred_x0, _ = self._step(self._step_fn(x.device), x, e_t, None, index, temperature=temperature,
                                        repeat_noise=repeat_noise, noise=noise, seed=self._call_seed(seed),
                                        sample_offset=sample_offset, want_x0=True)
        return x_prev, pred_x0

    @torch.no_grad()
    def q_sample(self, x0, index, noise=None, *, seed=None, sample_offset=0):
        """Noise x0 (B, *s) to the level of DDIM index `index`: sqrt(a) x0 + sqrt(1 - a) noise.

        Returns:
            (B, *s) in x0's dtype.
        """
        check_tensor("x0", x0)
        index = check_int("index", index, 0, self.coefs.n_steps - 1)
        if noise is None:
            if self.noise_source == "torch":
                noise = torch.randn_like(x0)
            else:
                noise = keyed_normal_torch(x0.shape[0], x0[0].numel(), self._call_seed(seed), index, "orig",
                                           sample_offset, device=x0.device).view(x0.shape)
        else:
            noise = broadcast_batch("noise", noise, x0)
        sqrt_a, sqrt_one_minus_a = self.coefs.q_sample_coefs(index)
        return torch.add(x0 * sqrt_a, noise.to(x0.dtype), alpha=sqrt_one_minus_a)

    def get_eps(self, x, t, c, *, uncond_scale=1.0, uncond_cond=None):
        """The model's eps for x (B, *s), guided when uncond_scale != 1 (labml's get_eps)."""
        model_out, guidance = self._model_out(x, c, t, uncond_scale, uncond_cond)
        if guidance is None:
            return model_out
        uncond, conditional = model_out.chunk(2)
        return uncond + (conditional - uncond) * guidance

    # ------------------------------------------------------------------ internals
    def _model_out(self, x, cond, t, uncond_scale, uncond_cond):
        """One model call; batch-doubled [uncond; cond] under guidance (not combined here)."""
        if uncond_cond is None or uncond_scale == 1.0:
            return self._check_model_out(self.model(x, t, cond), x, 1), None
        x_in = torch.cat([x, x])
        t_in = torch.cat([t, t])
        c_in = torch.cat([uncond_cond, cond])
        return self._check_model_out(self.model(x_in, t_in, c_in), x, 2), float(uncond_scale)

    @staticmethod
    def _check_model_out(out, x, factor):
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model returned {type(out).__name__}, expected a tensor of eps")
        want = (factor * x.shape[0],) + tuple(x.shape[1:])
        if tuple(out.shape) != want:
            raise ValueError(f"the model returned eps of shape {tuple(out.shape)}, expected {want}")
        if out.device != x.device or out.dtype not in FLOAT_DTYPES:
            raise ValueError(f"the model returned a {out.dtype} tensor on {out.device}; expected a float tensor on {x.device}")
        # A strided model output (e.g. a transposed view) is copied once per step here.
        return out.contiguous()

    def _step(self, step_fn, x, model_out, guidance, index, *, temperature, repeat_noise, seed, sample_offset,
              noise=None, want_x0=False, want_eps=False, paint=None):
        """Run the fused update at DDIM index `index`; returns (x_prev, pred_x0 | None, eps | None)."""
        c = self.coefs
        noise_scale = float(c.noise_scale[index])
        if noise is None and self.noise_source == "torch" and noise_scale != 0.0:
            noise = torch.randn((1, *x.shape[1:]) if repeat_noise else x.shape, device=x.device)
        out = torch.empty_like(x)
        x0_out = torch.empty_like(x) if want_x0 else None
        eps_out = torch.empty_like(x) if want_eps else None
        paint_args = {}
        if paint is not None:
            layout, orig, orig_noise = paint
            level = "alpha" if self.paint_blend == "seed" else "alpha_prev"
            orig_coef, orig_noise_coef = c.q_sample_coefs(index, level)
            if orig_noise is None and self.noise_source == "torch":
                orig_noise = torch.randn_like(orig)
            paint_args = dict(mask=layout, orig=orig, orig_coef=orig_coef, orig_noise_coef=orig_noise_coef,
                              orig_noise=orig_noise)
        step_fn(
            x, model_out, out, x_coef=float(c.x_coef[index]), eps_coef=float(c.eps_coef[index]), guidance=guidance,
            noise_coef=noise_scale * temperature, noise=noise, seed=seed, step_key=index,
            sample_offset=sample_offset, repeat_noise=repeat_noise,
            x0_coefs=(float(c.x0_x_coef[index]), float(c.x0_eps_coef[index])), x0_out=x0_out, eps_out=eps_out,
            **paint_args,
        )
        return out, x0_out, eps_out

    def _predrawn_noise(self, step_fn, shape, device, seed, sample_offset, repeat, indices):
        """(K, B, N) keyed noise of every step of a torch-path loop, drawn in one call; or None.

        Per step, the keyed stream costs about 130 small integer-tensor ops, which dominates
        the step for small latents; drawn for all steps at once it costs that once. Only
        for loops whose noise is small (_PREDRAW_LIMIT elements); the values are the same.
        """
        numel = int(np.prod(shape[1:]))
        if step_fn is not torch_ddim_step or self.noise_source != "philox":
            return None
        if len(indices) * shape[0] * numel > _PREDRAW_LIMIT or not np.any(self.coefs.noise_scale[indices]):
            return None
        return keyed_normal_torch(shape[0], numel, seed, indices, "step", sample_offset, repeat=repeat, device=device)

    def _initial_noise(self, shape, device, dtype, seed, sample_offset):
        if self.noise_source == "torch":
            return torch.randn(shape, device=device).to(dtype)
        if device.type == "cuda":
            from .kernels import keyed_normal  # noqa: PLC0415

            return keyed_normal(shape, seed, 0, "initial", sample_offset, device=device, dtype=dtype)
        n = int(np.prod(shape[1:]))
        return keyed_normal_torch(shape[0], n, seed, 0, "initial", sample_offset, device=device).view(shape).to(dtype)

    def _step_fn(self, device: torch.device):
        use_triton = self.backend == "triton" or (self.backend == "auto" and device.type == "cuda")
        if not use_triton:
            return torch_ddim_step
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}), or TRITON_INTERPRET=1 set before "
                "importing ddim_fused; use backend='torch' on CPU"
            )
        from .kernels import launch_ddim_step  # noqa: PLC0415 - imports triton only when used

        return launch_ddim_step

    def _check_run(self, batch, device, dtype, temperature, uncond_scale, uncond_cond, cond, sample_offset):
        check_float("temperature", temperature, low=0.0)
        check_float("uncond_scale", uncond_scale)
        check_int("sample_offset", sample_offset, 0, 2**32 - batch)
        uses_triton = self.backend == "triton" or (self.backend == "auto" and torch.device(device).type == "cuda")
        allowed = _KERNEL_DTYPES if uses_triton else FLOAT_DTYPES
        if dtype not in allowed:
            raise TypeError(f"dtype {dtype} is not supported by the {'triton' if uses_triton else 'torch'} backend; "
                            f"expected one of {', '.join(str(d) for d in allowed)}")
        if uncond_scale != 1.0 and uncond_cond is None:
            raise ValueError(f"uncond_scale={uncond_scale} needs uncond_cond (the unconditional conditioning)")
        if uncond_cond is not None and uncond_scale != 1.0:
            for name, c in (("cond", cond), ("uncond_cond", uncond_cond)):
                if not isinstance(c, torch.Tensor) or c.dim() < 1 or c.shape[0] != batch:
                    got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                    raise ValueError(f"guidance needs {name} as a tensor with batch {batch} first, got {got}")
            if cond.shape[1:] != uncond_cond.shape[1:]:
                raise ValueError(f"cond {tuple(cond.shape)} and uncond_cond {tuple(uncond_cond.shape)} must match")

    def _check_step_args(self, x, index, noise):
        check_tensor("x", x)
        index = check_int("index", index, 0, self.coefs.n_steps - 1)
        if noise is not None:
            noise = broadcast_batch("noise", noise, x)
        return x.contiguous(), index, noise

    def _call_seed(self, seed):
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


def _check_mask(mask, x, mask_layout):
    check_tensor("mask", mask, device=x.device, dtypes=FLOAT_DTYPES + (torch.bool,))
    return mask_layout(mask.contiguous(), tuple(x.shape))
