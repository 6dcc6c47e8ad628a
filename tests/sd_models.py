"""Tiny random Stable Diffusion pipelines saved as --model folders, and diffusers' own pipeline over them.

Nothing is downloaded: the CLIP tokenizer is a byte-level BPE vocabulary written here
(every byte, alone and word-final, plus a few merges), the text encoder, UNet and VAE
are random and a few thousand parameters each. Latents are (4, 8, 8), images (3, 16, 16).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddim_fused import initial_noise
from ddim_fused.philox import keyed_normal_torch

try:
    import diffusers
    import transformers
except ImportError:  # the GPU machines may run the suite without the [sd] extra
    diffusers = transformers = None

needs_sd = pytest.mark.skipif(diffusers is None or transformers is None,
                              reason="needs diffusers and transformers (pip install 'ddim-fused[sd]')")

LATENT, IMAGE, TEXT_DIM, MAX_TOKENS = 8, 16, 16, 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MERGES = ("c a", "ca t</w>", "d o", "do g</w>", "a n", "an d</w>")


def _byte_chars() -> list[str]:
    """The 256 characters byte-level BPE maps the bytes to (GPT-2's table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(folder: Path) -> Path:
    """A CLIP tokenizer folder: vocab.json, merges.txt and the tokenizer's configs."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    tokens += [a + b for a, b in (m.split(" ") for m in MERGES)]
    tokens += [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": MAX_TOKENS}), encoding="utf-8")
    return folder


def tiny_components(tokenizer_dir: Path, seed: int = 0) -> dict:
    """tokenizer, text_encoder, unet and vae of a tiny SD-like pipeline (random weights)."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    text_encoder = transformers.CLIPTextModel(text_config).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=TEXT_DIM, attention_head_dim=2).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=IMAGE).eval()
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae}


def tiny_scheduler(version: int):
    """SD 1.x's DDIM schedule (epsilon, leading) or SD 2.x's (v_prediction, trailing)."""
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    if version == 2:
        config.update(prediction_type="v_prediction", timestep_spacing="trailing")
    return diffusers.DDIMScheduler(**config)


def save_sd_pipeline(folder: Path, components: dict, scheduler) -> Path:
    """A StableDiffusionPipeline folder as save_pretrained writes it (no safety checker)."""
    pipe = diffusers.StableDiffusionPipeline(**components, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


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
