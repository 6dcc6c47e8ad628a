"""`ddim-fused` command line: sample, paint, interpolate and invert with the embedded digits model.

Every command runs the public DDIMSampler API on the shipped 8x8 digits model and
writes an upscaled PNG. User errors print one line `ddim-fused: error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import OutputPathError
from .schedules import DISCRETIZATIONS, ddim_timesteps

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
REGIONS = ("top", "bottom", "left", "right")


class UserError(Exception):
    """A bad argument: reported as one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors read `ddim-fused: error: ...` in every subcommand."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"ddim-fused: error: {message}\n")


# ---------------------------------------------------------------------------- arguments
def _eta(text: str):
    if text == "sigma_hat":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float >= 0 or 'sigma_hat', got {text!r}") from None
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a float >= 0 or 'sigma_hat', got {text!r}")
    return value


def _classes(values) -> list[int]:
    """--class values ('3', '3 5', '3,5') as a list of ints in [0, 10)."""
    out = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            if not part.lstrip("-").isdigit() or not 0 <= int(part) <= 9:
                raise UserError(f"unknown class {part!r}: the digits model knows classes 0 to 9")
            out.append(int(part))
    if not out:
        raise UserError("--class needs at least one class in 0..9")
    return out


def _add_sampler_options(p: argparse.ArgumentParser, *, steps=50, guidance=3.0, num=10, eta=True) -> None:
    p.add_argument("--steps", type=int, default=steps,
                   help=f"number of DDIM steps S, 1..1000 (the model's training steps) (default {steps})")
    if eta:
        p.add_argument("--eta", type=_eta, default=0.0,
                       help="DDIM eta: 0 deterministic, 1 DDPM-like noise, or 'sigma_hat' (default 0)")
    p.add_argument("--discretize", choices=DISCRETIZATIONS, default="uniform",
                   help="how the S time steps are spread over the 1000 training steps (default uniform)")
    p.add_argument("--guidance", type=float, default=guidance,
                   help="classifier-free guidance scale: 1 = plain conditional model, >1 sharpens the "
                        f"class, 0 = unconditional (default {guidance})")
    p.add_argument("--seed", type=int, default=0, help="Philox noise seed: same seed, same digits (default 0)")
    p.add_argument("--num", type=int, default=num, help=f"number of digits (default {num})")
    p.add_argument("--batch-size", type=int, default=100,
                   help="digits per model batch; results do not depend on it (default 100)")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1")
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


def build_parser() -> argparse.ArgumentParser:
    """The ddim-fused argument parser with its subcommands."""
    parser = _Parser(prog="ddim-fused", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("sample", help="generate a grid of digits (PNG)",
                       description="Generate digits with DDIM and write them as an upscaled PNG grid.")
    _add_sampler_options(p, num=100)
    p.add_argument("--class", dest="classes", nargs="+", default=None, metavar="C",
                   help="class(es) to generate, e.g. --class 3 or --class 1 4 7 (cycled over the digits; "
                        "default: 0..9 cycling, one class per column)")
    p.add_argument("--out", default="samples.png", help="PNG file to write (default samples.png)")

    p = sub.add_parser("paint", help="regenerate a masked region of digits (before/mask/after PNG)",
                       description="Mask a region of generated (or given) digits and regenerate it with "
                                   "DDIMSampler.paint, keeping the rest.")
    _add_sampler_options(p, eta=False)
    p.add_argument("--input", default=None, metavar="NPY",
                   help=".npy of shape (N, 8, 8) or (N, 1, 8, 8) in [-1, 1] (default: generate --num digits)")
    p.add_argument("--class", dest="classes", nargs="+", default=None, metavar="C",
                   help="class(es) of the generated digits (default 0..9 cycling); ignored with --input")
    p.add_argument("--paint-class", dest="paint_classes", nargs="+", default=None, metavar="C",
                   help="class(es) the region is regenerated as (default: the digits' own class, or the "
                        "classifier's reading of --input digits)")
    p.add_argument("--region", choices=REGIONS, default="bottom", help="half of the digit to regenerate (default bottom)")
    p.add_argument("--blend", choices=("seed", "prev"), default="seed",
                   help="how the kept part is re-noised each step: 'seed' to the step's own alpha (labml), "
                        "'prev' to alpha_prev, the level of the new latent (default seed)")
    p.add_argument("--t-start", type=int, default=None,
                   help="DDIM steps to run, 1..--steps: the digits are noised to that step first; fewer keeps "
                        "more of the original in the region (default: --steps, the region is redrawn from noise)")
    p.add_argument("--out", default="paint.png", help="PNG file to write: rows before, mask, after (default paint.png)")

    p = sub.add_parser("interpolate", help="decode slerp-interpolated latents (strip PNG)",
                       description="Spherically interpolate between two random initial latents and decode each "
                                   "with deterministic DDIM (eta 0): one row per pair.")
    _add_sampler_options(p, guidance=1.0, num=4, eta=False)
    p.add_argument("--class", dest="classes", nargs="+", default=None, metavar="C",
                   help="class to decode every latent as (one per row, cycled; default: unconditional, so the "
                        "latent alone decides the digit)")
    p.add_argument("--frames", type=int, default=10, help="points from the first latent to the second (default 10)")
    p.add_argument("--out", default="interpolate.png", help="PNG file to write (default interpolate.png)")

    p = sub.add_parser("invert", help="DDIM inversion and reconstruction error vs steps",
                       description="Encode digits to x_T with DDIMSampler.invert, decode with sample(x_last=...), "
                                   "and print the RMS reconstruction error for each step count.")
    _add_sampler_options(p, guidance=1.0, eta=False)
    p.add_argument("--input", default=None, metavar="NPY",
                   help=".npy of shape (N, 8, 8) or (N, 1, 8, 8) in [-1, 1] (default: generate --num digits)")
    p.add_argument("--class", dest="classes", nargs="+", default=None, metavar="C",
                   help="class(es) of the generated digits (default 0..9 cycling); --input digits use the "
                        "classifier's reading")
    p.add_argument("--invert-steps", type=int, nargs="+", default=[10, 20, 50, 100], metavar="S",
                   help="step counts to invert and reconstruct with (default 10 20 50 100)")
    p.add_argument("--out", default="invert.png",
                   help="PNG file to write: originals, then one row of reconstructions per step count")

    from .digits.train import add_arguments  # noqa: PLC0415 - keeps `ddim-fused --help` light

    p = sub.add_parser("train-digits", help="retrain the embedded digits model (needs scikit-learn)",
                       description="Train the digits eps-model and its classifier from scratch, deterministically.")
    add_arguments(p)

    from .generate_cli import add_parser as add_generate  # noqa: PLC0415 - imports this module

    add_generate(sub)
    sub.add_parser("bench", add_help=False, help="run the benchmark suite (from a source checkout; "
                   "same options as `python -m bench`)")
    return parser


# ---------------------------------------------------------------------------- checks
def _check_common(args) -> dict:
    """Validate the shared options before any work; returns device, dtype, class list."""
    if not 1 <= args.steps <= 1000:
        raise UserError(f"--steps must be in 1..1000 (the model's training steps), got {args.steps}")
    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    env = _check_runtime(args)
    _check_out(args.out)
    try:
        # The model's T is 1000; uniform spacing can give more steps than asked for.
        args.n_ddim_steps = len(ddim_timesteps(1000, args.steps, args.discretize))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return env


def _check_runtime(args) -> dict:
    """Validate seed, guidance, threads, device, dtype, backend and weights; returns device, dtype."""
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63), got {args.seed}")
    if not np.isfinite(args.guidance):
        raise UserError(f"--guidance must be finite, got {args.guidance}")
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    dtype = DTYPES[args.dtype]
    if args.backend == "triton":
        if device.type == "cpu":
            # Must be set before ddim_fused.kernels imports triton.
            os.environ.setdefault("TRITON_INTERPRET", "1")
        if dtype == torch.float64:
            raise UserError("--backend triton supports float32, float16 and bfloat16, not float64")
    if args.weights is not None and not Path(args.weights).is_file():
        raise UserError(f"--weights {args.weights!r} is not a file")
    return {"device": device, "dtype": dtype}


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {text!r} is not a torch device (try cpu, cuda or cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {text!r} asks for CUDA, which is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {text!r}: only cpu and cuda are supported")
    return device


def _check_out(path: str) -> None:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {path!r}")
    if out.is_dir():
        raise UserError(f"--out {path!r} is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write --out {path!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"cannot write --out {path!r}: permission denied")


def _load_npy(path: str, device, dtype) -> torch.Tensor:
    """Digits from an .npy file as (N, 1, 8, 8)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read --input {path!r}: {exc}") from None
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or array.shape[1:] != (1, 8, 8) or array.shape[0] < 1:
        raise UserError(f"--input {path!r} has shape {array.shape}, expected (N, 8, 8) or (N, 1, 8, 8)")
    if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
        raise UserError(f"--input {path!r} must hold finite numbers")
    if array.min() < -1.001 or array.max() > 1.001:
        raise UserError(f"--input {path!r} has values in [{array.min():.3g}, {array.max():.3g}], expected [-1, 1]")
    return torch.from_numpy(array.astype(np.float32)).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------- helpers
class _Run:
    """The loaded model, a progress bar and batched sampling shared by the commands."""

    def __init__(self, args, device, dtype):
        from .digits import load_digits_model  # noqa: PLC0415

        self.args, self.device, self.dtype = args, device, dtype
        try:
            self.model = load_digits_model(device=device, dtype=dtype, path=args.weights)
        except FileNotFoundError as exc:
            raise UserError(f"no digits model weights at {exc.filename} (run ddim-fused train-digits)") from None

    def sampler(self, steps: int, eta=0.0):
        from . import DDIMSampler  # noqa: PLC0415

        try:
            return DDIMSampler(self.model, steps, self.args.discretize, eta, backend=self.args.backend,
                               seed=self.args.seed)
        except (ValueError, TypeError) as exc:
            raise UserError(str(exc)) from None

    def progress(self, total: int, desc: str):
        from tqdm import tqdm  # noqa: PLC0415

        return tqdm(total=total, desc=desc, unit="step", leave=False, disable=self.args.no_progress,
                    file=sys.stderr)

    def guidance_args(self, n: int) -> dict:
        if self.args.guidance == 1.0:
            return {}
        return {"uncond_scale": self.args.guidance, "uncond_cond": self.model.null_cond(n)}

    def cond(self, labels) -> torch.Tensor:
        return self.model.cond(labels) if labels is not None else None

    def generate(self, sampler, labels, n: int, desc: str, x_last=None, guided: bool = True) -> torch.Tensor:
        """n digits of the given labels (None: unconditional), batched, Philox-seeded."""
        bs = self.args.batch_size
        bar = self.progress(len(sampler.time_steps) * -(-n // bs), desc)
        out = []
        for start in range(0, n, bs):
            b = min(bs, n - start)
            if labels is None:
                cond, extra = self.model.null_cond(b), {}
            else:
                cond = self.model.cond(labels[start:start + b])
                extra = self.guidance_args(b) if guided else {}
            x = sampler.sample((b, 1, 8, 8), cond, seed=self.args.seed, sample_offset=start,
                               device=self.device, dtype=self.dtype,
                               x_last=None if x_last is None else x_last[start:start + b],
                               callback=lambda _: bar.update(1), **extra)
            out.append(x)
        bar.close()
        return torch.cat(out)


def _cycle(classes, n):
    return [classes[i % len(classes)] for i in range(n)]


def _classify(x: torch.Tensor) -> torch.Tensor:
    from .digits import load_digits_classifier  # noqa: PLC0415

    return load_digits_classifier().predict(x.float().cpu())


# ---------------------------------------------------------------------------- commands
def cmd_sample(args) -> None:
    env = _check_common(args)
    classes = _classes(args.classes) if args.classes is not None else list(range(10))
    run = _Run(args, **env)
    sampler = run.sampler(args.steps, args.eta)
    labels = _cycle(classes, args.num)
    start = time.perf_counter()
    x = run.generate(sampler, labels, args.num, "sample")
    seconds = time.perf_counter() - start
    from .digits.images import save_grid  # noqa: PLC0415

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
    env = _check_common(args)
    t_start = args.n_ddim_steps if args.t_start is None else args.t_start
    if not 1 <= t_start <= args.n_ddim_steps:
        raise UserError(f"--t-start must be in 1..{args.n_ddim_steps} (the DDIM steps), got {t_start}")
    paint_classes = _classes(args.paint_classes) if args.paint_classes is not None else None
    classes = _classes(args.classes) if args.classes is not None else list(range(10))
    x0 = _load_npy(args.input, env["device"], env["dtype"]) if args.input else None
    run = _Run(args, **env)
    sampler = run.sampler(args.steps)
    sampler.paint_blend = args.blend
    if x0 is None:
        labels = _cycle(classes, args.num)
        x0 = run.generate(sampler, labels, args.num, "generate")
    else:
        labels = _classify(x0).tolist()
    n = x0.shape[0]
    paint_labels = _cycle(paint_classes, n) if paint_classes is not None else labels
    mask = _region_mask(args.region, n, run.device, run.dtype)
    start = time.perf_counter()
    bar = run.progress(t_start, "paint")
    x = sampler.q_sample(x0, t_start - 1, seed=args.seed + 1)
    after = sampler.paint(x, run.model.cond(paint_labels), t_start, orig=x0, mask=mask, seed=args.seed + 1,
                          callback=lambda _: bar.update(1), **run.guidance_args(n))
    bar.close()
    seconds = time.perf_counter() - start
    from .digits.images import save_grid  # noqa: PLC0415

    shown = torch.where(mask > 0, x0, torch.zeros_like(x0))  # the region to redraw shows as mid-grey
    size = save_grid(torch.cat([x0, shown, after]), args.out, n)
    agree = int((_classify(after) == torch.tensor(paint_labels)).sum())
    print(f"painted the {args.region} half of {n} digits: {t_start} of {len(sampler.time_steps)} DDIM steps, "
          f"blend {args.blend}, guidance {args.guidance}, seed {args.seed}; {seconds:.2f} s, "
          f"{1000 * seconds / t_start:.1f} ms per step")
    print(f"classifier reads the requested class in {agree}/{n} painted digits")
    print(f"wrote {args.out} ({size[0]}x{size[1]}; rows: before, mask, after)")


def cmd_interpolate(args) -> None:
    env = _check_common(args)
    if args.frames < 2:
        raise UserError(f"--frames must be >= 2, got {args.frames}")
    classes = _classes(args.classes) if args.classes is not None else None
    from . import slerp  # noqa: PLC0415

    gen = torch.Generator().manual_seed(args.seed)
    ends = torch.randn((args.num, 2, 1, 8, 8), generator=gen, dtype=torch.float64)
    weights = torch.linspace(0, 1, args.frames, dtype=torch.float64)
    latents = torch.cat([slerp(pair[0], pair[1], weights) for pair in ends])
    latents = latents.to(device=env["device"], dtype=env["dtype"])
    run = _Run(args, **env)
    sampler = run.sampler(args.steps, 0.0)
    labels = None if classes is None else [c for c in _cycle(classes, args.num) for _ in range(args.frames)]
    start = time.perf_counter()
    x = run.generate(sampler, labels, len(latents), "interpolate", x_last=latents)
    seconds = time.perf_counter() - start
    from .digits.images import save_grid  # noqa: PLC0415

    size = save_grid(x, args.out, args.frames)
    cond_text = "unconditional" if classes is None else f"class {','.join(map(str, classes))}"
    print(f"decoded {args.num} slerp path(s) of {args.frames} latents ({cond_text}, eta 0, "
          f"{len(sampler.time_steps)} steps) in {seconds:.2f} s")
    print(f"wrote {args.out} ({size[0]}x{size[1]})")


def cmd_invert(args) -> None:
    env = _check_common(args)
    for s in args.invert_steps:
        if not 1 <= s <= 1000:
            raise UserError(f"--invert-steps must be in 1..1000, got {s}")
    classes = _classes(args.classes) if args.classes is not None else list(range(10))
    x0 = _load_npy(args.input, env["device"], env["dtype"]) if args.input else None
    run = _Run(args, **env)
    if x0 is None:
        labels = _cycle(classes, args.num)
        x0 = run.generate(run.sampler(args.steps), labels, args.num, "generate")
    else:
        labels = _classify(x0).tolist()
    n = x0.shape[0]
    cond = run.model.cond(labels)
    rows = [x0]
    print(f"DDIM inversion of {n} digits (guidance {args.guidance}), then reconstruction with sample(x_last=x_T):")
    print(f"{'steps':>6} {'RMS error':>10} {'max abs':>9} {'seconds':>8}")
    for s in args.invert_steps:
        sampler = run.sampler(s, 0.0)
        bar = run.progress(2 * len(sampler.time_steps), f"invert S={s}")
        start = time.perf_counter()
        x_t = sampler.invert(x0, cond, callback=lambda _: bar.update(1), **run.guidance_args(n))
        recon = sampler.sample(tuple(x0.shape), cond, x_last=x_t, callback=lambda _: bar.update(1),
                               **run.guidance_args(n))
        bar.close()
        err = (recon.double() - x0.double())
        rms, worst = err.pow(2).mean().sqrt().item(), err.abs().max().item()
        print(f"{s:>6} {rms:>10.4f} {worst:>9.4f} {time.perf_counter() - start:>8.2f}")
        rows.append(recon)
    from .digits.images import save_grid  # noqa: PLC0415

    size = save_grid(torch.cat(rows), args.out, n)
    print(f"wrote {args.out} ({size[0]}x{size[1]}; rows: originals, then reconstructions for "
          f"{', '.join(map(str, args.invert_steps))} steps)")


def cmd_train_digits(args) -> None:
    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    try:
        import sklearn  # noqa: F401, PLC0415
    except ImportError:
        raise UserError("train-digits needs scikit-learn: pip install 'ddim-fused[train]'") from None
    from .digits.train import train_digits  # noqa: PLC0415

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
            "train-digits": cmd_train_digits}


def _cmd_generate(args) -> None:
    from .generate_cli import cmd_generate  # noqa: PLC0415

    cmd_generate(args)


COMMANDS["generate"] = _cmd_generate


def _run_bench(argv) -> int:
    """`ddim-fused bench ...` is `python -m bench ...`: bench/ ships with the source, not the wheel."""
    if os.path.isdir("bench") and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the console script's own folder is first on the path, not the checkout
    try:
        from bench.run import main as bench_main  # noqa: PLC0415
    except ImportError:
        print("ddim-fused: error: ddim-fused bench runs from a source checkout (its bench/ folder): cd there "
              "and retry", file=sys.stderr)
        return 2
    return bench_main(argv)


def main(argv=None) -> int:
    """Entry point of `ddim-fused` and `python -m ddim_fused`.

    Args:
        argv: argument list without the program name (default: sys.argv[1:]).

    Returns:
        0 on success; user errors exit with status 2 through SystemExit.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its options are the benchmark runner's own
        raise SystemExit(_run_bench(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except UserError as exc:
        print(f"ddim-fused: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0
