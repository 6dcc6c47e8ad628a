"""The benchmark runner behind `python -m bench`."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ddim_fused.atomic import OutputPathError, check_output_dir
from ddim_fused.backend import interpreter_on

# None of these imports ddim_fused.kernels. Its @triton.jit decorators read
# TRITON_INTERPRET when that module is imported, which happens only when a Triton step is
# first built (bench.providers imports the kernels lazily): after main() has decided the
# variable. bench/test_run.py checks that importing this module leaves the kernels alone.
from . import report
from .loop import run_loops
from .cases import shape_id
from .matrix import plan
from .parity import run_parity, summarize
from .plot import plot
from .providers import ALL as PROVIDERS
from .providers import BASELINES, CLAIM_BASELINES, Providers, availability
from .step import run_steps
from .timing import cache_bytes, copy_bandwidth, environment, tune_malloc

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MAX_THREADS = 4 * (os.cpu_count() or 1)  # more only oversubscribes the cores (torch crashes on absurd counts)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the runner's options to `parser` (a new one if None) and return it."""
    parser = parser or argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small matrix (under 2 minutes on a CPU)")
    parser.add_argument("--out-dir", type=_folder, default=None,
                        help="results folder (default bench/results/<cpu|gpu>-<date>[-quick])")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--budget", type=float, default=None, help="seconds spent timing each measurement")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine, multi-thread barriers "
                             "stall behind other processes and the timings become noise)")
    parser.add_argument("--providers", default=None, help="comma-separated subset of step providers")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="CPU: keep glibc's default trimming (each large tensor allocation page-faults)")
    parser.add_argument("--skip-loops", action="store_true", help="skip the whole-loop benchmark")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    return parser


def _folder(text: str) -> Path:
    """--out-dir: a folder name; an empty one would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty path")
    return Path(text)


def main(argv=None) -> int:
    """Run the benchmark; returns the exit status (non-zero when parity fails).

    Args:
        argv: command-line arguments (default sys.argv[1:]).

    Returns:
        0 on success, 1 if a parity check failed (timings are kept, speedups withheld).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    device = check_args(parser, args)
    malloc_tuned = False
    if device.type != "cuda":
        # On a CPU the kernel can only be parity-checked through the interpreter; set
        # before ddim_fused.kernels is first imported (see the note at the imports).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(args.threads)
        if not args.no_malloc_tuning:
            malloc_tuned = tune_malloc()
    return _run(args, device, malloc_tuned)


def check_args(parser: argparse.ArgumentParser, args) -> torch.device:
    """Check every option before any work; a bad one ends in parser.error (exit status 2).

    Returns:
        the torch device to run on. --providers becomes a list of names and --out-dir is
        created if needed.
    """
    device = _parse_device(parser, args.device)
    if not 1 <= args.threads <= MAX_THREADS:
        parser.error(f"argument --threads: expected 1 to {MAX_THREADS} (4 per CPU core here), got {args.threads}")
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        parser.error(f"argument --budget: expected a positive number of seconds, got {args.budget}")
    if args.providers is not None:
        names = [name.strip() for name in args.providers.split(",") if name.strip()]
        unknown = [name for name in names if name not in PROVIDERS]
        if unknown or not names:
            parser.error(f"argument --providers: expected a comma-separated subset of {','.join(PROVIDERS)}, "
                         f"got {args.providers!r}")
        args.providers = list(dict.fromkeys(names))
    if args.out_dir is not None:
        try:
            check_output_dir(args.out_dir, "--out-dir")
        except OutputPathError as exc:
            parser.error(str(exc))
    return device


def _parse_device(parser: argparse.ArgumentParser, text) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"argument --device: {text!r} is not a torch device (try cpu, cuda or cuda:0)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"argument --device: {text!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {text!r} asks for CUDA, which is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"argument --device: {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _run(args, device, malloc_tuned: bool) -> int:
    started = time.perf_counter()
    matrix = plan(device.type, args.quick)
    if args.budget is not None:
        matrix.budget_s = args.budget
    requested = args.providers or list(matrix.providers)
    env = environment(device, malloc_tuned)
    out_dir = args.out_dir or DEFAULT_OUT / _default_name(device, env, args.quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"device: {env['device_name']}  torch {env['torch']}  triton {env['triton']}  "
          f"diffusers {env['diffusers']}  commit {str(env['commit'])[:10]}  {env['date']}")

    skipped, timed = {}, []
    for name in requested:
        ok, reason = availability(name, device)
        if ok:
            timed.append(name)
        else:
            skipped[name] = reason
    for name, reason in skipped.items():
        print(f"provider {name}: not timed: {reason}")
    # Triton is parity-checked even where it is not timed (CPU interpreter, tiny input).
    # torch.compile compiles one graph per static shape, so it is checked at each shape it
    # is timed at, in the timing stage (bench.step), not at the gate's small shape.
    parity_names = [n for n in timed if n != "compile"]
    parity_names += ["triton"] if "triton" in skipped and interpreter_on() else []
    # One Providers for the whole run: the parity gate and the timings share its samplers.
    providers = Providers(device)
    load_before = _load_average()
    checks = run_parity(providers, parity_names, device, matrix.pairs())
    gate = summarize(checks)
    print(gate)
    parity_ok = all(c.ok for c in checks)

    copy = copy_bandwidth(device)
    cache = cache_bytes(device)
    print(f"copy bandwidth: {copy['gbs']:.1f} GB/s (read + write of {copy['bytes_per_copy'] / 2**20:.0f} MiB); "
          f"last-level cache {cache / 2**20:.0f} MiB")

    rows_path = out_dir / "rows.jsonl"
    rows_path.write_text("")
    step_rows, compile_s = run_steps(providers, matrix, timed, device, copy["gbs"], cache, rows_path, parity_ok)
    loop_rows = [] if args.skip_loops else _loops(device, args.quick, rows_path)
    parity_ok = parity_ok and all(r.get("parity_ok", True) for r in step_rows + loop_rows)
    if not parity_ok:
        report.withhold_speedups(step_rows)
        print("PARITY FAILED: speedups are withheld; fix the failing provider first.")

    result = {
        "environment": env, "mode": "quick" if args.quick else "full",
        # Set by bench/gpu.sh: whether the test suite passed before this run, on this machine.
        "tests_status": os.environ.get("BENCH_TESTS_STATUS"),
        "load_average": {"before": load_before, "after": _load_average(), "cpus": os.cpu_count()},
        "copy_bandwidth": copy, "cache_bytes": cache, "budget_s": matrix.budget_s,
        "parity": {"ok": parity_ok, "summary": gate, "checks": [vars(c) | {"ok": c.ok} for c in checks]},
        "providers": {"timed": timed, "skipped": skipped}, "omitted": matrix.omitted,
        "compile_seconds": {f"{c}/{d}/{shape_id(shape)}": s for (c, d, shape), s in compile_s.items()},
        "compile_note": "torch.compile of the minimal eager step: dynamic=False (one compile per shape), "
                        "fullgraph=True, fp32 host coefficients as Python floats, mode max-autotune-no-cudagraphs "
                        "on CUDA, fallback_random for drawn noise; compile_seconds is each shape's first call",
        "baselines": {"claims": list(CLAIM_BASELINES), "context": [b for b in BASELINES if b not in CLAIM_BASELINES]},
        "steps": step_rows, "loops": loop_rows,
        "byte_model": "see bench/cases.py: x + model output (2x under CFG) + noise tensor + x_prev "
                      "(+ pred_x0; paint: + orig + orig_noise + (B,1,H,W) mask)",
        "wall_s": None,
    }
    result["targets"] = report.targets(result)
    result["wall_s"] = time.perf_counter() - started
    print(report.table(result))
    report.write(result, out_dir)
    rows_path.unlink()  # its rows are in results.json; it only matters for a run cut short
    if not args.no_plot:
        print(f"plot: {draw_plot(out_dir)}")
    print(f"results in {out_dir} ({result['wall_s']:.0f} s)")
    return 0 if parity_ok else 1


def draw_plot(out_dir: Path) -> str:
    """Draw out_dir/results.png from its results.json; returns the PNG's path, or why it was skipped."""
    if importlib.util.find_spec("matplotlib") is None:  # an optional extra: look for it without importing it
        return "skipped: matplotlib is not installed (pip install 'ddim-fused[plots]')"
    return str(plot(out_dir / "results.json", out_dir / "results.png"))


def _loops(device, quick, rows_path):
    print("whole loop, 50 steps:")
    rows = run_loops(device, quick, budget_s=0.1 if quick else 0.5)
    with rows_path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def _load_average():
    """The 1-minute load average (None where the OS has none): a busy machine's timings are noise."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _default_name(device, env, quick) -> str:
    kind = "gpu" if device.type == "cuda" else "cpu"
    return f"{kind}-{env['date'][:10]}" + ("-quick" if quick else "")


if __name__ == "__main__":
    sys.exit(main())
