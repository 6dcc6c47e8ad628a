"""`ddim-fused generate`: bulk generation with the digits model or any --model (see generate.py)."""
from __future__ import annotations

import warnings

import torch

from .. import generate as gen
from ..atomic import check_output_dir
from .errors import EXIT_FAILURE, Interrupted, RuntimeFailure, classify
from .model import classes_from, conditioning, guidance, load_cli_model, run_identity
from .options import (UserError, add_prompt_options, add_sampler_options, build_sampler, check_at_most,
                      check_out_folder, check_positive, check_runtime, flag_names)

# Sample i's noise is keyed by its index, which the Philox stream holds in 32 bits.
MAX_SAMPLES = 2**32


def add_parser(sub) -> None:
    """Add the `generate` subcommand to the ddim-fused subparsers `sub`."""
    p = sub.add_parser(
        "generate", help="bulk generation into resumable shards (torchrun for several processes)",
        description="Generate --num samples into DIR as shards (--format npz, png or webdataset) plus "
                    "manifest.json and a preview grid. "
                    "Rerunning the same command resumes: complete shards are kept, missing or corrupt ones "
                    "are redone. Sample i depends only on (--seed, i), never on batch size, shard size, "
                    "process count or resume point: it starts from ddim_fused.initial_noise(shape, seed, "
                    "sample_offset=i). Under `torchrun --nproc-per-node P -m ddim_fused -- generate ...` the "
                    "shards are split across the P processes.",
    )
    add_sampler_options(p, num=1000)
    p.add_argument("--class", dest="classes", nargs="+", default=None, metavar="C",
                   help="class(es) of a class-conditional model; sample i gets classes[i %% len(classes)] "
                        "(default: all of the model's classes, 0..9 for digits)")
    add_prompt_options(p)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard file (default 1000)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each batch shape's whole S-step loop, model included, as one CUDA graph and "
                        "replay it (CUDA only; the model must be capturable: no host syncs). A run keeps its "
                        "choice on resume")
    p.add_argument("--format", dest="output_format", choices=gen.FORMATS, default="npz",
                   help="shard format: npz (arrays: images or latents, default), png (a folder of one PNG per "
                        "sample plus metadata.jsonl per shard) or webdataset (tar shards of KEY.png + KEY.json); "
                        "png and webdataset store images as 8-bit pixels")
    p.add_argument("--overwrite-mismatched", action="store_true",
                   help="replace what another configuration left in --out (its run.json, manifest and shards) "
                        "instead of refusing the folder; without it such a folder exits with status 2")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if needed)")


def cmd_generate(args) -> None:
    """Run `ddim-fused generate` from parsed arguments (see add_parser)."""
    check_out_folder(args.out)
    check_positive(args, "num", "batch_size", "shard_size")
    check_at_most(args, "num", MAX_SAMPLES, "the noise stream's sample index space")
    env = check_runtime(args)
    if args.cuda_graph and env["device"].type != "cuda":
        raise UserError(f"--cuda-graph needs a CUDA device (--device cuda), got --device {args.device}")
    # The sampler checks steps, eta, discretize, seed and backend: build the one the run
    # builds, before any file is written. The model goes on the CPU here because under
    # torchrun each process later puts it on its own device; this must not touch CUDA.
    cpu_model = load_cli_model(args, torch.device("cpu"), env["dtype"])
    classes = classes_from(args.classes, cpu_model)
    cpu_inputs = conditioning(cpu_model, args, classes, args.num)
    build_sampler(cpu_model, args)
    try:
        config = gen.GenerateConfig(
            num=args.num, shard_size=args.shard_size, batch_size=args.batch_size, steps=args.steps, eta=args.eta,
            discretize=args.discretize or cpu_model.discretize, guidance=guidance(args, cpu_model),
            classes=None if classes is None else tuple(classes), seed=args.seed, dtype=args.dtype,
            device=env["device"].type, backend=args.backend, cuda_graph=args.cuda_graph, format=args.output_format,
        )
        gen.check_format(config.format, cpu_model)
    except ValueError as exc:
        raise UserError(flag_names(str(exc), {"format": "--format"})) from None
    info = run_identity(cpu_model, cpu_inputs, args)

    def make_model(device: torch.device):
        if device.type == "cpu":
            return cpu_inputs
        with warnings.catch_warnings():  # the CPU copy above has warned about the same model and inputs
            warnings.simplefilter("ignore")
            return conditioning(load_cli_model(args, device, env["dtype"]), args, classes, args.num)

    out = check_output_dir(args.out, "--out")  # the engine checks it too; this names the flag
    kept = f"finished shards in {out} are kept: rerun the same command to resume"
    # Usage errors (a locked or foreign folder, an unusable --out) and NaN output pass to
    # ddim_fused.cli.errors as they are; these two say what a rerun will do.
    try:
        summary = gen.run_generation(args.out, config, make_model, info, progress=not args.no_progress, preview=True,
                                     overwrite_mismatched=args.overwrite_mismatched)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {kept}") from None
    except OSError as exc:
        if classify(exc)[0] != EXIT_FAILURE:
            raise
        raise RuntimeFailure(f"{exc}; {kept}") from None
    if summary["rank"] != 0:
        return
    print(f"generated {summary['samples_written']} samples in {summary['seconds']:.1f} s "
          f"({summary['samples_per_s']:.1f} samples/s, {summary['world_size']} process(es)); "
          f"{summary['shards_skipped']} complete shard(s) kept; {config.num} samples in {out}")
