"""The paint step on a CPU, A/B in one process: the one-pass C step against the torch ops it
replaces, minimal eager and torch.compile of minimal (bench.providers: same inputs, same
coefficients), timed interleaved at one thread.

    python -m bench.cpu_paint [--shape 16,4,128,128] [--budget 8]

Prints one line per provider (p50, p20, p80, min, speedup over torch.compile) and the load
average around the run; "torch ops" is the fused torch step with the C kernel switched off
(DDIM_FUSED_CPU_KERNEL=0), as paint ran before it had a C pass.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ddim_fused import native

from .cases import CASES, make_inputs
from .providers import Providers, with_torch_ops
from .timing import time_interleaved, tune_malloc



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_paint", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="16,4,128,128", help="B,C,H,W (default 16,4,128,128: 1M elements)")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timing in all")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    if native.library() is None:
        print("bench.cpu_paint: error: the C kernels are unavailable (no C compiler?)", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    tune_malloc()
    device, case = torch.device("cpu"), CASES["paint"]
    inputs = make_inputs(case, shape, torch.float32, device)
    providers = Providers(device)
    fused = providers.make("torch", case, inputs, "fp32")
    fns = {"C pass": fused, "torch ops": with_torch_ops(fused),
           "minimal": providers.make("minimal", case, inputs, "fp32"),
           "compile": providers.make("compile", case, inputs, "fp32")}
    diff = (fns["C pass"]()[0] - fns["torch ops"]()[0]).abs().max().item()
    print(f"paint fp32 {'x'.join(map(str, shape))}, 1 thread; load average before {os.getloadavg()[0]:.2f}; "
          f"C pass vs torch ops: max difference {diff:.2e}")
    times = time_interleaved(fns, device, budget_s=args.budget)
    base = times["compile"]
    for name, t in times.items():
        print(f"  {name:10s} p50 {t['p50'] * 1e6:8.1f} us [p20 {t['p20'] * 1e6:8.1f}, p80 {t['p80'] * 1e6:8.1f}] "
              f"min {t['min'] * 1e6:8.1f}  vs compile: p50 {base['p50'] / t['p50']:.2f}x, p20 {base['p20'] / t['p20']:.2f}x")
    print(f"load average after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
