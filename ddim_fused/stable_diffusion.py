"""Saved Stable Diffusion pipelines as --model: the text encoder in front of the UNet, the VAE behind it.

A folder written by `StableDiffusionPipeline.save_pretrained` (model_index.json,
tokenizer/, text_encoder/, unet/, vae/, scheduler/) loads as three parts:
- the UNet with the scheduler's DDIM schedule (`ddim_fused.diffusers_models`), which
  the sampler runs on encoder hidden states, batch-doubled under guidance;
- `StableDiffusion.tokenize` / `encode`: prompts to CLIP hidden states (L, D) as
  diffusers' pipeline makes them: padded to the tokenizer's model_max_length (77),
  longer prompts truncated, no attention mask, the text encoder's last hidden state;
- `StableDiffusion.decode`: latents to images in [-1, 1] through the VAE, after
  dividing by vae.config.scaling_factor.
SD 1.x (epsilon) and SD 2.x (v_prediction, trailing spacing) differ only in their
scheduler config, which the schedule follows. Pipelines with two text encoders (SDXL)
are refused. Nothing is downloaded: every part loads with local_files_only.

Importing this module imports diffusers and transformers; `ddim_fused.models` imports it
only for pipeline folders with a text encoder.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

from .diffusers_models import DiffusersUNet, load_folder, quiet_diffusers, read_json

try:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("a Stable Diffusion --model folder needs diffusers and transformers: "
                      "pip install 'ddim-fused[sd]'") from exc

TEXT_PARTS = ("tokenizer", "text_encoder")


class StableDiffusion:
    """The text side (tokenizer, CLIP text encoder) and image side (VAE) of a pipeline.

    Attributes:
        max_tokens: L, the tokenizer's model_max_length (77 for CLIP).
        text_dim: D, the text encoder's hidden size (the UNet's cross_attention_dim).
        vae: the AutoencoderKL, or None when only latents are kept.
        scaling_factor: vae.config.scaling_factor (latents are decoded from latents / it).
        device, dtype: where and in what precision the text encoder and VAE run.
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, vae: Optional[torch.nn.Module], device, dtype):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
        with quiet_diffusers():  # its note on casting applies to fp16 loading, not to us
            self.vae = None if vae is None else vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.scaling_factor = None if vae is None else float(vae.config.scaling_factor)
        self.max_tokens = int(tokenizer.model_max_length)
        self.text_dim = int(text_encoder.config.hidden_size)
        self.device, self.dtype = torch.device(device), dtype

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """Token ids of prompts as diffusers' pipeline makes them, and which ones were truncated.

        Args:
            texts: n prompts.

        Returns:
            ids (n, L) int64, padded to L = max_tokens; truncated: n bools, True where
            the prompt had more than L tokens (its ids keep the start token, its first L - 2
            tokens and the end token).
        """
        ids = self.tokenizer(texts, padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt").input_ids
        with _quiet_transformers():  # its note on over-long sequences: the caller warns, naming the prompt
            lengths = [len(row) for row in self.tokenizer(texts, truncation=False).input_ids]
        return ids, [n > self.max_tokens for n in lengths]

    @torch.no_grad()
    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Encoder hidden states (n, L, D) in dtype on device for token ids (n, L)."""
        return self.text_encoder(ids.to(self.device))[0].to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float32, nominally in [-1, 1], from latents (B, 4, h, w)."""
        if self.vae is None:
            raise ValueError("this pipeline was loaded without its VAE (output_type latent): it cannot decode")
        z = latents.to(self.dtype) / self.scaling_factor
        return self.vae.decode(z).sample.float()


def load_pipeline(folder, scheduler_config=None, *, device="cpu", dtype=torch.float32,
                  output_type: str = "image") -> tuple[DiffusersUNet, dict, StableDiffusion]:
    """Load a saved StableDiffusionPipeline folder.

    Args:
        folder: the pipeline folder.
        scheduler_config: a scheduler config file overriding scheduler/.
        device, dtype: where and in what precision every part runs.
        output_type: "image" (the VAE is loaded) or "latent" (it is not needed).

    Returns:
        (unet model, info, parts): the DiffusersUNet and the info of
        `ddim_fused.diffusers_models.load_folder`, and the StableDiffusion parts.

    Raises:
        ValueError: a missing part (named), two text encoders (SDXL), an unusable file.
    """
    folder = Path(folder)
    if output_type not in ("image", "latent"):
        raise ValueError(f"output_type must be 'image' or 'latent', got {output_type!r}")
    index = read_json(folder / "model_index.json")
    if "text_encoder_2" in index or "tokenizer_2" in index:
        raise ValueError(f"{folder} holds a pipeline with two text encoders ({index.get('_class_name', 'SDXL')}), "
                         "which is not supported yet")
    for part in TEXT_PARTS:
        if not (folder / part).is_dir():
            raise ValueError(f"{folder} has no {part}/: a Stable Diffusion pipeline needs tokenizer/, text_encoder/, "
                             "unet/ and scheduler/")
    if output_type == "image" and not (folder / "vae").is_dir():
        raise ValueError(f"{folder} has no vae/: pass output_type latent to keep latents")
    model, info = load_folder(folder, scheduler_config, device=device, dtype=dtype)
    with _quiet_transformers():
        tokenizer = _load(CLIPTokenizer, folder / "tokenizer")
        text_encoder = _load(CLIPTextModel, folder / "text_encoder")
    with quiet_diffusers():
        vae = _load(AutoencoderKL, folder / "vae") if output_type == "image" else None
    parts = StableDiffusion(tokenizer, text_encoder, vae, device, dtype)
    if model.cond_dim is not None and model.cond_dim != parts.text_dim:
        raise ValueError(f"{folder}: the text encoder's hidden size {parts.text_dim} differs from the UNet's "
                         f"cross_attention_dim {model.cond_dim}")
    if vae is not None and int(vae.config.latent_channels) != model.channels:
        raise ValueError(f"{folder}: the VAE's {vae.config.latent_channels} latent channels differ from the UNet's "
                         f"{model.channels} input channels")
    return model, info, parts


def _load(cls, path: Path):
    try:
        return cls.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file makes the loaders raise nearly anything
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load the {cls.__name__} in {path}: {first}") from None


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' info and warning logs and its loading progress bar off (not ours to print)."""
    before, bar = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(before)
        if bar:
            transformers_logging.enable_progress_bar()
