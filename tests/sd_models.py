"""Tiny random Stable Diffusion pipelines saved as --model folders, and diffusers' own pipeline over them.

Nothing is downloaded: bench.sd_pipeline writes the tokenizer and builds random parts
a few thousand parameters each. Latents are (4, 8, 8), images (3, 16, 16).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import sd_pipeline
from bench.sd_pipeline import scheduler as tiny_scheduler  # noqa: F401 - the tests' name for it
from bench.sd_pipeline import write_tokenizer  # noqa: F401 - part of this module's API
from ddim_fused import initial_noise
from ddim_fused.philox import keyed_normal_torch

try:
    import diffusers
    import transformers
except ImportError:  # the GPU machines may run the suite without the [sd] extra
    diffusers = transformers = None

needs_sd = pytest.mark.skipif(diffusers is None or transformers is None,
                              reason="needs diffusers and transformers (pip install 'ddim-fused[sd]')")

LATENT, IMAGE = 8, 16  # the tiny configuration's latent and image sizes


def tiny_components(tokenizer_dir: Path, seed: int = 0) -> dict:
    """tokenizer, text_encoder, unet and vae of the tiny pipeline (random weights)."""
    return sd_pipeline.components(tokenizer_dir, "tiny", seed)


def save_sd_pipeline(folder: Path, components: dict, scheduler) -> Path:
    """A StableDiffusionPipeline folder as save_pretrained writes it (no safety checker)."""
    return sd_pipeline.save_pipeline(folder, components, scheduler)


def reference_pipeline(folder: Path):
    """diffusers' StableDiffusionPipeline loaded from the folder with a DDIMScheduler."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_sample(pipe, prompt: str, index: int, *, seed: int, steps: int, guidance: float, eta: float = 0.0,
                     negative_prompt=None, output_type: str = "np"):
    """diffusers' result for sample `index`: from initial_noise(..., sample_offset=index), and at
    eta > 0 with the keyed step noise the sampler draws for it (at DDIM index S - 1 - k).

    Returns (H, W, 3) floats in [0, 1] (output_type "np") or the (4, h, w) latent ("latent").
    """
    latents = initial_noise((1, 4, LATENT, LATENT), seed, sample_offset=index)
    scheduler = pipe.scheduler
    original_step, calls = scheduler.step, []

    def step(model_output, timestep, sample, eta=0.0, **kwargs):
        k = len(calls)
        calls.append(k)
        if eta > 0:
            noise = keyed_normal_torch(1, sample.numel(), seed, steps - 1 - k, "step", index).view(sample.shape)
            kwargs["variance_noise"] = noise
            kwargs.pop("generator", None)
        return original_step(model_output, timestep, sample, eta=eta, **kwargs)

    scheduler.step = step
    try:
        out = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                   eta=eta, latents=latents, output_type=output_type)
    finally:
        del scheduler.step
    return out.images[0]
