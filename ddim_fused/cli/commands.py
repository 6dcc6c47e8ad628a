"""`ddim-fused` command line: sample, paint, interpolate and invert with the digits model or any --model.

Every command runs the public DDIMSampler API, on the shipped 8x8 digits model unless
--model names a diffusers folder or a package.module:callable, and writes an upscaled PNG;
`generate` writes sharded bulk runs. Every argument is checked before any work starts.
Bad arguments print one line `ddim-fused: error: ...` and exit 2; runtime failures (a
full disk, NaN/Inf output) exit 1; Ctrl-C exits 130 and leaves no partial file. No
traceback is printed unless --debug is given.

The benchmark suite is not a subcommand: it runs from a source checkout as `python -m bench`.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import TEMP_SUFFIX, OutputPathError
from .errors import UserError, library_logs, one_line, one_line_warnings, report, status_output
from .model import classes_from, conditioning, load_cli_model
from ..models import DIGITS
from .options import (
    add_prompt_options,
    add_sampler_options,
    build_sampler,
    check_at_most,
    check_out_folder,
    check_positive,
    check_runtime,
    check_t_start,
    check_threads,
    nonfinite_hint,
)
from ..digits import load_digits_classifier
from ..digits.images import default_scale, is_image_batch, save_grid
from ..digits.train import add_arguments as add_train_arguments
from ..digits.train import train_digits
from ..finite import check_finite
from .generate import add_parser as add_generate_parser
from .generate import cmd_generate
from ..interpolation import slerp

REGIONS = ("top", "bottom", "left", "right")
PAINT_BLENDS = ("alpha", "alpha_prev")
_SEED_LIMIT = 2**63  # Philox seeds lie in [0, 2**63)
# Digits drawn into one PNG (72x72 pixels each: 10,000 make a 52 MB image); bulk runs use `generate`.
MAX_GRID_DIGITS = 10_000
DEFAULT_NUM = 10  # --num of paint and invert, which take --input instead
# atomic_write's temporary name adds "." + 8 hex digits + TEMP_SUFFIX to the target's name.
_TEMP_NAME_EXTRA = len(".") + len(".01234567") + len(TEMP_SUFFIX)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line `ddim-fused: error: ...` in every subcommand."""

    def error(self, message):
        self.exit(2, f"ddim-fused: error: {one_line(message)} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        # argparse reports a subcommand's unknown flags from the top parser, whose --help
        # does not list the subcommand's flags: point to the subcommand's instead.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._subcommands().get(getattr(parsed, "command", None), self)
            command.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _subcommands(self) -> dict:
        actions = self._subparsers._group_actions if self._subparsers is not None else []
        return next((a.choices for a in actions if isinstance(a, argparse._SubParsersAction)), {})


def build_parser() -> argparse.ArgumentParser:
    """The ddim-fused argument parser with its subcommands."""
    parser = _Parser(prog="ddim-fused", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("sample", help="generate a grid of digits or --model samples (PNG)",
                       description="Generate digits (or samples of --model) with DDIM and write them as an upscaled "
                                   "PNG grid.")
    add_sampler_options(p, num=100)
    p.add_argument("--class", dest="classes", nargs="+", default=None, metavar="C",
                   help="class(es) to generate, e.g. --class 3 or --class 1 4 7 (cycled over the samples; "
                        "default: all of a class-conditional model's classes cycling, 0..9 for digits, one class "
                        "per column)")
    add_prompt_options(p)
    p.add_argument("--out", default="samples.png", help="PNG file to write (default samples.png)")

    p = sub.add_parser("paint", help="regenerate a masked region of digits (before/mask/after PNG)",
                       description="Mask a region of generated (or given) digits and regenerate it with "
                                   "DDIMSampler.paint, keeping the rest.")
    add_sampler_options(p, eta=False)
    _add_input_option(p)
    p.add_argument("--class", dest="classes", nargs="+", default=None, metavar="C",
                   help="class(es) of the generated digits (default 0..9 cycling); not with --input for the "
                        "digits model; for another --model, the classes of its --input samples")
    p.add_argument("--paint-class", dest="paint_classes", nargs="+", default=None, metavar="C",
                   help="class(es) the region is regenerated as (default: the digits' own class, or the "
                        "classifier's reading of --input digits)")
    p.add_argument("--region", choices=REGIONS, default="bottom", help="half of the digit to regenerate (default bottom)")
    p.add_argument("--blend", choices=PAINT_BLENDS, default="alpha",
                   help="noise level the kept part is re-noised to after each step: 'alpha', the step's own "
                        "(labml's behaviour), or 'alpha_prev', the level of the new latent (default alpha)")
    p.add_argument("--t-start", type=int, default=None,
                   help="DDIM steps to run, 1..--steps: the digits are noised to that step first; fewer keeps "
                        "more of the original in the region (default: --steps, the region is redrawn from noise)")
    p.add_argument("--out", default="paint.png", help="PNG file to write: rows before, mask, after (default paint.png)")

    p = sub.add_parser("interpolate", help="decode slerp-interpolated latents (strip PNG)",
                       description="Spherically interpolate between two random initial latents and decode each "
                                   "with deterministic DDIM (eta 0): one row per pair.")
    add_sampler_options(p, guidance=1.0, num=4, eta=False)
    p.set_defaults(guidance=None)  # None: not given; --guidance without --class is refused
    p.add_argument("--class", dest="classes", nargs="+", default=None, metavar="C",
                   help="class to decode every latent as (one per row, cycled; default: unconditional, so the "
                        "latent alone decides the digit, and --guidance has no effect and is refused)")
    p.add_argument("--frames", type=int, default=10, help="points from the first latent to the second (default 10)")
    p.add_argument("--out", default="interpolate.png", help="PNG file to write (default interpolate.png)")

    p = sub.add_parser("invert", help="DDIM inversion and reconstruction error vs steps",
                       description="Encode digits to x_T with DDIMSampler.invert, decode with sample(x_last=...), "
                                   "and print the RMS reconstruction error for each step count.")
    add_sampler_options(p, guidance=1.0, eta=False)
    _add_input_option(p)
    p.add_argument("--class", dest="classes", nargs="+", default=None, metavar="C",
                   help="class(es) of the generated digits (default 0..9 cycling); not with --input for the "
                        "digits model, whose digits use the classifier's reading")
    p.add_argument("--invert-steps", type=int, nargs="+", default=[10, 20, 50, 100], metavar="S",
                   help="step counts to invert and reconstruct with (default 10 20 50 100)")
    p.set_defaults(steps=None, seed=None)  # None: not given (they set the generation, which --input replaces)
    p.add_argument("--out", default="invert.png",
                   help="PNG file to write: originals, then one row of reconstructions per step count "
                        "(default invert.png)")

    p = sub.add_parser("train-digits", help="retrain the embedded digits model (needs scikit-learn)",
                       description="Train the digits eps-model and its classifier from scratch, deterministically.")
    add_train_arguments(p)

    add_generate_parser(sub)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    for command in sub.choices.values():
        # SUPPRESS: given after the command it sets args.debug, else the main parser's value stands.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="print the traceback of an error")
    return parser


def _add_input_option(p: argparse.ArgumentParser) -> None:
    """paint's and invert's --input; it replaces --num, which defaults to None to tell when it is given."""
    p.add_argument("--input", default=None, metavar="NPY",
                   help=".npy of shape (N, 8, 8) or (N, 1, 8, 8) in [-1, 1], (N, *shape) for another --model "
                        "(default: generate --num samples)")
    p.set_defaults(num=None)


# ---------------------------------------------------------------------------- checks
def _check_common(args) -> dict:
    """Check the options that are the CLI's own (the sampler checks its arguments itself).

    Returns:
        {"device": torch.device, "dtype": torch.dtype}.
    """
    if args.num is not None:
        check_positive(args, "num")
        check_at_most(args, "num", MAX_GRID_DIGITS, "digits in one PNG; `ddim-fused generate` makes more")
    check_positive(args, "batch_size")
    _check_out_png(args.out)
    return check_runtime(args)


def _check_grid(n_digits: int, what: str) -> None:
    """A PNG of n_digits digits is within MAX_GRID_DIGITS; `what` says which options made them."""
    if n_digits > MAX_GRID_DIGITS:
        raise UserError(f"{what} make {n_digits} digits; at most {MAX_GRID_DIGITS} fit in one PNG")


def _check_input_or_num(args) -> None:
    """paint/invert: --input replaces --num (and the digits model's --class); else --num defaults to 10."""
    if args.input is None:
        args.num = DEFAULT_NUM if args.num is None else args.num
        return
    # Another --model's --input samples take their classes from --class; the digits model's
    # from the classifier's reading, so there --class could only contradict it.
    classes_given = args.classes is not None and args.model == DIGITS
    for given, flag in ((args.num is not None, "--num"), (classes_given, "--class")):
        if given:
            raise UserError(f"{flag} sets the digits to generate, so it cannot go with --input, whose digits "
                            "are used instead")


def _check_out_png(path: str) -> None:
    """--out names a .png file in an existing, writable folder."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {path!r}")
    parent = out.parent if str(out.parent) else Path(".")
    name_max = _name_max(parent) - _TEMP_NAME_EXTRA
    if len(os.fsencode(out.name)) > name_max:
        raise UserError(f"--out file name is too long: {len(os.fsencode(out.name))} bytes, at most {name_max} here")
    try:
        if out.is_dir():
            raise UserError(f"--out {path!r} is a directory")
        if not parent.is_dir():
            raise UserError(f"cannot write --out {path!r}: folder {str(parent)!r} does not exist")
    except OSError as exc:  # a path the system refuses to look up (too long, a loop of links)
        raise UserError(f"cannot write --out {path!r}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"cannot write --out {path!r}: permission denied")


def _name_max(folder: Path) -> int:
    """The longest file name, in bytes, that `folder`'s file system takes (255 if it cannot say)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such folder; no pathconf on Windows
        return 255


def _load_npy(path: str, shape: tuple, device, dtype, what: str = "samples") -> torch.Tensor:
    """--input samples: an .npy of shape (N, *shape) in [-1, 1] ((N, H, W) too for one channel).

    what: how messages name the samples ("digits" for the digits model).
    """
    one_channel = len(shape) == 3 and shape[0] == 1
    want = f"(N, {', '.join(map(str, shape))})"
    if one_channel:
        want = f"(N, {shape[1]}, {shape[2]}) or {want}"
    try:
        array = np.load(path, allow_pickle=False)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise UserError(f"cannot read --input {path!r}: {exc.strerror}") from None
    except Exception as exc:  # noqa: BLE001 - an empty or foreign file makes np.load raise nearly anything
        detail = one_line(str(exc))[:200]
        raise UserError(f"--input {path!r} is not a .npy file ({type(exc).__name__}: {detail})") from None
    if not isinstance(array, np.ndarray):  # np.load opens an .npz archive as an NpzFile
        array.close()
        raise UserError(f"--input {path!r} is an .npz archive; expected a .npy file of shape {want}")
    given = array.shape
    if one_channel and array.ndim == 3:
        array = array[:, None]
    if array.ndim != 1 + len(shape) or array.shape[1:] != tuple(shape):
        raise UserError(f"--input {path!r} has shape {given}, expected {want}")
    if array.shape[0] == 0:
        raise UserError(f"--input {path!r} holds no {what} (shape {given})")
    if array.dtype.kind not in "iuf":
        raise UserError(f"--input {path!r} holds {array.dtype} values, expected real numbers (float or int)")
    if not np.all(np.isfinite(array)):
        raise UserError(f"--input {path!r} must hold finite numbers")
    if array.min() < -1.001 or array.max() > 1.001:
        raise UserError(f"--input {path!r} has values in [{array.min():.3g}, {array.max():.3g}], expected [-1, 1]")
    return torch.from_numpy(array.astype(np.float32)).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------- helpers
class _Run:
    """The loaded --model, a progress bar, batched sampling and PNG output shared by the commands."""

    def __init__(self, args, device, dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.model = load_cli_model(args, device, dtype)
        self.shape = self.model.sample_shape
        if self.model.conditioning == "prompt" and args.command != "sample":
            raise UserError(f"{args.command} does not run Stable Diffusion pipelines yet; use sample or generate")
        if self.model.conditioning == "prompt" and not self.model.decodes:
            raise UserError("sample writes a PNG grid of images; --output-type latent keeps latents, which "
                            "ddim-fused generate writes")
        if not self.model.decodes and not is_image_batch((1,) + tuple(self.shape)):
            raise UserError(f"{args.command} writes a PNG grid, which needs grey or RGB images (1 or 3, H, W); the "
                            f"model makes samples of shape {self.shape}: use ddim-fused generate")
        self.what = "digits" if self.model.is_digits else "samples"

    def progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="step", leave=False, disable=self.args.no_progress,
                    file=sys.stderr)

    def inputs(self, classes, num: int):
        """The Conditioning of num samples of these classes (with --cond/--uncond/--guidance)."""
        return conditioning(self.model, self.args, classes, num)

    def generate(self, sampler, inputs, n: int, desc: str, x_last=None, indices=None) -> torch.Tensor:
        """n samples (n, *shape), batched, Philox-seeded by global index.

        inputs: the Conditioning; indices: (n,) its index of each sample (default 0..n-1).
        x_last: (n, *shape) starting latents, or None for the seed's noise.
        """
        bs = self.args.batch_size
        indices = np.arange(n) if indices is None else np.asarray(indices)
        bar = self.progress(len(sampler.time_steps) * -(-n // bs), desc)
        out = []
        for start, batch in _batches(n, bs):
            cond, extra = inputs.inputs(indices[batch])
            x = sampler.sample((batch.stop - start,) + tuple(self.shape), cond, seed=self.args.seed,
                               sample_offset=start, device=self.device, dtype=self.dtype,
                               x_last=None if x_last is None else x_last[batch],
                               callback=lambda _: bar.update(1), **extra)
            if self.model.decodes:
                x = self.model.pipeline.decode(x)
            check_finite(x, f"{desc}: {self.what}", first_index=start, hint=nonfinite_hint(self.args))
            out.append(x)
        bar.close()
        return torch.cat(out)

    def save(self, x: torch.Tensor, ncols: int) -> tuple[int, int]:
        """Write images x (N, C, H, W) as the --out PNG grid, ncols per row."""
        return save_grid(x, self.args.out, ncols, scale=default_scale(*x.shape[-2:]))

    def classifier_line(self, x: torch.Tensor, labels, what: str) -> None:
        """For the digits model: print how many of x the shipped classifier reads as labels."""
        if self.model.is_digits and labels is not None:
            agree = int((_classify(x) == torch.as_tensor(labels)).sum())
            print(f"classifier reads the requested class in {agree}/{len(labels)} {what}")


def _cycle(classes, n):
    return [classes[i % len(classes)] for i in range(n)]


def _classify(x: torch.Tensor) -> torch.Tensor:
    return load_digits_classifier().predict(x.float().cpu())


def _input_or_generated(run, args, sampler, classes, rows_per_sample: int, rows_what: str):
    """The samples paint and invert start from: --input's (B, *shape) array, or args.num
    generated by `sampler`; with their labels (classes cycled, or the digits classifier's
    reading of an input), None where there are none."""
    if args.input is None:
        labels = None if classes is None else _cycle(classes, args.num)
        return run.generate(sampler, run.inputs(classes, args.num), args.num, "generate"), labels
    x0 = _load_npy(args.input, run.shape, run.device, run.dtype, run.what)
    _check_grid(rows_per_sample * x0.shape[0], rows_what)
    if run.model.is_digits:
        return x0, _classify(x0).tolist()
    return x0, None if classes is None else _cycle(classes, len(x0))


def _class_text(args, classes, inputs=None) -> str:
    if getattr(inputs, "prompts", None) is not None:
        return f"{len(inputs.prompts)} prompt(s) cycling"
    if classes is None:
        return "unconditional" if args.cond is None else f"cond {Path(args.cond).name}"
    return "class " + ("0..9 cycling" if args.classes is None and len(classes) == 10 else ",".join(map(str, classes)))


# ---------------------------------------------------------------------------- commands
def cmd_sample(args) -> None:
    env = _check_common(args)
    run = _Run(args, **env)
    classes = classes_from(args.classes, run.model)
    inputs = run.inputs(classes, args.num)
    sampler = build_sampler(run.model, args)
    start = time.perf_counter()
    x = run.generate(sampler, inputs, args.num, "sample")
    seconds = time.perf_counter() - start
    ncols = min(args.num, len(classes) if classes and len(classes) > 1 else max(1, int(np.ceil(np.sqrt(args.num)))))
    size = run.save(x, ncols)
    n_steps = len(sampler.time_steps)
    print(f"sampled {args.num} {run.what} ({_class_text(args, classes, inputs)}) with {n_steps} DDIM steps "
          f"({args.discretize or run.model.discretize}), eta {args.eta}, guidance {inputs.guidance:g}, "
          f"seed {args.seed}, "
          f"{run.device} {args.dtype}, backend {args.backend}")
    print(f"time: {seconds:.2f} s, {1000 * seconds / n_steps:.1f} ms per step "
          f"(all {args.num} {run.what}, batch size {args.batch_size})")
    run.classifier_line(x, None if classes is None else _cycle(classes, args.num), run.what)
    print(f"wrote {args.out} ({size[0]}x{size[1]})")


def _batches(n: int, batch_size: int):
    """(first index, slice) of each --batch-size batch of n samples."""
    for first in range(0, n, batch_size):
        yield first, slice(first, min(n, first + batch_size))


def _region_mask(region: str, shape, device, dtype) -> torch.Tensor:
    """(n, 1, H, W) mask for samples of shape (n, C, H, W): 1 keeps the original, 0 marks the half to regenerate."""
    n, _, h, w = shape
    mask = torch.ones(n, 1, h, w, device=device, dtype=dtype)
    half = {"top": (slice(0, h // 2), slice(None)), "bottom": (slice(h // 2, h), slice(None)),
            "left": (slice(None), slice(0, w // 2)), "right": (slice(None), slice(w // 2, w))}[region]
    mask[(slice(None), slice(None)) + half] = 0
    return mask


def cmd_paint(args) -> None:
    _check_input_or_num(args)
    env = _check_common(args)
    if args.input is None:
        _check_grid(3 * args.num, "3 rows (before, mask, after) of --num samples")
    run = _Run(args, **env)
    classes = classes_from(args.classes, run.model)
    paint_classes = (classes_from(args.paint_classes, run.model, flag="--paint-class")
                     if args.paint_classes is not None else None)
    sampler = build_sampler(run.model, args, paint_blend=args.blend)
    t_start = len(sampler.time_steps) if args.t_start is None else check_t_start(sampler, args.t_start)
    x0, labels = _input_or_generated(run, args, sampler, classes, 3,
                                     "3 rows (before, mask, after) of the --input samples")
    n = x0.shape[0]
    paint_labels = _cycle(paint_classes, n) if paint_classes is not None else labels
    inputs = run.inputs(paint_labels, n)
    mask = _region_mask(args.region, x0.shape, run.device, run.dtype)
    paint_seed = (args.seed + 1) % _SEED_LIMIT  # a stream apart from the one that drew the samples
    start = time.perf_counter()
    bar = run.progress(t_start * -(-n // args.batch_size), "paint")
    parts = []
    for first, batch in _batches(n, args.batch_size):
        cond, extra = inputs.inputs(np.arange(n)[batch])
        # Noise is keyed by global sample index (sample_offset): every batching paints the same.
        x = sampler.q_sample(x0[batch], t_start - 1, seed=paint_seed, sample_offset=first)
        parts.append(sampler.paint(x, cond, t_start, orig=x0[batch], mask=mask[batch], seed=paint_seed,
                                   sample_offset=first, callback=lambda _: bar.update(1), **extra))
        check_finite(parts[-1], f"paint: painted {run.what}", first_index=first, hint=nonfinite_hint(args))
    bar.close()
    after = torch.cat(parts)
    seconds = time.perf_counter() - start
    shown = torch.where(mask > 0, x0, torch.zeros_like(x0))  # the region to redraw shows as mid-grey
    size = run.save(torch.cat([x0, shown, after]), n)
    print(f"painted the {args.region} half of {n} {run.what}: {t_start} of {len(sampler.time_steps)} DDIM steps, "
          f"blend {args.blend}, guidance {extra.get('uncond_scale', 1.0):g}, seed {args.seed}; {seconds:.2f} s, "
          f"{1000 * seconds / t_start:.1f} ms per step")
    run.classifier_line(after, paint_labels, f"painted {run.what}")
    print(f"wrote {args.out} ({size[0]}x{size[1]}; rows: before, mask, after)")


def cmd_interpolate(args) -> None:
    if args.guidance is not None and args.classes is None:
        raise UserError("--guidance needs --class: without a class every latent is decoded unconditionally, "
                        "so there is nothing to guide")
    args.guidance = 1.0 if args.guidance is None else args.guidance
    env = _check_common(args)
    if args.frames < 2:
        raise UserError(f"--frames must be >= 2, got {args.frames}")
    _check_grid(args.num * args.frames, "--num paths of --frames latents")
    run = _Run(args, **env)
    classes = classes_from(args.classes, run.model, unconditional=True)
    inputs = run.inputs(classes, args.num)
    sampler = build_sampler(run.model, args)
    gen = torch.Generator().manual_seed(args.seed)
    ends = torch.randn((args.num, 2) + tuple(run.shape), generator=gen, dtype=torch.float64)
    weights = torch.linspace(0, 1, args.frames, dtype=torch.float64)
    latents = torch.cat([slerp(pair[0], pair[1], weights) for pair in ends])
    latents = latents.to(device=run.device, dtype=run.dtype)
    start = time.perf_counter()
    # Every frame of path i is fed path i's inputs (class, cond row).
    x = run.generate(sampler, inputs, len(latents), "interpolate", x_last=latents,
                     indices=np.repeat(np.arange(args.num), args.frames))
    seconds = time.perf_counter() - start
    size = run.save(x, args.frames)
    print(f"decoded {args.num} slerp path(s) of {args.frames} latents ({_class_text(args, classes)}, eta 0, "
          f"{len(sampler.time_steps)} steps) in {seconds:.2f} s")
    print(f"wrote {args.out} ({size[0]}x{size[1]})")


def cmd_invert(args) -> None:
    _check_input_or_num(args)
    for flag, name, default in (("--steps", "steps", 50), ("--seed", "seed", 0)):
        if args.input is not None and getattr(args, name) is not None:
            raise UserError(f"{flag} sets the generation of the digits to invert (--invert-steps the inversion), "
                            "so it cannot go with --input, whose samples are inverted instead")
        if getattr(args, name) is None:
            setattr(args, name, default)
    env = _check_common(args)
    rows_per_sample = 1 + len(args.invert_steps)  # the originals, then one reconstruction per step count
    if args.input is None:
        _check_grid(rows_per_sample * args.num, "--num samples in 1 + len(--invert-steps) rows")
    run = _Run(args, **env)
    classes = classes_from(args.classes, run.model)
    sample_sampler = build_sampler(run.model, args) if args.input is None else None
    samplers = [build_sampler(run.model, args, s, steps_flag="--invert-steps") for s in args.invert_steps]
    x0, labels = _input_or_generated(run, args, sample_sampler, classes, rows_per_sample,
                                     "the --input samples in 1 + len(--invert-steps) rows")
    n = x0.shape[0]
    inputs = run.inputs(labels, n)
    _, extra = inputs.inputs(np.arange(min(n, args.batch_size)))
    rows = [x0]
    print(f"DDIM inversion of {n} {run.what} (guidance {extra.get('uncond_scale', 1.0):g}), then reconstruction "
          "with sample(x_last=x_T):")
    print(f"{'steps':>6} {'RMS error':>10} {'max abs':>9} {'seconds':>8}")
    for s, sampler in zip(args.invert_steps, samplers):
        bar = run.progress(2 * len(sampler.time_steps) * -(-n // args.batch_size), f"invert S={s}")
        start = time.perf_counter()
        parts = []
        for first, batch in _batches(n, args.batch_size):
            cond, extra = inputs.inputs(np.arange(n)[batch])
            x_t = sampler.invert(x0[batch], cond, callback=lambda _: bar.update(1), **extra)
            check_finite(x_t, f"invert S={s}: inverted latents", first_index=first, hint=nonfinite_hint(args))
            parts.append(sampler.sample(tuple(x0[batch].shape), cond, x_last=x_t, sample_offset=first,
                                        callback=lambda _: bar.update(1), **extra))
            check_finite(parts[-1], f"invert S={s}: reconstructions", first_index=first, hint=nonfinite_hint(args))
        bar.close()
        recon = torch.cat(parts)
        err = (recon.double() - x0.double())
        rms, worst = err.pow(2).mean().sqrt().item(), err.abs().max().item()
        print(f"{s:>6} {rms:>10.4f} {worst:>9.4f} {time.perf_counter() - start:>8.2f}")
        rows.append(recon)
    size = run.save(torch.cat(rows), n)
    print(f"wrote {args.out} ({size[0]}x{size[1]}; rows: originals, then reconstructions for "
          f"{', '.join(map(str, args.invert_steps))} steps)")


def cmd_train_digits(args) -> None:
    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if not 0 <= args.seed < _SEED_LIMIT:
        raise UserError(f"--seed must be in [0, 2**63), got {args.seed}")
    check_threads(args.threads, allow_zero=False)
    # scikit-learn (the digits data) is an optional extra: look for it without importing it.
    if importlib.util.find_spec("sklearn") is None:
        raise UserError("train-digits needs scikit-learn: pip install 'ddim-fused[train]'")
    if args.out is not None:
        check_out_folder(args.out)
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write --out {args.out!r}: {exc.strerror}") from None
        if not os.access(args.out, os.W_OK):
            raise UserError(f"cannot write --out {args.out!r}: permission denied")
    try:
        train_digits(args.out, replace_shipped=args.replace_shipped, epochs=args.epochs, seed=args.seed,
                     threads=args.threads, progress=not args.no_progress)
    except OutputPathError as exc:
        raise UserError(str(exc)) from None


COMMANDS = {"sample": cmd_sample, "paint": cmd_paint, "interpolate": cmd_interpolate, "invert": cmd_invert,
            "train-digits": cmd_train_digits, "generate": cmd_generate}


def main(argv=None) -> int:
    """Run a ddim-fused command (the entry point, ddim_fused.cli.main, calls it).

    Args:
        argv: argument list without the program name (default: sys.argv[1:]).

    Returns:
        0 on success. Otherwise it raises SystemExit after one `ddim-fused: error: ...` line
        on stderr (see ddim_fused.cli.errors): status 2 for bad arguments and unusable output
        paths, 1 for runtime failures (a full disk, NaN/Inf output), 130 for Ctrl-C.
    """
    args = build_parser().parse_args(argv)
    with one_line_warnings(), library_logs(args.debug), status_output():
        try:
            # Sampling needs no autograd; training does.
            with torch.inference_mode(args.command != "train-digits"):
                COMMANDS[args.command](args)
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure ends as one line and a status
            raise SystemExit(report(exc, debug=args.debug)) from None
    return 0
