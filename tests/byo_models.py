"""Tiny random diffusers models saved as --model folders, and diffusers' own DDIM loop over them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddim_fused import initial_noise
from ddim_fused.philox import keyed_normal_torch

try:
    import diffusers
except ImportError:  # the GPU machines run the suite without the [diffusers] extra
    diffusers = None

needs_diffusers = pytest.mark.skipif(diffusers is None, reason="needs diffusers (pip install 'ddim-fused[diffusers]')")

SIZE, CHANNELS, COND_LEN, COND_DIM = 8, 3, 5, 6


def tiny_unet(seed: int = 0, **config):
    """A random UNet2DModel for (3, 8, 8) samples: about 42k parameters."""
    torch.manual_seed(seed)
    config.setdefault("out_channels", CHANNELS)  # 2 * CHANNELS: a learned-variance UNet
    return diffusers.UNet2DModel(sample_size=SIZE, in_channels=CHANNELS, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, **config)


def tiny_cond_unet(seed: int = 0):
    """A random UNet2DConditionModel for (3, 8, 8) samples and (5, 6) encoder hidden states."""
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=COND_DIM, attention_head_dim=2)


def save_pipeline(folder: Path, unet, scheduler) -> Path:
    """A DDIMPipeline folder (model_index.json, unet/, scheduler/) as save_pretrained writes it."""
    diffusers.DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def save_scheduler_file(path: Path, scheduler) -> Path:
    path.write_text(json.dumps(dict(scheduler.config)))
    return path


def reference_samples(unet, scheduler, num: int, steps: int, seed: int, *, eta: float = 0.0, cond=None,
                      uncond=None, scale: float = 1.0) -> torch.Tensor:
    """diffusers' DDIMScheduler loop, one sample at a time, from ddim_fused.initial_noise(..., sample_offset=i).

    With eta > 0 the step noise is the keyed Philox noise the sampler draws for sample i
    at DDIM index S - 1 - k (passed as variance_noise). cond: (num or 1, L, D) rows.
    """
    scheduler.set_timesteps(steps)
    out = []
    for i in range(num):
        x = initial_noise((1, CHANNELS, SIZE, SIZE), seed, sample_offset=i)
        c = None if cond is None else cond[i if cond.shape[0] > 1 else 0][None]
        with torch.no_grad():
            for k, t in enumerate(scheduler.timesteps):
                if c is None:
                    pred = unet(x, t).sample
                elif uncond is None:
                    pred = unet(x, t, encoder_hidden_states=c).sample
                else:
                    both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond[None], c])).sample
                    pred_u, pred_c = both.chunk(2)
                    pred = pred_u + scale * (pred_c - pred_u)
                noise = None
                if eta > 0:
                    noise = keyed_normal_torch(1, x.numel(), seed, steps - 1 - k, "step", i).view(x.shape)
                x = scheduler.step(pred, t, x, eta=eta, variance_noise=noise).prev_sample
        out.append(x[0])
    return torch.stack(out)
