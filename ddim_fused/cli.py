"""`ddim-fused` command line: sample, paint, interpolate and invert with the embedded digits model.

Every command runs the public DDIMSampler API on the shipped 8x8 digits model and
writes an upscaled PNG; `generate` writes sharded bulk runs. Every argument is checked
before any work starts. Bad arguments print one line `ddim-fused: error: ...` and exit 2;
runtime failures (a full disk, NaN/Inf output) exit 1; Ctrl-C exits 130 and leaves no
partial file. No traceback is printed unless --debug is given.

The benchmark suite is not a subcommand: it runs from a source checkout as `python -m bench`.
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .atomic import TEMP_SUFFIX, OutputPathError
from .cli_errors import UserError, one_line, one_line_warnings, report
from .cli_options import (
    add_sampler_options,
    build_sampler,
    check_at_most,
    check_positive,
    check_runtime,
    check_t_start,
    check_threads,
    load_model,
    nonfinite_hint,
    parse_classes,
)
from .digits import load_digits_classifier
from .digits.images import save_grid
from .digits.train import add_arguments as add_train_arguments
from .digits.train import train_digits
from .finite import check_finite
from .generate_cli import add_parser as add_generate_parser
from .generate_cli import cmd_generate
from .interpolation import slerp

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


def build_parser() -> argparse.ArgumentParser:
    """The ddim-fused argument parser with its subcommands."""
    parser = _Parser(prog="ddim-fused", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("sample", help="generate a grid of digits (PNG)",
                       description="Generate digits with DDIM and write them as an upscaled PNG grid.")
    add_sampler_options(p, num=100)
    p.add_argument("--class", dest="classes", nargs="+", default=None, metavar="C",
                   help="class(es) to generate, e.g. --class 3 or --class 1 4 7 (cycled over the digits; "
                        "default: 0..9 cycling, one class per column)")
    p.add_argument("--out", default="samples.png", help="PNG file to write (default samples.png)")

    p = sub.add_parser("paint", help="regenerate a masked region of digits (before/mask/after PNG)",
                       description="Mask a region of generated (or given) digits and regenerate it with "
                                   "DDIMSampler.paint, keeping the rest.")
    add_sampler_options(p, eta=False)
    _add_input_option(p)
    p.add_argument("--class", dest="classes", nargs="+", default=None, metavar="C",
                   help="class(es) of the generated digits (default 0..9 cycling); not with --input")
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
                   help="class(es) of the generated digits (default 0..9 cycling); not with --input, whose "
                        "digits use the classifier's reading")
    p.add_argument("--invert-steps", type=int, nargs="+", default=[10, 20, 50, 100], metavar="S",
                   help="step counts to invert and reconstruct with (default 10 20 50 100)")
    p.add_argument("--out", default="invert.png",
                   help="PNG file to write: originals, then one row of reconstructions per step count")

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
                   help=".npy of shape (N, 8, 8) or (N, 1, 8, 8) in [-1, 1] (default: generate --num digits)")
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
    """paint/invert: --input replaces --num and the generated digits' --class; else --num defaults to 10."""
    if args.input is None:
        args.num = DEFAULT_NUM if args.num is None else args.num
        return
    for given, flag in ((args.num is not None, "--num"), (args.classes is not None, "--class")):
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


def _load_npy(path: str, device, dtype) -> torch.Tensor:
    """--input digits: an .npy of shape (N, 8, 8) or (N, 1, 8, 8) in [-1, 1], as (N, 1, 8, 8)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise UserError(f"cannot read --input {path!r}: {exc.strerror}") from None
    except Exception as exc:  # noqa: BLE001 - an empty or foreign file makes np.load raise nearly anything
        detail = one_line(str(exc))[:200]
        raise UserError(f"--input {path!r} is not a .npy file ({type(exc).__name__}: {detail})") from None
    if not isinstance(array, np.ndarray):  # np.load opens an .npz archive as an NpzFile
        array.close()
        raise UserError(f"--input {path!r} is an .npz archive; expected a .npy file of shape (N, 8, 8) or "
                        "(N, 1, 8, 8)")
    shape = array.shape
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or array.shape[1:] != (1, 8, 8):
        raise UserError(f"--input {path!r} has shape {shape}, expected (N, 8, 8) or (N, 1, 8, 8)")
    if array.shape[0] == 0:
        raise UserError(f"--input {path!r} holds no digits (shape {shape})")
    if array.dtype.kind not in "iuf":
        raise UserError(f"--input {path!r} holds {array.dtype} values, expected real numbers (float or int)")
    if not np.all(np.isfinite(array)):
        raise UserError(f"--input {path!r} must hold finite numbers")
    if array.min() < -1.001 or array.max() > 1.001:
        raise UserError(f"--input {path!r} has values in [{array.min():.3g}, {array.max():.3g}], expected [-1, 1]")
    return torch.from_numpy(array.astype(np.float32)).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------- helpers
class _Run:
    """The loaded model, a progress bar and batched sampling shared by the commands."""

    def __init__(self, args, device, dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.model = load_model(args.weights, device, dtype)

    def progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="step", leave=False, disable=self.args.no_progress,
                    file=sys.stderr)

    def guidance_args(self, n: int) -> dict:
        """sample/paint/invert keyword arguments of --guidance for a batch of n."""
        if self.args.guidance == 1.0:
            return {}
        return {"uncond_scale": self.args.guidance, "uncond_cond": self.model.null_cond(n)}

    def generate(self, sampler, labels, n: int, desc: str, x_last=None) -> torch.Tensor:
        """n digits (N, 1, 8, 8) of the given labels (None: unconditional), batched, Philox-seeded.

        x_last: (n, 1, 8, 8) starting latents, or None for the seed's noise.
        """
        bs = self.args.batch_size
        bar = self.progress(len(sampler.time_steps) * -(-n // bs), desc)
        out = []
        for start in range(0, n, bs):
            b = min(bs, n - start)
            if labels is None:
                cond, extra = self.model.null_cond(b), {}
            else:
                cond, extra = self.model.cond(labels[start:start + b]), self.guidance_args(b)
            x = sampler.sample((b, 1, 8, 8), cond, seed=self.args.seed, sample_offset=start,
                               device=self.device, dtype=self.dtype,
                               x_last=None if x_last is None else x_last[start:start + b],
                               callback=lambda _: bar.update(1), **extra)
            check_finite(x, f"{desc}: digits", first_index=start, hint=nonfinite_hint(self.args))
            out.append(x)
        bar.close()
        return torch.cat(out)


def _cycle(classes, n):
    return [classes[i % len(classes)] for i in range(n)]


def _classify(x: torch.Tensor) -> torch.Tensor:
    return load_digits_classifier().predict(x.float().cpu())


# ---------------------------------------------------------------------------- commands
def cmd_sample(args) -> None:
    env = _check_common(args)
    classes = parse_classes(args.classes) if args.classes is not None else list(range(10))
    run = _Run(args, **env)
    sampler = build_sampler(run.model, args)
    labels = _cycle(classes, args.num)
    start = time.perf_counter()
    x = run.generate(sampler, labels, args.num, "sample")
    seconds = time.perf_counter() - start
    ncols = min(args.num, len(classes) if len(classes) > 1 else max(1, int(np.ceil(np.sqrt(args.num)))))
    size = save_grid(x, args.out, ncols)
    n_steps = len(sampler.time_steps)
    agree = int((_classify(x) == torch.tensor(labels)).sum())
    class_text = "0..9 cycling" if args.classes is None else ",".join(map(str, classes))
    print(f"sampled {args.num} digits (class {class_text}) with {n_steps} DDIM steps ({args.discretize}), "
          f"eta {args.eta}, guidance {args.guidance}, seed {args.seed}, {run.device} {args.dtype}, "
          f"backend {args.backend}")
    print(f"time: {seconds:.2f} s, {1000 * seconds / n_steps:.1f} ms per step "
          f"(all {args.num} digits, batch size {args.batch_size})")
    print(f"classifier reads the requested class in {agree}/{args.num} digits")
    print(f"wrote {args.out} ({size[0]}x{size[1]})")


def _region_mask(region: str, n: int, device, dtype) -> torch.Tensor:
    """(n, 1, 8, 8) mask: 1 keeps the original, 0 marks the half to regenerate."""
    mask = torch.ones(n, 1, 8, 8, device=device, dtype=dtype)
    half = {"top": (slice(None), slice(0, 4), slice(None)), "bottom": (slice(None), slice(4, 8), slice(None)),
            "left": (slice(None), slice(None), slice(0, 4)), "right": (slice(None), slice(None), slice(4, 8))}[region]
    mask[(slice(None),) + half] = 0
    return mask


def cmd_paint(args) -> None:
    _check_input_or_num(args)
    env = _check_common(args)
    if args.input is None:
        _check_grid(3 * args.num, "3 rows (before, mask, after) of --num digits")
    paint_classes = parse_classes(args.paint_classes) if args.paint_classes is not None else None
    classes = parse_classes(args.classes) if args.classes is not None else list(range(10))
    run = _Run(args, **env)
    sampler = build_sampler(run.model, args, paint_blend=args.blend)
    t_start = len(sampler.time_steps) if args.t_start is None else check_t_start(sampler, args.t_start)
    x0 = _load_npy(args.input, run.device, run.dtype) if args.input is not None else None
    if x0 is not None:
        _check_grid(3 * x0.shape[0], "3 rows (before, mask, after) of the --input digits")
    if x0 is None:
        labels = _cycle(classes, args.num)
        x0 = run.generate(sampler, labels, args.num, "generate")
    else:
        labels = _classify(x0).tolist()
    n = x0.shape[0]
    paint_labels = _cycle(paint_classes, n) if paint_classes is not None else labels
    mask = _region_mask(args.region, n, run.device, run.dtype)
    paint_seed = (args.seed + 1) % _SEED_LIMIT  # a stream apart from the one that drew the digits
    start = time.perf_counter()
    bar = run.progress(t_start, "paint")
    x = sampler.q_sample(x0, t_start - 1, seed=paint_seed)
    after = sampler.paint(x, run.model.cond(paint_labels), t_start, orig=x0, mask=mask, seed=paint_seed,
                          callback=lambda _: bar.update(1), **run.guidance_args(n))
    bar.close()
    check_finite(after, "paint: painted digits", hint=nonfinite_hint(args))
    seconds = time.perf_counter() - start
    shown = torch.where(mask > 0, x0, torch.zeros_like(x0))  # the region to redraw shows as mid-grey
    size = save_grid(torch.cat([x0, shown, after]), args.out, n)
    agree = int((_classify(after) == torch.tensor(paint_labels)).sum())
    print(f"painted the {args.region} half of {n} digits: {t_start} of {len(sampler.time_steps)} DDIM steps, "
          f"blend {args.blend}, guidance {args.guidance}, seed {args.seed}; {seconds:.2f} s, "
          f"{1000 * seconds / t_start:.1f} ms per step")
    print(f"classifier reads the requested class in {agree}/{n} painted digits")
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
    classes = parse_classes(args.classes) if args.classes is not None else None
    run = _Run(args, **env)
    sampler = build_sampler(run.model, args)
    gen = torch.Generator().manual_seed(args.seed)
    ends = torch.randn((args.num, 2, 1, 8, 8), generator=gen, dtype=torch.float64)
    weights = torch.linspace(0, 1, args.frames, dtype=torch.float64)
    latents = torch.cat([slerp(pair[0], pair[1], weights) for pair in ends])
    latents = latents.to(device=run.device, dtype=run.dtype)
    labels = None if classes is None else [c for c in _cycle(classes, args.num) for _ in range(args.frames)]
    start = time.perf_counter()
    x = run.generate(sampler, labels, len(latents), "interpolate", x_last=latents)
    seconds = time.perf_counter() - start
    size = save_grid(x, args.out, args.frames)
    cond_text = "unconditional" if classes is None else f"class {','.join(map(str, classes))}"
    print(f"decoded {args.num} slerp path(s) of {args.frames} latents ({cond_text}, eta 0, "
          f"{len(sampler.time_steps)} steps) in {seconds:.2f} s")
    print(f"wrote {args.out} ({size[0]}x{size[1]})")


def cmd_invert(args) -> None:
    _check_input_or_num(args)
    env = _check_common(args)
    rows_per_digit = 1 + len(args.invert_steps)  # the originals, then one reconstruction per step count
    if args.input is None:
        _check_grid(rows_per_digit * args.num, "--num digits in 1 + len(--invert-steps) rows")
    classes = parse_classes(args.classes) if args.classes is not None else list(range(10))
    run = _Run(args, **env)
    digits_sampler = build_sampler(run.model, args)
    samplers = [build_sampler(run.model, args, s, steps_flag="--invert-steps") for s in args.invert_steps]
    x0 = _load_npy(args.input, run.device, run.dtype) if args.input is not None else None
    if x0 is not None:
        _check_grid(rows_per_digit * x0.shape[0], "the --input digits in 1 + len(--invert-steps) rows")
    if x0 is None:
        labels = _cycle(classes, args.num)
        x0 = run.generate(digits_sampler, labels, args.num, "generate")
    else:
        labels = _classify(x0).tolist()
    n = x0.shape[0]
    cond = run.model.cond(labels)
    rows = [x0]
    print(f"DDIM inversion of {n} digits (guidance {args.guidance}), then reconstruction with sample(x_last=x_T):")
    print(f"{'steps':>6} {'RMS error':>10} {'max abs':>9} {'seconds':>8}")
    for s, sampler in zip(args.invert_steps, samplers):
        bar = run.progress(2 * len(sampler.time_steps), f"invert S={s}")
        start = time.perf_counter()
        x_t = sampler.invert(x0, cond, callback=lambda _: bar.update(1), **run.guidance_args(n))
        check_finite(x_t, f"invert S={s}: inverted latents", hint=nonfinite_hint(args))
        recon = sampler.sample(tuple(x0.shape), cond, x_last=x_t, callback=lambda _: bar.update(1),
                               **run.guidance_args(n))
        bar.close()
        check_finite(recon, f"invert S={s}: reconstructions", hint=nonfinite_hint(args))
        err = (recon.double() - x0.double())
        rms, worst = err.pow(2).mean().sqrt().item(), err.abs().max().item()
        print(f"{s:>6} {rms:>10.4f} {worst:>9.4f} {time.perf_counter() - start:>8.2f}")
        rows.append(recon)
    size = save_grid(torch.cat(rows), args.out, n)
    print(f"wrote {args.out} ({size[0]}x{size[1]}; rows: originals, then reconstructions for "
          f"{', '.join(map(str, args.invert_steps))} steps)")


def cmd_train_digits(args) -> None:
    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    check_threads(args.threads, allow_zero=False)
    # scikit-learn (the digits data) is an optional extra: look for it without importing it.
    if importlib.util.find_spec("sklearn") is None:
        raise UserError("train-digits needs scikit-learn: pip install 'ddim-fused[train]'")
    if args.out is not None:
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
    """Entry point of `ddim-fused` and `python -m ddim_fused`.

    Args:
        argv: argument list without the program name (default: sys.argv[1:]).

    Returns:
        0 on success. Otherwise it raises SystemExit after one `ddim-fused: error: ...` line
        on stderr (see ddim_fused.cli_errors): status 2 for bad arguments and unusable output
        paths, 1 for runtime failures (a full disk, NaN/Inf output), 130 for Ctrl-C.
    """
    args = build_parser().parse_args(argv)
    with one_line_warnings():
        try:
            COMMANDS[args.command](args)
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure ends as one line and a status
            status = report(exc, debug=args.debug)
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                _silence_stdout()
            raise SystemExit(status) from None
    return 0


def _silence_stdout() -> None:
    """After a closed pipe (`ddim-fused ... | head`), send stdout to devnull so that Python's
    final flush does not print a second error."""
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (captured, or already closed)
        pass
