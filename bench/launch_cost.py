"""Python-side cost per step of the kernel launchers, with the kernel launch itself stubbed out.

Compares `launch_ddim_step` (everything decided per launch) with a step bound by
`bind_ddim_step` (see ddim_fused/kernels/bound_step.py), both ordinary-launch and direct-runner
dispatch. The Triton kernel object is replaced by a stand-in whose launch does nothing,
so this measures only the launchers' own Python work: not Triton's binder, not the
driver, not the GPU. Runs on a CPU (thread CPU time, best of 5 rounds).

One row times a part of Triton's own ordinary launch that needs no GPU: its check that
every global a kernel reads still has its compile-time value (`JITFunction.run` compares
each one), on the step kernel compiled as for a GPU (no interpreter, in a subprocess).

    python -m bench.launch_cost [--launches N]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # import the kernels without a GPU

import torch  # noqa: E402

from ddim_fused.backend import kernels  # noqa: E402
from ddim_fused.step_args import StepArgs  # noqa: E402

SHAPE = (4, 4, 64, 64)
ROOT = Path(__file__).resolve().parent.parent


class _StubCompiled:
    """Stands in for a CompiledKernel: its runner and its C launcher do nothing."""

    function = packed_metadata = None

    def __getitem__(self, grid):
        return lambda *args: None

    def run(self, *args):
        return None


def _no_cuda() -> tuple:
    """Stands in for the current device and stream lookups of a direct runner (a CPU has neither)."""
    return (lambda: 0), (lambda device: 0)


class _StubKernel:
    """Stands in for the JIT kernel: an ordinary launch does nothing and returns `compiled`."""

    def __init__(self, arg_names, compiled):
        self.arg_names, self._compiled = arg_names, compiled

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._compiled


def _per_call_us(fn, n: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.thread_time()
        for _ in range(n):
            fn()
        best = min(best, (time.thread_time() - start) / n)
    return best * 1e6


# The loop JITFunction.run makes over a kernel's globals at every ordinary launch.
_GLOBAL_CHECK = """
import sys, time
from ddim_fused.kernels.ddim_step import _ddim_step_kernel as kernel
kernel.cache_key  # finds the globals the kernel reads
used, absent, n, best = kernel.used_global_vals, object(), int(sys.argv[1]), float("inf")
for _ in range(5):
    start = time.thread_time()
    for _ in range(n):
        for (name, _), (value, scope) in used.items():
            if scope.get(name, absent) != value:
                raise RuntimeError(name)
    best = min(best, (time.thread_time() - start) / n)
print(len(used), best * 1e6)
"""


def global_check_us(launches: int) -> tuple[int, float]:
    """(globals the step kernel reads, microseconds Triton's per-launch check of them takes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _GLOBAL_CHECK, str(launches)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        raise RuntimeError(f"timing the global check failed: {run.stderr.strip().splitlines()[-1:]}")
    count, us = run.stdout.split()
    return int(count), float(us)


def launch_rows(launches: int) -> dict[str, float]:
    """Microseconds of Python per step for each launcher, the kernel stubbed out for the duration."""
    ks = kernels()
    step_mod, bound_mod = ks.ddim_step, ks.bound_step
    saved = (step_mod._ddim_step_kernel, bound_mod._ddim_step_kernel, bound_mod.DIRECT_LAUNCH, bound_mod._cuda_current)
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    out = torch.empty_like(x)
    step = StepArgs(1.1, -0.3, noise_coef=0.2, seed=5, step_key=7, x0_coefs=(1.0, 2.0))
    meta = torch.empty(SHAPE, device="meta")
    rows = {}
    try:
        step_mod._ddim_step_kernel = bound_mod._ddim_step_kernel = _StubKernel(bound_mod._ARG_NAMES, None)
        rows["launch_ddim_step"] = _per_call_us(lambda: step_mod.launch_ddim_step(x, eps, out, step), launches)
        bound_mod.DIRECT_LAUNCH = False
        run = bound_mod.bind_ddim_step(meta).step(step)
        rows["bound step, ordinary launch"] = _per_call_us(lambda: run(x, eps, out), launches)
        bound_mod.DIRECT_LAUNCH = True
        bound_mod._cuda_current = _no_cuda
        bound_mod._ddim_step_kernel = _StubKernel(bound_mod._ARG_NAMES, _StubCompiled())
        run = bound_mod.bind_ddim_step(meta).step(step)
        rows["bound step, direct runner"] = _per_call_us(lambda: run(x, eps, out), launches)
        rows["binding a call and one step"] = _per_call_us(lambda: bound_mod.bind_ddim_step(meta).step(step),
                                                           max(1, launches // 10))
    finally:
        (step_mod._ddim_step_kernel, bound_mod._ddim_step_kernel, bound_mod.DIRECT_LAUNCH,
         bound_mod._cuda_current) = saved
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.launch_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=20000, help="launches per round (default 20000)")
    args = parser.parse_args(argv)
    for name, us in launch_rows(args.launches).items():
        print(f"{name:32s} {us:8.2f} us (Python only, kernel launch stubbed)")
    count, us = global_check_us(args.launches)
    print(f"{'Triton global check, step':32s} {us:8.2f} us (per ordinary launch; the kernel reads {count} globals)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
