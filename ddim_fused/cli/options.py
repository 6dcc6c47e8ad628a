"""What the ddim-fused subcommands share: options, checks, the sampler, PNG output.

`cli.commands` (sample, paint, interpolate, invert, train-digits) and `cli.generate` (generate) both
import this module and nothing from each other; `cli.model` loads the --model they name.
Sampler arguments are checked by DDIMSampler itself; this module only renames the
arguments in its messages to the flags the user typed (SAMPLER_FLAGS).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import re
from pathlib import Path

import torch

from ..backend import interpreter_on
from .errors import UserError  # noqa: F401 - part of this module's API, used by every command
from ..coefficients import PREDICTION_TYPES
from ..finite import nonfinite_hint as finite_hint
from ..models import DIGITS, LoadedModel
from ..sampler import DDIMSampler
from ..schedules import DISCRETIZATIONS
from ..validation import check_int

# torch.compile modes --compile takes: those that do not capture CUDA graphs of their own.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# More threads than this only oversubscribes the cores (and torch crashes on absurd counts).
MAX_THREADS = 4 * (os.cpu_count() or 1)
# Guidance scales are 1 to 10 in practice. A larger one runs, and its NaN/Inf output is
# refused with the cause named; one beyond float32 cannot even enter the float32 step.
MAX_GUIDANCE = float(torch.finfo(torch.float32).max)

# The sampler's (and its helpers') argument names -> the flag that sets each one.
# `discretize` and `eta` are the names ddim_timesteps and ddim_coefficients use.
SAMPLER_FLAGS = {
    "n_steps": "--steps",
    "ddim_discretize": "--discretize",
    "discretize": "--discretize",
    "ddim_eta": "--eta",
    "eta": "--eta",
    "seed": "--seed",
    "backend": "--backend",
    "paint_blend": "--blend",
    "uncond_scale": "--guidance",
    "t_start": "--t-start",
    "prediction_type": "--prediction-type",
    "clip_sample_range": "--clip-sample",
}


# ---------------------------------------------------------------------------- options
def _eta(text: str):
    """--eta as a float or 'sigma_hat'; its range is the sampler's to check."""
    if text == "sigma_hat":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float or 'sigma_hat', got {text!r}") from None


def _finite_float(text: str) -> float:
    """A float that is not nan or inf (the sampler would only notice it in the middle of a run)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _guidance(text: str) -> float:
    """--guidance: a finite float within +-MAX_GUIDANCE."""
    value = _finite_float(text)
    if abs(value) > MAX_GUIDANCE:
        raise argparse.ArgumentTypeError(f"expected a scale within +-{MAX_GUIDANCE:.3g} (the float32 range; 1 to 10 "
                                         f"is usual), got {text!r}")
    return value


def _clip_sample(text: str):
    """--clip-sample as 'off' (no limit on pred_x0) or a positive range."""
    if text == "off":
        return text
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected 'off' or a range > 0, got {text!r}")
    return value


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Add --model and what goes with it: scheduler config, shape, conditioning, schedule overrides."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DIGITS, metavar="SOURCE",
                   help="what to sample: 'digits' (the embedded model, default); a local diffusers pipeline "
                        "folder (model_index.json, unet/, scheduler/); a UNet2DModel/UNet2DConditionModel folder "
                        "with --scheduler-config; or package.module:callable returning a sampler-protocol model")
    g.add_argument("--scheduler-config", default=None, metavar="FILE",
                   help="diffusers scheduler_config.json giving the schedule of a --model folder (overrides a "
                        "pipeline's scheduler/)")
    g.add_argument("--shape", type=int, nargs="+", default=None, metavar="N",
                   help="shape of one sample, e.g. 3 32 32 (default: the model's in_channels and sample_size)")
    g.add_argument("--cond", default=None, metavar="FILE",
                   help="conditioning tensor for a UNet2DConditionModel (encoder hidden states), .pt/.npy/"
                        ".safetensors: one row per sample (--num rows) or one for all")
    g.add_argument("--uncond", default=None, metavar="FILE",
                   help="unconditional tensor for classifier-free guidance with --cond (same row shape)")
    g.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="what the model predicts (default: the model's scheduler config; epsilon for digits)")
    g.add_argument("--clip-sample", type=_clip_sample, default=None, metavar="RANGE|off",
                   help="clip pred_x0 to [-RANGE, RANGE] in every step, or 'off' (default: the scheduler "
                        "config's clip_sample / thresholding; off for digits)")
    g.add_argument("--output-type", choices=("image", "latent"), default=None,
                   help="Stable Diffusion pipelines: 'image' decodes every batch with the VAE to uint8 RGB "
                        "(default), 'latent' keeps the latents")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model's network, and a pipeline's VAE decoder (pays off on a GPU)")
    g.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile mode of --compile (default: torch's default); the modes that use CUDA "
                        "graphs of their own are left out, --cuda-graph captures the whole loop")
    g.add_argument("--channels-last", action="store_true",
                   help="run the network in channels_last memory format (faster convolutions on GPUs)")


def add_prompt_options(p: argparse.ArgumentParser) -> None:
    """Add the text inputs of Stable Diffusion pipelines: --prompt, --prompts, --negative-prompt."""
    g = p.add_argument_group("prompts (Stable Diffusion pipelines)")
    g.add_argument("--prompt", dest="prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt; repeat for several (sample i gets prompt i %% P)")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompt file: .txt, one prompt per line, or .jsonl, one {\"prompt\": ..., "
                        "\"negative_prompt\": ...} object per line (negative_prompt optional)")
    g.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="the negative prompt (the unconditional input of guidance) of every prompt that has no "
                        "negative_prompt of its own (default: the empty prompt)")


def add_sampler_options(p: argparse.ArgumentParser, *, num: int = 10, guidance: float = 3.0,
                        eta: bool = True) -> None:
    """Add the options every sampling subcommand takes (model, steps, eta, guidance, seed, device, ...).

    Args:
        p: the subcommand's parser.
        num: default of --num.
        guidance: default of --guidance for the digits model (other models: 1, no guidance).
        eta: whether the command takes --eta (commands that need eta 0 do not).
    """
    add_model_options(p)
    p.add_argument("--steps", type=int, default=50,
                   help="number of DDIM steps S, at most the model's training steps T (1000 for the shipped "
                        "model) (default 50)")
    if eta:
        p.add_argument("--eta", type=_eta, default=0.0,
                       help="DDIM eta: 0 deterministic, 1 DDPM-like noise, or 'sigma_hat' (default 0)")
    p.add_argument("--discretize", choices=DISCRETIZATIONS, default=None,
                   help="how the S time steps are spread over the model's T training steps (default: uniform for "
                        "digits and callables, the scheduler config's timestep_spacing for diffusers models)")
    p.set_defaults(command_guidance=guidance)
    p.add_argument("--guidance", type=_guidance, default=None,
                   help="classifier-free guidance scale: 1 = plain conditional model, >1 sharpens the "
                        f"class, 0 = unconditional (default {guidance} for digits, 7.5 for Stable Diffusion "
                        "pipelines, 1 for other models)")
    p.add_argument("--seed", type=int, default=0, help="Philox noise seed: same seed, same digits (default 0)")
    p.add_argument("--num", type=int, default=num, help=f"number of samples (default {num})")
    p.add_argument("--batch-size", type=int, default=100,
                   help="samples per model batch; results do not depend on it (default 100)")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1 (default auto)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="precision of the latent and the model (default float32)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="per-step update: auto (Triton kernel on CUDA, torch ops on CPU), torch, or triton "
                        "(on CPU it runs in Triton's slow interpreter) (default auto)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="digits model weights file (default: the one shipped in the package)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 keeps torch's default (one per core) (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


# ---------------------------------------------------------------------------- checks
def parse_classes(values, n_classes: int | None = 10, model: str = "the digits model") -> list[int]:
    """--class values ('3', '3 5', '3,5') as a list of ints in [0, n_classes).

    Args:
        values: the strings argparse collected for the option.
        n_classes: the model's number of classes (None: any class >= 0).
        model: how messages name the model.

    Returns:
        the classes in order, at least one.
    """
    known = "classes >= 0" if n_classes is None else f"classes 0 to {n_classes - 1}"
    out = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            # ASCII digits only: str.isdigit also accepts '¹', which int() refuses.
            if not re.fullmatch(r"[0-9]+", part) or (n_classes is not None and int(part) >= n_classes):
                raise UserError(f"unknown class {part!r}: {model} knows {known}")
            out.append(int(part))
    if not out:
        raise UserError(f"--class needs at least one class ({known})")
    return out


def check_positive(args, *names: str) -> None:
    """Each named option (attribute name, e.g. "batch_size") is >= 1."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_at_most(args, name: str, limit: int, why: str) -> None:
    """The named option (attribute name) is <= limit; `why` explains the limit in the message."""
    value = getattr(args, name)
    if value > limit:
        raise UserError(f"--{name.replace('_', '-')} must be at most {limit} ({why}), got {value}")


def check_out_folder(path: str) -> None:
    """--out of a command that writes a folder is not empty (an empty path is no folder at all)."""
    if not path.strip():
        raise UserError("--out must name a folder, got an empty path (use --out . for the current folder)")


def check_threads(threads: int, *, allow_zero: bool) -> None:
    """--threads in [1 (or 0 where 0 keeps torch's default), MAX_THREADS]."""
    low = 0 if allow_zero else 1
    if not low <= threads <= MAX_THREADS:
        raise UserError(f"--threads must be in [{low}, {MAX_THREADS}] (4 per CPU core here), got {threads}")


def check_runtime(args) -> dict:
    """Check threads, device, dtype, backend and weights, and apply --threads.

    Returns:
        {"device": torch.device, "dtype": torch.dtype}.
    """
    check_threads(args.threads, allow_zero=True)
    device = parse_device(args.device)
    dtype = DTYPES[args.dtype]
    if args.backend == "triton":
        _check_triton(device, dtype)
    if args.weights is not None and not Path(args.weights).is_file():
        raise UserError(f"--weights {args.weights!r} is not a file")
    if args.threads:
        torch.set_num_threads(args.threads)
    return {"device": device, "dtype": dtype}


def _check_triton(device: torch.device, dtype: torch.dtype) -> None:
    """--backend triton can run here; sets TRITON_INTERPRET=1 on a CPU unless the user set it."""
    if importlib.util.find_spec("triton") is None:
        raise UserError("--backend triton needs the triton package, which is not installed; use --backend torch")
    if dtype == torch.float64:
        # The sampler checks the dtype per call, i.e. in the middle of a run; this fails before it.
        raise UserError("--backend triton supports float32, float16 and bfloat16, not float64")
    if device.type == "cpu":
        # Must be set before ddim_fused.kernels imports triton (the sampler imports it on first use).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if not interpreter_on():
            raise UserError("--backend triton on a CPU runs through Triton's interpreter, which needs "
                            f"TRITON_INTERPRET=1 (it is {os.environ['TRITON_INTERPRET']!r}); unset it or use "
                            "--backend torch")


def parse_device(text: str) -> torch.device:
    """--device text as a torch.device that exists here; 'auto' is cuda if available, else cpu."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {text!r} is not a torch device (try cpu, cuda or cuda:0)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {text!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {text!r} asks for CUDA, which is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# ---------------------------------------------------------------------------- sampler
# Quoted text in a message is a value (a path, a choice, another library's error text): kept.
_QUOTED = r"""(?<!\w)'(?:[^'\\]|\\.)*'(?!\w)|(?<!\w)"(?:[^"\\]|\\.)*"(?!\w)"""


def flag_names(message: str, flags: dict[str, str]) -> str:
    """message with each argument name in `flags` replaced by its flag, where it stands as an argument.

    The library's messages name an argument as a word of their own text ("n_steps must
    be ...", "guidance=2 needs uncond"). Elsewhere the same letters are something else and
    are kept: inside quotes (values, and the error text of other libraries, which the
    library quotes), or joined to a path, file name or attribute (scheduler/scheduler_config.json,
    model.n_steps, --weights-file).
    """
    names = "|".join(map(re.escape, sorted(flags, key=len, reverse=True)))
    argument = r"(?<![^\s(\[])(" + names + r")(?=$|[\s=,;:)\]]|\.(?!\w))"
    return re.sub(f"{_QUOTED}|{argument}",
                  lambda m: flags[m.group(1)] if m.group(1) else m.group(0), message)


@contextlib.contextmanager
def sampler_errors(**renames: str):
    """Turn a sampler ValueError/TypeError raised inside into a UserError that names flags.

    Args:
        renames: argument name -> flag, overriding SAMPLER_FLAGS (e.g. n_steps="--invert-steps").
    """
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise UserError(flag_names(str(exc), {**SAMPLER_FLAGS, **renames})) from None


def schedule_overrides(args) -> dict:
    """DDIMSampler keyword arguments that --prediction-type and --clip-sample set (empty if not given)."""
    out = {}
    if getattr(args, "prediction_type", None) is not None:
        out["prediction_type"] = args.prediction_type
    clip = getattr(args, "clip_sample", None)
    if clip == "off":
        out.update(clip_sample=False, thresholding=False)
    elif clip is not None:
        out.update(clip_sample=True, clip_sample_range=clip, thresholding=False)
    return out


def build_sampler(model, args, n_steps: int | None = None, *, steps_flag: str = "--steps",
                  **options) -> DDIMSampler:
    """The DDIMSampler a command runs, built from the shared options; it checks them itself.

    Args:
        model: a LoadedModel (its schedule options and spacing apply), or a bare
            sampler-protocol model.
        args: parsed options: discretize, backend, seed and, if the command has them, eta,
            --prediction-type and --clip-sample.
        n_steps: S (default --steps).
        steps_flag: the flag that set n_steps, named in errors about it.
        options: further DDIMSampler keyword arguments (e.g. paint_blend).

    Returns:
        the sampler; bad arguments raise UserError naming the flag.
    """
    n_steps = args.steps if n_steps is None else n_steps
    loaded = model if isinstance(model, LoadedModel) else None
    base = loaded.sampler_options if loaded is not None else {}
    discretize = args.discretize or (loaded.discretize if loaded is not None else "uniform")
    with sampler_errors(n_steps=steps_flag):
        return DDIMSampler(loaded.model if loaded is not None else model, n_steps, discretize,
                           getattr(args, "eta", 0.0), backend=args.backend, seed=args.seed,
                           **{**base, **schedule_overrides(args), **options})


def nonfinite_hint(args) -> str:
    """The likely causes of NaN/Inf output under these options, for the error message."""
    model_check = "--weights" if getattr(args, "model", DIGITS) == DIGITS else "--model"
    return finite_hint(args.guidance, args.dtype, model_check, "nothing was written")


def check_t_start(sampler: DDIMSampler, t_start: int) -> int:
    """--t-start checked as DDIMSampler.paint checks it, but before the command starts work."""
    with sampler_errors():
        return check_int("t_start", t_start, 1, len(sampler.time_steps))
