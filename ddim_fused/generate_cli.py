"""`ddim-fused generate`: bulk generation with the embedded digits model (see generate.py)."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from . import generate as gen
from .cli import UserError, _add_sampler_options, _check_runtime, _classes


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="bulk generation into resumable shards (torchrun for several processes)",
        description="Generate --num digits into DIR as .npz shards plus manifest.json and a preview grid. "
                    "Rerunning the same command resumes: complete shards are kept, missing or corrupt ones "
                    "are redone. Sample i depends only on (--seed, i), never on batch size, shard size, "
                    "process count or resume point. Under `torchrun --nproc-per-node P -m ddim_fused generate "
                    "...` the shards are split across the P processes.",
    )
    _add_sampler_options(p, num=1000)
    p.add_argument("--class", dest="classes", nargs="+", default=None, metavar="C",
                   help="class(es); sample i gets classes[i %% len(classes)] (default 0..9)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard file (default 1000)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if needed)")


def _weights_sha256(path) -> str:
    from .digits.pretrained import MODEL_FILE  # noqa: PLC0415

    with open(path or MODEL_FILE, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cmd_generate(args) -> None:
    for name in ("num", "batch_size", "shard_size", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = _check_runtime(args)["device"]
    try:
        config = gen.GenerateConfig(
            num=args.num, shard_size=args.shard_size, batch_size=args.batch_size, steps=args.steps, eta=args.eta,
            discretize=args.discretize, guidance=args.guidance,
            classes=tuple(_classes(args.classes) if args.classes else range(10)), seed=args.seed,
            dtype=args.dtype, device=device.type, backend=args.backend,
        )
        from .sampler import DDIMSampler  # noqa: PLC0415 - validates steps/eta/discretize up front

        DDIMSampler(lambda x, t, c: x, args.steps, args.discretize, args.eta, alpha_bar="linear")
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None
    info = {"name": "digits", "weights_sha256": _weights_sha256(args.weights)}

    def make_model(dev):
        from .digits import load_digits_model  # noqa: PLC0415

        return load_digits_model(device=dev, dtype=getattr(torch, args.dtype), path=args.weights)

    out = Path(args.out)
    try:
        summary = gen.run_generation(args.out, config, make_model, info, progress=not args.no_progress, preview=True)
    except (gen.RunMismatchError, gen.RunLockedError, gen.OutputPathError) as exc:
        raise UserError(str(exc)) from None
    except (gen.NonFiniteError, gen.RankFailedError) as exc:
        print(f"ddim-fused: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as exc:
        print(f"ddim-fused: error: {exc}; finished shards in {out} are kept: rerun the same command to resume",
              file=sys.stderr)
        raise SystemExit(1) from None
    if summary["rank"] != 0:
        return
    print(f"generated {summary['samples_written']} samples in {summary['seconds']:.1f} s "
          f"({summary['samples_per_s']:.1f} samples/s, {summary['world_size']} process(es)); "
          f"{summary['shards_skipped']} complete shard(s) kept; {config.num} samples in {out}")

