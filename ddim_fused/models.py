"""The models that the CLI and bulk generation run, loaded from a `--model` source.

Sources (`load_model_source`):
- "digits": the embedded 8x8 digits model (the default).
- a local folder: a diffusers pipeline saved with `save_pretrained` (model_index.json,
  unet/, scheduler/), or a `UNet2DModel` / `UNet2DConditionModel` folder together with a
  scheduler config file. Needs the [diffusers] extra; nothing is downloaded.
- "package.module:callable": a factory (called with `device=` and `dtype=` if it takes
  them) returning an object that follows the sampler protocol: `model(x, t, cond)`,
  `alpha_bar` (T,) or `betas` (T,), and optionally `sample_shape` (or `image_shape`),
  `prediction_type`, `n_classes` with `cond(labels)` / `null_cond(batch)` for classes.

Every source ends as a `LoadedModel`: the protocol model plus what a command needs to
drive it (sample shape, schedule options, conditioning kind, identity for manifests).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .digits import load_digits_model
from .digits.pretrained import MODEL_FILE
from .model import resolve_model
from .validation import MAX_NUMEL

DIGITS = "digits"
CONDITIONING_KINDS = ("class", "tensor", "none", "prompt")
OUTPUT_TYPES = ("image", "latent")
# model_index.json entries that mark a pipeline with a text encoder (Stable Diffusion and kin).
_TEXT_PARTS = ("tokenizer", "text_encoder", "text_encoder_2")
_CALLABLE = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


@dataclass
class LoadedModel:
    """A model and what it takes to sample from it.

    Attributes:
        model: follows the sampler protocol (model(x, t, cond), alpha_bar or betas).
        sample_shape: shape of one sample (C, H, W for images), without the batch.
        discretize: default time-step spacing ("uniform" for labml-style models, the
            scheduler's timestep_spacing for diffusers models).
        sampler_options: DDIMSampler keyword arguments that reproduce the model's schedule
            (prediction_type, steps_offset, set_alpha_to_one, clip_sample, alpha_bar, ...).
        identity: JSON-able description (source, path, config and weights sha256).
        conditioning: "class" (class labels), "tensor" (a cond tensor, e.g. encoder hidden
            states), "prompt" (text, through `pipeline`'s text encoder) or "none".
        n_classes: number of classes of a class model (None: not known).
        to_cond: class labels (list of ints) -> the model's cond (class models).
        null_cond: batch size -> the unconditional cond, for guidance (None: none).
        cond_required: a "tensor" model that cannot run without cond.
        cond_dim: the last dimension a cond tensor must have (None: not checked).
        cond_rank: dimensions of one sample's cond (2 for encoder states (L, D)), so a cond
            of that rank is shared by all samples; None: the first dimension is always the batch.
        device, dtype: where and in what precision the model runs.
        pipeline: the text encoder and VAE of a Stable Diffusion pipeline
            (`ddim_fused.stable_diffusion.StableDiffusion`), else None.
    """

    model: object
    sample_shape: tuple[int, ...]
    discretize: str
    sampler_options: dict
    identity: dict
    conditioning: str
    n_classes: Optional[int] = None
    to_cond: Optional[Callable] = None
    null_cond: Optional[Callable] = None
    cond_required: bool = False
    cond_dim: Optional[int] = None
    cond_rank: Optional[int] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    pipeline: Optional[object] = None

    @property
    def decodes(self) -> bool:
        """Whether samples are latents that `pipeline.decode` turns into images."""
        return self.pipeline is not None and self.pipeline.vae is not None

    @property
    def is_digits(self) -> bool:
        return self.identity.get("name") == DIGITS

    @property
    def prediction_type(self) -> str:
        return self.sampler_options.get("prediction_type", "epsilon")

    @classmethod
    def from_protocol(cls, model, identity: dict, *, conditioning: Optional[str] = None, sample_shape=None,
                      device=None, dtype=torch.float32) -> "LoadedModel":
        """Wrap a sampler-protocol object (see the module docstring) without loading anything.

        Args:
            model: the object.
            identity: its JSON-able identity.
            conditioning: force a kind; default "class" if it has `n_classes`, else "tensor"
                (cond, if any, is passed through).
            sample_shape: overrides model.sample_shape / model.image_shape.
            device, dtype: where it runs (default: its `device` attribute, else cpu).
        """
        _, alpha_bar = resolve_model(model, allow_zero_snr=True)  # checks callable + schedule
        shape = sample_shape or getattr(model, "sample_shape", None) or getattr(model, "image_shape", None)
        if shape is None:
            raise ValueError("model.sample_shape (or model.image_shape) is missing: give sample_shape")
        n_classes = getattr(model, "n_classes", None)
        if n_classes is not None and (isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral)
                                      or n_classes < 1):
            raise ValueError(f"model.n_classes must be an int >= 1 (or absent), got {n_classes!r}")
        kind = conditioning or ("class" if n_classes is not None else "tensor")
        if kind not in CONDITIONING_KINDS:
            raise ValueError(f"conditioning must be one of {CONDITIONING_KINDS}, got {kind!r}")
        device = torch.device(device if device is not None else getattr(model, "device", "cpu"))
        to_cond = getattr(model, "cond", None)
        if kind == "class" and not callable(to_cond):
            to_cond = _labels_tensor(device)
        null_cond = getattr(model, "null_cond", None)
        options = {}
        if getattr(model, "prediction_type", None) is not None:
            options["prediction_type"] = model.prediction_type
        return cls(model, _shape(shape), getattr(model, "timestep_spacing", "uniform"), options, identity, kind,
                   n_classes=None if n_classes is None else int(n_classes),
                   to_cond=to_cond if kind == "class" else None,
                   null_cond=null_cond if callable(null_cond) else None, device=device, dtype=dtype)


def source_kind(source: str) -> str:
    """"digits", "folder" or "callable" for a --model value; ValueError if it is none of them."""
    if source == DIGITS:
        return DIGITS
    if Path(source).is_dir():
        return "folder"
    if _CALLABLE.fullmatch(source):
        return "callable"
    if Path(source).exists():
        raise ValueError(f"source {source!r} is a file; expected a diffusers folder, 'digits' or "
                         "package.module:callable")
    raise ValueError(f"source {source!r} is neither 'digits', an existing folder, nor package.module:callable")


def load_model_source(source: str = DIGITS, *, device="cpu", dtype=torch.float32, weights=None,
                      scheduler_config=None, sample_shape=None, output_type=None) -> LoadedModel:
    """Load a --model source (see the module docstring) on device in dtype.

    Args:
        source: "digits", a folder, or "package.module:callable".
        device, dtype: where and in what precision the network runs.
        weights: digits weights file (None: the shipped one); digits only.
        scheduler_config: a diffusers scheduler config file; folders only.
        sample_shape: overrides the shape the model's config gives (C, H, W, ...).
        output_type: Stable Diffusion pipelines only: "image" (the default: samples are
            decoded by the VAE) or "latent" (the VAE is not loaded).

    Returns:
        LoadedModel.

    Raises:
        ValueError: a bad source or file, named. ImportError: a folder without diffusers.
    """
    kind = source_kind(source)
    device = torch.device(device)
    if weights is not None and kind != DIGITS:
        raise ValueError("weights applies only to the 'digits' source")
    if scheduler_config is not None and kind != "folder":
        raise ValueError("scheduler_config applies only to diffusers folders")
    if output_type is not None and output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if output_type is not None and not (kind == "folder" and _is_text_pipeline(Path(source))):
        raise ValueError("output_type applies to Stable Diffusion pipeline folders (with a text encoder and a VAE)")
    if kind == DIGITS:
        model = load_digits_model(device=device, dtype=dtype, path=weights)
        identity = {"name": DIGITS, "weights_sha256": file_sha256(weights or MODEL_FILE)}
        loaded = LoadedModel.from_protocol(model, identity, conditioning="class", device=device, dtype=dtype)
        if sample_shape is not None and _shape(sample_shape) != loaded.sample_shape:
            raise ValueError(f"digits samples have shape {loaded.sample_shape}, not {tuple(sample_shape)}")
        return loaded
    if kind == "folder":
        return _load_folder(Path(source), scheduler_config, device, dtype, sample_shape, output_type or "image")
    return _load_callable(source, device, dtype, sample_shape)


def _is_text_pipeline(folder: Path) -> bool:
    """Whether a folder's model_index.json names a text encoder (read without diffusers)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # no pipeline, or a damaged index the folder loader reports
    return isinstance(index, dict) and any(part in index for part in _TEXT_PARTS)


def _load_folder(folder: Path, scheduler_config, device, dtype, sample_shape, output_type: str) -> LoadedModel:
    # diffusers (and transformers, for text pipelines) are optional extras, imported only
    # for folders: digits and callables run without them.
    text = _is_text_pipeline(folder)
    try:
        diffusers_models = importlib.import_module("ddim_fused.diffusers_models")
        stable_diffusion = importlib.import_module("ddim_fused.stable_diffusion") if text else None
    except ImportError as exc:
        needs, extra = ("diffusers and transformers", "sd") if text else ("Hugging Face diffusers", "diffusers")
        raise ImportError(f"model folder {str(folder)!r} needs {needs}: pip install 'ddim-fused[{extra}]'") from exc
    pipeline = None
    if text:
        model, info, pipeline = stable_diffusion.load_pipeline(folder, scheduler_config, device=device, dtype=dtype,
                                                               output_type=output_type)
    else:
        model, info = diffusers_models.load_folder(folder, scheduler_config, device=device, dtype=dtype)
    config = info["unet_config"]
    if sample_shape is None:
        size = config.get("sample_size")
        if size is None:
            raise ValueError(f"{info['unet_dir']}/config.json has no sample_size: give sample_shape")
        hw = (size, size) if isinstance(size, int) else tuple(size)
        sample_shape = (config["in_channels"],) + tuple(hw)
    sample_shape = _shape(sample_shape)
    model.check_sample_shape(sample_shape)
    options = dict(info["sampler_options"])
    weights = diffusers_models.weight_files(info["unet_dir"])
    identity = {
        "source": "diffusers",
        "path": str(folder.resolve()),
        "class": config.get("_class_name"),
        "config_sha256": _json_sha256({"unet": config, "scheduler": info["scheduler_config"]}),
        "weights_sha256": _files_sha256(weights),
        "weights": [p.name for p in weights],
    }
    if scheduler_config is not None:
        identity["scheduler_config"] = str(Path(scheduler_config).resolve())
    if pipeline is not None:
        identity.update(_pipeline_identity(folder, output_type))
        return LoadedModel(model, sample_shape, info["discretize"], options, identity, "prompt",
                           cond_dim=model.cond_dim, device=device, dtype=dtype, pipeline=pipeline)
    return LoadedModel(model, sample_shape, info["discretize"], options, identity, model.conditioning,
                       n_classes=model.n_classes,
                       to_cond=_labels_tensor(device) if model.conditioning == "class" else None,
                       cond_required=model.conditioning == "tensor", cond_dim=model.cond_dim,
                       cond_rank=2 if model.conditioning == "tensor" else None, device=device, dtype=dtype)


def _pipeline_identity(folder: Path, output_type: str) -> dict:
    """What a Stable Diffusion pipeline adds to its UNet's identity: its other parts and the output type."""
    parts = ("tokenizer", "text_encoder") + (("vae",) if output_type == "image" else ())
    files = [p for part in parts for p in sorted((folder / part).iterdir()) if p.is_file()]
    return {"pipeline": "stable_diffusion", "output_type": output_type, "parts_sha256": _files_sha256(files)}


def _load_callable(spec: str, device, dtype, sample_shape) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    # Like `python -m`, look in the current folder first, so a user's own module next to
    # their files is found when ddim-fused runs as a console script.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for source {spec!r}: {exc}") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"module {module_name!r} has no {attr!r} (source {spec!r})")
    if not callable(factory):
        raise ValueError(f"source {spec!r} is a {type(factory).__name__}, not a callable factory")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    params = {} if signature is None else signature.parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if takes_any or k in params}
    if signature is not None:
        try:  # a factory that needs other arguments is the wrong source, not a failure of the run
            signature.bind(**kwargs)
        except TypeError as exc:
            raise ValueError(f"source {spec!r} is not a model factory: calling it with "
                             f"{', '.join(kwargs) or 'no arguments'} fails ({exc})") from None
    model = factory(**kwargs)
    identity = {"source": "callable", "callable": spec}
    module_file = getattr(module, "__file__", None)
    if module_file and Path(module_file).is_file():
        identity["module_sha256"] = file_sha256(module_file)
    extra = getattr(model, "identity", None)
    if isinstance(extra, dict):
        identity["model"] = json.loads(json.dumps(extra, default=str))
    try:
        return LoadedModel.from_protocol(model, identity, sample_shape=sample_shape, device=device, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"source {spec!r} returned an object outside the sampler protocol: {exc}") from None


def optimize(loaded: LoadedModel, *, compile: bool = False, channels_last: bool = False,
             compile_mode: Optional[str] = None) -> LoadedModel:
    """Apply --compile (torch.compile of the network, in torch.compile's `compile_mode`) and
    --channels-last, in place.

    The network is the model's `net` attribute (digits, diffusers folders) or the model
    itself when it is an nn.Module (callables); other models cannot be optimized. A
    Stable Diffusion pipeline's VAE decoder is compiled too.
    """
    if not (compile or channels_last):
        return loaded
    owner = loaded.model
    net = getattr(owner, "net", None)
    if not isinstance(net, torch.nn.Module):
        if not isinstance(owner, torch.nn.Module):
            raise ValueError("compile and channels_last need a model whose network is an nn.Module "
                             "(its `net` attribute or the model itself)")
        net = owner
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if compile:
        compiled = torch.compile(net, mode=compile_mode)
        if net is owner:
            loaded.model = compiled
        else:
            owner.net = compiled
        if loaded.decodes:
            loaded.pipeline.vae.decoder = torch.compile(loaded.pipeline.vae.decoder, mode=compile_mode)
    return loaded


def file_sha256(path) -> str:
    """sha256 of a file's bytes as 64 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files_sha256(paths) -> str:
    """One sha256 over several files: of their names and sha256s, in order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{Path(p).name}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def _json_sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _shape(shape) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"sample shape must be a tuple of positive ints, got {shape!r}") from None
    if not out or any(s < 1 for s in out) or any(not float(s).is_integer() for s in shape):
        raise ValueError(f"sample shape must be a tuple of positive ints, got {tuple(shape)!r}")
    if math.prod(out) > MAX_NUMEL:
        raise ValueError(f"sample shape {out} has {math.prod(out)} elements, more than 2**62")
    return out


def _labels_tensor(device: torch.device) -> Callable:
    """labels -> a (B,) long tensor on device: the cond of models that take class labels as they are."""
    def to_cond(labels) -> torch.Tensor:
        return torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device).reshape(-1)
    return to_cond
