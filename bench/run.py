"""The benchmark runner behind `python -m bench` and `ddim-fused bench`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the runner's options to `parser` (a new one if None) and return it."""
    parser = parser or argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small matrix (under 2 minutes on a CPU)")
    parser.add_argument("--out-dir", type=Path, default=None,
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


def main(argv=None) -> int:
    """Run the benchmark; returns the exit status (non-zero when parity fails).

    Args:
        argv: command-line arguments (default sys.argv[1:]).

    Returns:
        0 on success, 1 if a parity check failed (timings are kept, speedups withheld).
    """
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        # The kernel can only be parity-checked on CPU through the interpreter; it must be
        # chosen before triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(args.threads)
        if not args.no_malloc_tuning:
            from .timing import MALLOC_TUNED, tune_malloc  # noqa: PLC0415

            MALLOC_TUNED[0] = tune_malloc()
    return _run(args, device)


def _run(args, device) -> int:
    from . import report  # noqa: PLC0415 - imported after TRITON_INTERPRET is decided
    from .matrix import plan
    from .parity import run_parity, summarize
    from .providers import availability
    from .step import run_steps
    from .timing import cache_bytes, copy_bandwidth, environment

    started = time.perf_counter()
    matrix = plan(device.type, args.quick)
    if args.budget is not None:
        matrix.budget_s = args.budget
    requested = args.providers.split(",") if args.providers else list(matrix.providers)
    env = environment(device)
    out_dir = args.out_dir or DEFAULT_OUT / _default_name(device, env, args.quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"device: {env['device_name']}  torch {env['torch']}  triton {env['triton']}  "
          f"diffusers {env['diffusers']}  commit {str(env['commit'])[:10]}  {env['date']}")

    skipped, timed = {}, []
    for name in requested:
        ok, reason = availability(name, device)
        (timed.append(name) if ok else skipped.__setitem__(name, reason))
    for name, reason in skipped.items():
        print(f"provider {name}: not timed: {reason}")
    # Triton is parity-checked even where it is not timed (CPU interpreter, tiny input).
    parity_names = list(timed) + (["triton"] if "triton" in skipped and os.environ.get("TRITON_INTERPRET") == "1" else [])
    compile_pairs = [(c, d) for c, d in matrix.pairs() if c in matrix.compile_cases]
    checks = []
    for case_name, dtype_id in matrix.pairs():
        names = [n for n in parity_names if n != "compile" or (case_name, dtype_id) in compile_pairs]
        checks += run_parity(_providers(device), names, device, [(case_name, dtype_id)])
    gate = summarize(checks)
    print(gate)
    parity_ok = all(c.ok for c in checks)

    copy = copy_bandwidth(device)
    cache = cache_bytes(device)
    print(f"copy bandwidth: {copy['gbs']:.1f} GB/s (read + write of {copy['bytes_per_copy'] / 2**20:.0f} MiB); "
          f"last-level cache {cache / 2**20:.0f} MiB")

    rows_path = out_dir / "rows.jsonl"
    rows_path.write_text("")
    step_rows, compile_s = run_steps(matrix, timed, device, copy["gbs"], cache, rows_path, parity_ok)
    loop_rows = [] if args.skip_loops else _loops(device, args.quick, rows_path)
    parity_ok = parity_ok and all(r.get("parity_ok", True) for r in step_rows)
    if not parity_ok:
        report.withhold_speedups(step_rows)
        print("PARITY FAILED: speedups are withheld; fix the failing provider first.")

    result = {
        "environment": env, "mode": "quick" if args.quick else "full",
        "copy_bandwidth": copy, "cache_bytes": cache, "budget_s": matrix.budget_s,
        "parity": {"ok": parity_ok, "summary": gate, "checks": [vars(c) | {"ok": c.ok} for c in checks]},
        "providers": {"timed": timed, "skipped": skipped}, "omitted": matrix.omitted,
        "compile_seconds": {f"{c}/{d}": s for (c, d), s in compile_s.items()},
        "compile_note": "torch.compile(dynamic=True, fullgraph=True) of the reference step, with its noise "
                        "sigmas as Python floats so that its `noise_sigma == 0.0` branch does not break the graph; "
                        "compile_seconds is the first call (trace + codegen) at the parity input",
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
        from .plot import plot  # noqa: PLC0415

        print(f"plot: {plot(out_dir / 'results.json', out_dir / 'results.png')}")
    print(f"results in {out_dir} ({result['wall_s']:.0f} s)")
    return 0 if parity_ok else 1


_PROVIDERS = {}


def _providers(device):
    from .providers import Providers  # noqa: PLC0415

    if device not in _PROVIDERS:
        _PROVIDERS[device] = Providers(device)
    return _PROVIDERS[device]


def _loops(device, quick, rows_path):
    from .loop import run_loops  # noqa: PLC0415

    print("whole loop, 50 steps:")
    rows = run_loops(device, quick, budget_s=0.1 if quick else 0.5)
    with rows_path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def _default_name(device, env, quick) -> str:
    kind = "gpu" if device.type == "cuda" else "cpu"
    return f"{kind}-{env['date'][:10]}" + ("-quick" if quick else "")


if __name__ == "__main__":
    sys.exit(main())
