"""The CLI's side of --model: load it, feed it (--class, --cond, --uncond, --guidance), name it.

Library errors (ValueError from `ddim_fused.models` and `ddim_fused.conditioning`) come
back as one-line UserErrors whose argument names are the flags the user typed.
"""
from __future__ import annotations

import importlib
import math
from typing import Optional

import torch

from .errors import route_library_logs
from .options import UserError, flag_names, parse_classes, sampler_errors, schedule_overrides
from ..conditioning import Conditioning, load_tensor_file
from ..digits.pretrained import MODEL_FILE
from ..models import DIGITS, LoadedModel, file_sha256, load_model_source, optimize, source_kind
from ..prompts import PromptConditioning, read_prompt_file
from ..validation import MAX_NUMEL

# Argument names in the loaders' messages -> flags (besides the sampler's, see SAMPLER_FLAGS).
MODEL_FLAGS = {"source": "--model", "weights": "--weights", "scheduler_config": "--scheduler-config",
               "sample_shape": "--shape", "compile": "--compile", "channels_last": "--channels-last",
               "output_type": "--output-type"}
INPUT_FLAGS = {"classes": "--class", "cond": "--cond", "uncond": "--uncond", "guidance": "--guidance",
               "prompts": "--prompt", "negative_prompts": "--negative-prompt"}
PROMPT_GUIDANCE = 7.5  # diffusers' default for Stable Diffusion pipelines


def load_cli_model(args, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The --model of a command on device in dtype, with --prediction-type / --clip-sample in its
    sampler options and --compile / --channels-last applied."""
    shape = tuple(args.shape) if args.shape else None
    if shape is not None and (min(shape) < 1 or math.prod(shape) > MAX_NUMEL):
        raise UserError("--shape must be sizes >= 1 with at most 2**62 elements in all, got "
                        + " ".join(map(str, shape)))
    if args.compile_mode is not None and not args.compile:
        raise UserError("--compile-mode needs --compile")
    try:
        if source_kind(args.model) == "folder":
            _import_folder_loaders()
        loaded = load_model_source(args.model, device=device, dtype=dtype, weights=args.weights,
                                   scheduler_config=args.scheduler_config, sample_shape=shape,
                                   output_type=args.output_type)
        loaded.sampler_options.update(schedule_overrides(args))
        return optimize(loaded, compile=args.compile, channels_last=args.channels_last, compile_mode=args.compile_mode)
    except ImportError as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:
        raise UserError(flag_names(str(exc), MODEL_FLAGS)) from None
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a foreign weights file makes the loader raise
        # A truncated zip, another pickle (refused by weights_only), a dict without the
        # expected keys: torch.load and load_state_dict raise nearly anything. For other
        # models the error passes to ddim_fused.cli.errors as it is.
        if args.model != DIGITS:
            raise
        raise UserError(_digits_weights_error(args.weights, exc)) from None


def _import_folder_loaders() -> None:
    """Import the diffusers (and Stable Diffusion) integrations before a folder loads: diffusers
    and transformers set up their logging on import, and from then on it prints through
    ddim-fused's one-line format, while the folder loads too."""
    for module in ("ddim_fused.diffusers_models", "ddim_fused.stable_diffusion"):
        try:
            importlib.import_module(module)
        except ImportError:  # load_model_source names a missing extra the folder needs
            break
    route_library_logs()


def _digits_weights_error(weights, exc: BaseException) -> str:
    what = f"--weights {str(weights)!r}" if weights else f"the shipped weights {str(MODEL_FILE)!r}"
    if isinstance(exc, FileNotFoundError):
        return f"{what} not found (run ddim-fused train-digits)"
    if isinstance(exc, (PermissionError, IsADirectoryError)):
        return f"cannot read {what}: {exc.strerror or exc}"
    # What torch.load and load_state_dict raise for a foreign or damaged file; their
    # messages run over many lines about torch internals, so only the kind is shown.
    return f"{what} is not a digits model weights file ({type(exc).__name__})"


def guidance(args, loaded: LoadedModel) -> float:
    """--guidance, or its default: the command's for the digits model, 7.5 for text-conditioned
    pipelines, 1 (none) for others."""
    if args.guidance is not None:
        return args.guidance
    if loaded.conditioning == "prompt":
        return PROMPT_GUIDANCE
    return args.command_guidance if loaded.is_digits else 1.0


def default_classes(loaded: LoadedModel, *, unconditional: bool = False) -> Optional[list[int]]:
    """Classes a command uses without --class: all of them cycling (None for models without).

    unconditional: prefer the model's null class when it has one (interpolate's default).
    """
    if loaded.conditioning != "class":
        return None
    if unconditional and loaded.null_cond is not None:
        return None
    if loaded.n_classes is None:
        raise UserError("this class-conditional model does not say how many classes it has: give --class")
    return list(range(loaded.n_classes))


def classes_from(values, loaded: LoadedModel, *, unconditional: bool = False,
                 flag: str = "--class") -> Optional[list[int]]:
    """--class (or flag) values checked against the model, or the default classes."""
    if values is None:
        return default_classes(loaded, unconditional=unconditional)
    if loaded.conditioning != "class":
        kind = {"tensor": "takes --cond tensors", "prompt": "takes --prompt text"}.get(loaded.conditioning,
                                                                                      "is unconditional")
        raise UserError(f"{flag} applies to class-conditional models; this model {kind}")
    return parse_classes(values, loaded.n_classes, "the digits model" if loaded.is_digits else "the model")


def conditioning(loaded: LoadedModel, args, classes, num: Optional[int]) -> Conditioning:
    """The run's Conditioning from --class (already parsed), --cond, --uncond, the prompt options and --guidance."""
    prompts = _prompt_pairs(args)
    if loaded.conditioning == "prompt":
        return _prompt_conditioning(loaded, args, prompts, num)
    if prompts is not None or getattr(args, "negative_prompt", None) is not None:
        raise UserError("--prompt, --prompts and --negative-prompt apply to Stable Diffusion pipelines (a --model "
                        "folder with a text encoder)")
    cond = _tensor_file(args.cond, "--cond")
    uncond = _tensor_file(args.uncond, "--uncond")
    with sampler_errors(**INPUT_FLAGS):
        return Conditioning(loaded, classes=classes, cond=cond, uncond=uncond, guidance=guidance(args, loaded),
                            num=num)


def _prompt_pairs(args) -> Optional[list]:
    """(prompt, negative prompt or None) pairs of --prompt or --prompts, or None when neither is given."""
    texts, path = getattr(args, "prompt", None), getattr(args, "prompts", None)
    if texts is not None and path is not None:
        raise UserError("give --prompt or --prompts, not both")
    if path is None:
        return None if texts is None else [(text, None) for text in texts]
    try:
        return read_prompt_file(path)
    except ValueError as exc:
        raise UserError(f"--prompts: {exc}") from None


def _prompt_conditioning(loaded: LoadedModel, args, prompts, num) -> PromptConditioning:
    if prompts is None:
        raise UserError(f"this model is conditioned on text: give --prompt TEXT or --prompts FILE "
                        f"({args.command} takes them)" if hasattr(args, "prompt") else
                        f"{args.command} does not run Stable Diffusion pipelines yet; use sample or generate")
    for flag, given in (("--class", getattr(args, "classes", None)), ("--cond", args.cond), ("--uncond", args.uncond)):
        if given is not None:
            raise UserError(f"{flag} does not apply to a Stable Diffusion pipeline, which takes --prompt text")
    default = getattr(args, "negative_prompt", None)
    negatives = [negative if negative is not None else default for _, negative in prompts]
    with sampler_errors(**INPUT_FLAGS):
        return PromptConditioning(loaded, [prompt for prompt, _ in prompts], negatives,
                                  guidance=guidance(args, loaded), num=num)


def _tensor_file(path, flag: str):
    if path is None:
        return None
    try:
        return load_tensor_file(path)
    except (ValueError, ImportError) as exc:
        raise UserError(f"{flag}: {exc}") from None


def run_identity(loaded: LoadedModel, inputs: Conditioning, args) -> dict:
    """The model part of a generate run's identity (run.json, manifest.json).

    For the digits model without overrides it is what earlier versions recorded (name and
    weights sha256), so their runs still resume. With --prompts it holds the file's sha256.
    """
    info = dict(loaded.identity)
    overrides = schedule_overrides(args)
    if overrides:
        info["schedule_overrides"] = overrides
    info.update(inputs.identity())
    if getattr(args, "prompts", None):  # the file itself: an edited prompt file is another run
        info["prompt_file_sha256"] = file_sha256(args.prompts)
    if not loaded.is_digits:
        info["sample_shape"] = list(loaded.sample_shape)
        info["prediction_type"] = overrides.get("prediction_type", loaded.prediction_type)
    return info
