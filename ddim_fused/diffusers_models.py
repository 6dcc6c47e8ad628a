"""Local diffusers UNets as sampler-protocol models, with the schedule diffusers would use.

A `--model` folder is either a pipeline saved with `save_pretrained` (`model_index.json`,
`unet/`, `scheduler/`) or a bare `UNet2DModel` / `UNet2DConditionModel` folder
(`config.json` + weights) used with a scheduler config file. Nothing is downloaded:
`from_pretrained` runs with local_files_only, weights load from safetensors (or
weights_only torch.load, diffusers' loader for .bin). The schedule is exactly
`DDIMScheduler.from_config(<scheduler config>)`'s: its float32 alphas_cumprod, timestep
spacing, steps_offset, set_alpha_to_one, prediction type and clip / thresholding options,
and diffusers' rule for the time step a step goes to (t - T // S).

Importing this module imports diffusers; `ddim_fused.models` imports it only for folders.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

try:
    from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.utils import logging as diffusers_logging
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("a diffusers --model folder needs Hugging Face diffusers: pip install 'ddim-fused[diffusers]'") \
        from exc

UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
SCHEDULER_FILE = "scheduler_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class DiffusersUNet:
    """A diffusers UNet in the sampler protocol: model(x, t, cond) -> its prediction.

    cond is None for unconditional models, (B,) long class labels for class-conditional
    `UNet2DModel`s (num_class_embeds) and (B, L, D) encoder hidden states for
    `UNet2DConditionModel`s. A learned-variance output (2C channels) is cut to its first C.

    Attributes:
        net: the UNet (eval mode, no gradients) on `device` in `dtype`.
        alpha_bar: (T,) float64, DDIMScheduler's alphas_cumprod for the scheduler config.
        n_steps: T.
        prediction_type: the scheduler config's.
        conditioning: "none", "class" or "tensor".
        n_classes: num_class_embeds of a class-conditional UNet2DModel, else None.
        cond_dim: last dimension --cond tensors must have (UNet2DConditionModel), else None.
    """

    def __init__(self, net: torch.nn.Module, alpha_bar: np.ndarray, prediction_type: str, device, dtype):
        with quiet_diffusers():  # its note on casting applies to fp16 loading, not to us
            self.net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.alpha_bar = alpha_bar
        self.n_steps = len(alpha_bar)
        self.prediction_type = prediction_type
        self.device, self.dtype = torch.device(device), dtype
        self.channels = int(net.config.in_channels)
        config = net.config
        self.n_classes = None
        self.cond_dim = None
        if isinstance(net, UNet2DConditionModel):
            self.conditioning = "tensor"
            dim = config.encoder_hid_dim if config.encoder_hid_dim is not None else config.cross_attention_dim
            self.cond_dim = dim if isinstance(dim, int) else None
        elif config.num_class_embeds is not None:
            self.conditioning, self.n_classes = "class", int(config.num_class_embeds)
        else:
            self.conditioning = "none"
        # UNet2DModel's up blocks join the down blocks' outputs, so every down-sampling must
        # halve the size exactly; UNet2DConditionModel resizes to fit, so any size runs.
        self.size_multiple = 2 ** (len(config.down_block_types) - 1) if isinstance(net, UNet2DModel) else 1

    def check_sample_shape(self, shape: tuple[int, ...]) -> None:
        """ValueError unless shape (C, H, W) fits the UNet: its in_channels, H and W multiples of size_multiple."""
        if len(shape) != 3:
            raise ValueError(f"sample_shape {shape} must be (channels, height, width) for a 2-D UNet")
        if shape[0] != self.channels:
            raise ValueError(f"sample_shape {shape} does not have the model's {self.channels} input channels")
        if shape[1] % self.size_multiple or shape[2] % self.size_multiple:
            raise ValueError(f"sample_shape {shape} does not fit the UNet: its down-sampling needs a height and "
                             f"width that are multiples of {self.size_multiple}")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The UNet's prediction for x (B, C, H, W) at time steps t (B,), in x's dtype."""
        inp = x.to(self.dtype)
        if self.conditioning == "tensor":
            out = self.net(inp, t, encoder_hidden_states=cond.to(self.dtype)).sample
        elif self.conditioning == "class":
            out = self.net(inp, t, class_labels=cond).sample
        else:
            out = self.net(inp, t).sample
        if out.shape[1] == 2 * self.channels:  # learned variance: DDIM uses the mean part
            out = out[:, :self.channels]
        return out.to(x.dtype)


def find_files(folder: Path, scheduler_config: Optional[Path]) -> tuple[Path, Path]:
    """(UNet folder, scheduler config file) of a --model folder; ValueError naming what is missing."""
    if (folder / "model_index.json").is_file():
        unet_dir = folder / "unet"
        if not (unet_dir / "config.json").is_file():
            raise ValueError(f"{str(folder)!r} is a diffusers pipeline folder without unet/config.json; only pipelines "
                             "with a `unet` component are supported")
        default_scheduler = folder / "scheduler" / SCHEDULER_FILE
    elif (folder / "config.json").is_file():
        unet_dir, default_scheduler = folder, None
    else:
        raise ValueError(f"{str(folder)!r} holds neither model_index.json (a diffusers pipeline) nor config.json "
                         "(a diffusers UNet)")
    scheduler_file = scheduler_config if scheduler_config is not None else default_scheduler
    if scheduler_file is None:
        raise ValueError(f"{str(folder)!r} is a bare UNet folder: give its schedule as scheduler_config, a diffusers "
                         "scheduler config file")
    if not scheduler_file.is_file():
        raise ValueError(f"scheduler config {str(scheduler_file)!r} is not a file")
    return unet_dir, scheduler_file


def read_json(path: Path) -> dict:
    """A JSON object from a file, or ValueError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {str(path)!r}: {str(exc)!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} does not hold a JSON object")
    return value


def ddim_scheduler(scheduler_file: Path) -> DDIMScheduler:
    """DDIMScheduler.from_config of a scheduler config file (of any diffusers scheduler class)."""
    config = read_json(scheduler_file)
    steps = config.get("num_train_timesteps", 1)
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or not steps >= 1:
        raise ValueError(f"{str(scheduler_file)!r} is not a scheduler config DDIM accepts: num_train_timesteps must "
                         f"be >= 1, got {steps!r}")
    with quiet_diffusers():  # other schedulers' keys (e.g. DDPM's variance_type) only warn
        try:
            scheduler = DDIMScheduler.from_config(config)
        except Exception as exc:  # noqa: BLE001 - a foreign config makes the constructor raise nearly anything
            raise ValueError(f"{str(scheduler_file)!r} is not a scheduler config DDIM accepts: "
                             f"{_first_line(exc)!r}") from None
    alpha_bar = scheduler.alphas_cumprod.to(torch.float64)
    if not (torch.isfinite(alpha_bar).all() and (alpha_bar > 0).all() and (alpha_bar <= 1).all()):
        raise ValueError(f"{str(scheduler_file)!r} is not a scheduler config DDIM accepts: its betas give "
                         "alphas_cumprod outside (0, 1]")
    return scheduler


def scheduler_options(scheduler: DDIMScheduler) -> tuple[str, dict]:
    """(timestep spacing, DDIMSampler keyword arguments) that reproduce `scheduler`'s sampling."""
    c = scheduler.config
    options = dict(alpha_bar=scheduler.alphas_cumprod.to(torch.float64).numpy().copy(),
                   steps_offset=int(c.steps_offset), set_alpha_to_one=bool(c.set_alpha_to_one), prev_timestep="ratio",
                   prediction_type=c.prediction_type, clip_sample=bool(c.clip_sample),
                   clip_sample_range=float(c.clip_sample_range), thresholding=bool(c.thresholding),
                   dynamic_thresholding_ratio=float(c.dynamic_thresholding_ratio),
                   sample_max_value=float(c.sample_max_value))
    return c.timestep_spacing, options


def load_unet(unet_dir: Path) -> torch.nn.Module:
    """The UNet of a folder (config.json + weights), loaded locally on the CPU in float32."""
    config = read_json(unet_dir / "config.json")
    name = config.get("_class_name")
    if name not in UNET_CLASSES:
        raise ValueError(f"{str(unet_dir / 'config.json')!r} describes a {name!r}; only "
                         f"{' and '.join(UNET_CLASSES)} are supported")
    if name == "UNet2DConditionModel" and config.get("addition_embed_type") is not None:
        raise ValueError(f"{str(unet_dir)!r} needs added conditioning ({config['addition_embed_type']!r}, e.g. SDXL), "
                         "which --cond cannot give")
    if config.get("class_embed_type") is not None:
        raise ValueError(f"{str(unet_dir)!r} uses class_embed_type={config['class_embed_type']!r}; only num_class_embeds "
                         "class conditioning is supported")
    if name == "UNet2DConditionModel" and config.get("num_class_embeds") is not None:
        raise ValueError(f"{str(unet_dir)!r} takes both class labels and encoder states; not supported")
    if not weight_files(unet_dir):
        raise ValueError(f"{str(unet_dir)!r} holds no weights (*.safetensors or *.bin)")
    with quiet_diffusers():
        try:
            # Only the format the folder holds: asked for safetensors that are not there,
            # diffusers logs an error even though it then loads the .bin file.
            safetensors = any(p.name.endswith(".safetensors") for p in weight_files(unet_dir))
            return UNET_CLASSES[name].from_pretrained(unet_dir, local_files_only=True, use_safetensors=safetensors)
        except Exception as exc:  # noqa: BLE001 - a damaged file makes the loaders raise nearly anything
            raise ValueError(f"cannot load the {name} in {str(unet_dir)!r}: {_first_line(exc)!r}") from None


def _first_line(exc: BaseException) -> str:
    """The first line of another library's error (theirs run over many), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def weight_files(unet_dir: Path) -> list[Path]:
    """The weight files of a model folder, sorted by name."""
    return sorted(p for p in unet_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def load_folder(folder, scheduler_config=None, *, device="cpu", dtype=torch.float32) -> tuple[DiffusersUNet, dict]:
    """Load a diffusers --model folder.

    Args:
        folder: pipeline folder (model_index.json, unet/, scheduler/) or model folder.
        scheduler_config: scheduler config file; required for a model folder, overrides a
            pipeline's scheduler/.
        device, dtype: where and in what precision the UNet runs.

    Returns:
        (model, info): the DiffusersUNet and a dict with unet_dir, scheduler_file (Paths),
        discretize (the timestep spacing), sampler_options (DDIMSampler keyword arguments,
        alpha_bar included), unet_config and scheduler_config (the files' JSON).

    Raises:
        ValueError: a missing or unusable file, named.
    """
    folder = Path(folder)
    unet_dir, scheduler_file = find_files(folder, None if scheduler_config is None else Path(scheduler_config))
    scheduler = ddim_scheduler(scheduler_file)
    discretize, options = scheduler_options(scheduler)
    net = load_unet(unet_dir)
    model = DiffusersUNet(net, options["alpha_bar"], options["prediction_type"], device, dtype)
    return model, {"unet_dir": unet_dir, "scheduler_file": scheduler_file, "discretize": discretize,
                   "sampler_options": options, "unet_config": read_json(unet_dir / "config.json"),
                   "scheduler_config": read_json(scheduler_file)}


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' info and warning logs off (its progress and config notes are not ours to print)."""
    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before)
