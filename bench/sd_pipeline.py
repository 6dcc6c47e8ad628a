"""Random-weight Stable Diffusion pipelines built from configs, saved as folders: no downloads.

- "sd15": SD 1.5's published architecture: UNet2DConditionModel with block_out_channels
  (320, 640, 1280, 1280), 2 layers per block, cross_attention_dim 768, 8 attention heads;
  a 12-layer, 768-wide CLIP text encoder; the SD VAE (128, 256, 512, 512); latents 4x64x64,
  images 512x512. About 1.07 B parameters.
- "tiny": the same layout a few thousand parameters wide: latents 4x8x8, images 16x16.

The tokenizer is a byte-level BPE vocabulary written here (every byte, alone and
word-final, a few merges, CLIP's start and end tokens), read by transformers'
CLIPTokenizer as CLIP's own files are; a random text encoder does not need CLIP's words.
The tests (tests/sd_models.py) and the benchmark (bench.sd) build their pipelines here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 77
MERGES = ("c a", "ca t</w>", "d o", "do g</w>", "a n", "an d</w>")

CONFIGS = {
    "tiny": {
        "text": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                     projection_dim=16, hidden_act="quick_gelu"),
        "unet": dict(sample_size=8, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2),
        "vae": dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    sample_size=16),
    },
    "sd15": {
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     projection_dim=768, hidden_act="quick_gelu"),
        "unet": dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                     norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                     attention_head_dim=8),
        "vae": dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    sample_size=512, scaling_factor=0.18215),
    },
}


def _byte_chars() -> list[str]:
    """The 256 characters byte-level BPE maps the bytes to (GPT-2's table)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(folder: Path) -> Path:
    """A CLIP tokenizer folder: vocab.json, merges.txt and tokenizer_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in (m.split(" ") for m in MERGES)] + [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": MAX_TOKENS}), encoding="utf-8")
    return folder


def components(tokenizer_dir: Path, config: str = "tiny", seed: int = 0) -> dict:
    """tokenizer, text_encoder, unet and vae of a pipeline of CONFIGS[config], with seeded random weights."""
    import diffusers  # noqa: PLC0415 - optional dependencies
    import transformers  # noqa: PLC0415

    spec = CONFIGS[config]
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec["text"])
    text_encoder = transformers.CLIPTextModel(text_config).eval()
    unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"]).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **spec["vae"]).eval()
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae}


def scheduler(version: int = 1):
    """SD 1.x's DDIM schedule (epsilon, leading spacing) or SD 2.x's (v_prediction, trailing)."""
    import diffusers  # noqa: PLC0415 - optional dependency

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    if version == 2:
        config.update(prediction_type="v_prediction", timestep_spacing="trailing")
    return diffusers.DDIMScheduler(**config)


def save_pipeline(folder: Path, parts: dict, ddim_scheduler, dtype=None) -> Path:
    """A StableDiffusionPipeline folder as save_pretrained writes it (no safety checker)."""
    import diffusers  # noqa: PLC0415 - optional dependency

    pipe = diffusers.StableDiffusionPipeline(**parts, scheduler=ddim_scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(folder)
    return Path(folder)
