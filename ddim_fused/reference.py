"""The eager reference: labml.ai's DDIM sampler transcribed into plain PyTorch.

It is the parity oracle of the tests and the baseline of the benchmarks, so it keeps
labml's formulas term by term (pred_x0, dir_xt, sigma * noise) and its calls to
torch.randn, and shares nothing with the fused path but the time-step list and the
model adapter. Its arrays are float64; in a low-precision dtype the arithmetic runs
in that dtype, as eager code would.
"""
from __future__ import annotations


import numpy as np
import torch

from .model import model_device, resolve_model
from .schedules import ddim_timesteps


class ReferenceDDIMSampler:
    """Eager DDIM sampler with labml's API (see DDIMSampler for the arguments)."""

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
        paint_blend: str = "alpha",
    ):
        self.model, alpha_bar = resolve_model(model, alpha_bar)
        self.n_steps = len(alpha_bar)
        self.time_steps = ddim_timesteps(self.n_steps, n_steps, ddim_discretize, steps_offset)
        self.paint_blend = paint_blend
        alpha_bar = torch.from_numpy(alpha_bar)
        first = torch.ones(1, dtype=torch.float64) if set_alpha_to_one else alpha_bar[0:1]
        steps = torch.from_numpy(self.time_steps)
        self.ddim_alpha = alpha_bar[steps].clone()
        self.ddim_alpha_sqrt = torch.sqrt(self.ddim_alpha)
        self.ddim_alpha_prev = torch.cat([first, alpha_bar[steps[:-1]]])
        sigma_eta1 = ((1 - self.ddim_alpha_prev) / (1 - self.ddim_alpha) * (1 - self.ddim_alpha / self.ddim_alpha_prev)) ** 0.5
        if ddim_eta == "sigma_hat":
            self.ddim_sigma = sigma_eta1
            self.ddim_noise_sigma = (1 - self.ddim_alpha / self.ddim_alpha_prev) ** 0.5
        else:
            self.ddim_sigma = ddim_eta * sigma_eta1
            self.ddim_noise_sigma = self.ddim_sigma
        self.ddim_sqrt_one_minus_alpha = (1.0 - self.ddim_alpha) ** 0.5

    @torch.no_grad()
    def sample(self, shape, cond, repeat_noise=False, temperature=1.0, x_last=None,
               uncond_scale=1.0, uncond_cond=None, skip_steps=0, *, device=None, dtype=torch.float32,
               step_noise=None):
        """Sample from noise (or x_last), stepping from time_steps[-1 - skip_steps] down.

        step_noise: optional callable index -> (B or 1, *s) noise of that DDIM step, used
        instead of torch.randn (to feed the reference the fused sampler's keyed noise).
        """
        device = device or model_device(self.model) or torch.device("cpu")
        bs = shape[0]
        x = x_last if x_last is not None else torch.randn(shape, device=device).to(dtype)
        time_steps = np.flip(self.time_steps)[skip_steps:]
        for i, step in enumerate(time_steps):
            index = len(time_steps) - i - 1
            ts = x.new_full((bs,), int(step), dtype=torch.long)
            x, pred_x0, e_t = self.p_sample(x, cond, ts, step, index=index, repeat_noise=repeat_noise,
                                            temperature=temperature, uncond_scale=uncond_scale,
                                            uncond_cond=uncond_cond,
                                            noise=step_noise(index) if step_noise is not None else None)
        return x

    @torch.no_grad()
    def p_sample(self, x, c, t, step, index, *, repeat_noise=False, temperature=1.0,
                 uncond_scale=1.0, uncond_cond=None, noise=None):
        e_t = self.get_eps(x, t, c, uncond_scale=uncond_scale, uncond_cond=uncond_cond)
        x_prev, pred_x0 = self.get_x_prev_and_pred_x0(e_t, index, x, temperature=temperature,
                                                      repeat_noise=repeat_noise, noise=noise)
        return x_prev, pred_x0, e_t

    def get_eps(self, x, t, c, *, uncond_scale, uncond_cond):
        if uncond_cond is None or uncond_scale == 1.0:
            return self.model(x, t, c)
        x_in = torch.cat([x] * 2)
        t_in = torch.cat([t] * 2)
        c_in = torch.cat([uncond_cond, c])
        e_t_uncond, e_t_cond = self.model(x_in, t_in, c_in).chunk(2)
        return e_t_uncond + (e_t_cond - e_t_uncond) * uncond_scale

    def get_x_prev_and_pred_x0(self, e_t, index, x, *, temperature, repeat_noise, noise=None):
        alpha = self.ddim_alpha[index]
        alpha_prev = self.ddim_alpha_prev[index]
        sigma = self.ddim_sigma[index]
        noise_sigma = self.ddim_noise_sigma[index]
        sqrt_one_minus_alpha = self.ddim_sqrt_one_minus_alpha[index]
        pred_x0 = (x - sqrt_one_minus_alpha * e_t) / (alpha**0.5)
        dir_xt = (1.0 - alpha_prev - sigma**2).clamp(min=0).sqrt() * e_t
        if noise is not None:
            noise = noise.to(x.dtype)
        elif noise_sigma == 0.0:
            noise = 0.0
        elif repeat_noise:
            noise = torch.randn((1, *x.shape[1:]), device=x.device).to(x.dtype)
        else:
            noise = torch.randn(x.shape, device=x.device).to(x.dtype)
        noise = noise * temperature
        x_prev = (alpha_prev**0.5) * pred_x0 + dir_xt + noise_sigma * noise
        return x_prev, pred_x0

    def q_sample(self, x0, index, noise=None):
        if noise is None:
            noise = torch.randn_like(x0)
        return self.ddim_alpha_sqrt[index] * x0 + self.ddim_sqrt_one_minus_alpha[index] * noise

    @torch.no_grad()
    def paint(self, x, cond, t_start, *, orig=None, mask=None, orig_noise=None,
              uncond_scale=1.0, uncond_cond=None, step_noise=None):
        """Denoise x from step t_start, blending in `orig` where mask is 1 after each step.

        orig_noise: a tensor (the same noise every step), or a callable index -> tensor;
        step_noise: as in `sample`. Both replace torch.randn where given.
        """
        bs = x.shape[0]
        time_steps = np.flip(self.time_steps[:t_start])
        for i, step in enumerate(time_steps):
            index = len(time_steps) - i - 1
            ts = x.new_full((bs,), int(step), dtype=torch.long)
            x, _, _ = self.p_sample(x, cond, ts, step, index=index, uncond_scale=uncond_scale,
                                    uncond_cond=uncond_cond,
                                    noise=step_noise(index) if step_noise is not None else None)
            if orig is not None:
                noise = orig_noise(index) if callable(orig_noise) else orig_noise
                if self.paint_blend == "alpha":
                    orig_t = self.q_sample(orig, index, noise=noise)
                else:  # blend at the level x now has; the clean original after the last step
                    a = self.ddim_alpha_prev[index] if index > 0 else torch.ones((), dtype=torch.float64)
                    noise = noise if noise is not None else torch.randn_like(orig)
                    orig_t = a**0.5 * orig + (1 - a) ** 0.5 * noise
                x = orig_t * mask + x * (1 - mask)
        return x
