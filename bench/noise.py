"""`python -m bench.noise [--threads N] [--budget S]`: CPU keyed noise against torch.randn.

Times, interleaved (one sample of each per round, so load from other processes hits
all alike), on 1M fp32 elements (16, 4, 128, 128):
    randn           torch.randn
    keyed-c         keyed_normal_torch, C kernel (the CPU default where a C compiler exists)
    keyed-ops       the same stream in torch integer ops (the fallback without one)
    step-eager      the reference's eta > 0 step, noise from torch.randn
    step-fused      torch_ddim_step drawing the keyed noise itself (C kernel)
    step-fused-ops  the same step with the torch-ops stream
and, once, the C kernel's cold build (compile + load) into a fresh folder: the first
call's cost on a machine without a cached build. Prints a plain-text report.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddim_fused import native
from ddim_fused.philox import keyed_normal_torch
from ddim_fused.torch_step import torch_ddim_step

from .cases import CASES, INDEX, SEED, make_inputs
from .providers import Samplers, fused_args, labml_step, with_torch_ops
from .timing import environment, time_interleaved, tune_malloc

SHAPE = (16, 4, 128, 128)



def callables(shape=SHAPE) -> dict:
    """{name: zero-argument callable} of the compared draws and steps."""
    case = CASES["eta-drawn"]
    inputs = make_inputs(case, shape, torch.float32, torch.device("cpu"))
    samplers = Samplers(case.eta)
    eager = labml_step(samplers.ref, case)
    args = fused_args(samplers, case, inputs)
    x, model_out = inputs["x"], inputs["model_out"]
    batch, numel = shape[0], x[0].numel()

    def keyed():
        return keyed_normal_torch(batch, numel, SEED, INDEX)

    def fused():
        # As the sampler does: a fresh output buffer every step.
        return torch_ddim_step(x, model_out, torch.empty_like(x), args)

    return {
        "randn": lambda: torch.randn(shape),
        "keyed-c": keyed,
        "keyed-ops": with_torch_ops(keyed),
        "step-eager": lambda: eager(x, model_out, None, None, None, None),
        "step-fused": fused,
        "step-fused-ops": with_torch_ops(fused),
    }


def cold_build_seconds() -> float:
    """Seconds to compile and load the C kernel into an empty folder."""
    command = native.compiler()
    with tempfile.TemporaryDirectory(prefix="ddim-fused-bench-") as folder:
        t0 = time.perf_counter()
        native.load_library(Path(folder), command)
        return time.perf_counter() - t0


def report(results: dict, build_s: float, load_before, load_after, malloc_tuned: bool) -> str:
    """The printed report: environment, one line per callable, the two ratios that matter."""
    env = environment(torch.device("cpu"), malloc_tuned)
    lines = [
        f"{env['device_name']} | torch {env['torch']} | {env['date']} | commit {(env['commit'] or '?')[:10]}"
        f"{' (dirty)' if env['dirty'] else ''} | malloc tuned {env['malloc_tuned']}",
        f"1M fp32 elements {SHAPE}; interleaved samples; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after on {os.cpu_count()} CPUs (shared: timings taken under contention)",
        f"C kernel cold build (compile + load): {build_s:.2f} s; later processes load the cached build",
        f"{'':16}{'p50 ms':>9}{'p20 ms':>9}{'p80 ms':>9}{'samples':>9}",
    ]
    for name, r in results.items():
        lines.append(f"{name:16}{r['p50'] * 1e3:9.2f}{r['p20'] * 1e3:9.2f}{r['p80'] * 1e3:9.2f}{r['samples']:9d}")
    for a, b in (("keyed-c", "randn"), ("keyed-ops", "randn"), ("step-fused", "step-eager"),
                 ("step-fused-ops", "step-eager")):
        lines.append(f"p50 {a} / {b}: {results[a]['p50'] / results[b]['p50']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.noise", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--budget", type=float, default=3.0, help="rough seconds per timed callable")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.budget <= 0:
        parser.error("--threads must be >= 1 and --budget > 0")
    if native.library() is None:
        print("bench.noise: error: the CPU kernels are unavailable (no C compiler?)", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    malloc_tuned = tune_malloc()
    build_s = cold_build_seconds()
    load_before = os.getloadavg()
    results = time_interleaved(callables(), torch.device("cpu"), budget_s=args.budget)
    print(report(results, build_s, load_before, os.getloadavg(), malloc_tuned))
    return 0


if __name__ == "__main__":
    sys.exit(main())
