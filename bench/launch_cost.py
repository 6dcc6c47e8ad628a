"""Python-side cost per step of the kernel's launch paths, with the kernel launch itself stubbed out.

The CPU proxy of `python -m bench.host --device cuda`. The Triton kernel object is
replaced by a stand-in whose launch does nothing (and the direct runner's device and
stream lookups by constants), so this measures only the host path's own Python and torch
work: not Triton's binder, not the driver, not the GPU. Runs on a CPU (thread CPU time,
best of 5 rounds), each "before" row beside its "after" row in the same run:

- launchers: `launch_ddim_step` (everything decided per launch) against `launch_step`
  (the layout bound once per key) and a step bound by `bind_ddim_step` (see
  ddim_fused/kernels/bound_step.py), ordinary-launch and direct-runner dispatch;
- entry points, on CPU tensors routed to the stubbed kernel: `ddim_fused.ddim_step`
  through the operator (full validation, torch.library dispatch) against its eager path;
  `FusedDDIMScheduler.step` with `launch_ddim_step` against `launch_step` (needs
  diffusers); `DDIMSampler.sample` per step at eta 0, and with guidance: a torch.cat per
  step, the batch-doubled loop with a copy into the second half per step, and the
  batch-doubled loop whose one launch per step stores both halves.

One row times a part of Triton's own ordinary launch that needs no GPU: its check that
every global a kernel reads still has its compile-time value (`JITFunction.run` compares
each one), on the step kernel compiled as for a GPU (no interpreter, in a subprocess).

    python -m bench.launch_cost [--launches N]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # import the kernels without a GPU

import torch  # noqa: E402

import ddim_fused  # noqa: E402
from ddim_fused import ops  # noqa: E402
from ddim_fused.backend import kernels  # noqa: E402
from ddim_fused.sampler import DDIMSampler  # noqa: E402
from ddim_fused.step_args import StepArgs  # noqa: E402

from .host import TrivialEps  # noqa: E402

SHAPE = (4, 4, 64, 64)
ENTRY_SHAPE = (1, 4, 64, 64)  # bench.host's GPU shape
SAMPLER_STEPS = 50
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


@contextlib.contextmanager
def stubbed_kernel():
    """The step kernel stubbed (ordinary launches return a compiled stand-in whose launch
    does nothing), direct launches on, the layout cache empty; everything undone after."""
    ks = kernels()
    step_mod, bound_mod = ks.ddim_step, ks.bound_step
    saved = (step_mod._ddim_step_kernel, bound_mod._ddim_step_kernel, bound_mod.DIRECT_LAUNCH,
             bound_mod._cuda_current, bound_mod._LAUNCHERS)
    try:
        step_mod._ddim_step_kernel = _StubKernel(bound_mod._ARG_NAMES, None)
        bound_mod._ddim_step_kernel = _StubKernel(bound_mod._ARG_NAMES, _StubCompiled())
        bound_mod.DIRECT_LAUNCH, bound_mod._cuda_current, bound_mod._LAUNCHERS = True, _no_cuda, {}
        yield step_mod, bound_mod
    finally:
        (step_mod._ddim_step_kernel, bound_mod._ddim_step_kernel, bound_mod.DIRECT_LAUNCH,
         bound_mod._cuda_current, bound_mod._LAUNCHERS) = saved


def launch_rows(launches: int) -> dict[str, float]:
    """Microseconds of Python per step for each launcher, the kernel stubbed out for the duration."""
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    out = torch.empty_like(x)
    step = StepArgs(1.1, -0.3, noise_coef=0.2, seed=5, step_key=7, x0_coefs=(1.0, 2.0))
    meta = torch.empty(SHAPE, device="meta")
    rows = {}
    with stubbed_kernel() as (step_mod, bound_mod):
        rows["launch_ddim_step"] = _per_call_us(lambda: step_mod.launch_ddim_step(x, eps, out, step), launches)
        rows["launch_step, bound per key"] = _per_call_us(lambda: bound_mod.launch_step(x, eps, out, step), launches)
        bound_mod.DIRECT_LAUNCH = False
        run = bound_mod.bind_ddim_step(meta).step(step)
        rows["bound step, ordinary launch"] = _per_call_us(lambda: run(x, eps, out), launches)
        bound_mod.DIRECT_LAUNCH = True
        run = bound_mod.bind_ddim_step(meta).step(step)
        rows["bound step, direct runner"] = _per_call_us(lambda: run(x, eps, out), launches)
        rows["binding a call and one step"] = _per_call_us(lambda: bound_mod.bind_ddim_step(meta).step(step),
                                                           max(1, launches // 10))
    return rows


def entry_rows(launches: int) -> dict[str, float]:
    """Microseconds per step of each entry point's host path on the stubbed kernel, before/after pairs."""
    rows = {}
    gen = torch.Generator().manual_seed(2)
    x, eps = torch.randn(ENTRY_SHAPE, generator=gen), torch.randn(ENTRY_SHAPE, generator=gen)
    out = torch.empty_like(x)
    fields = dict(x_coef=1.01, eps_coef=-0.02, noise_coef=0.3, seed=7, step_key=3)
    with stubbed_kernel() as (_, bound_mod), _op_on_the_kernel(bound_mod.launch_step):
        call = lambda: ddim_fused.ddim_step(x, eps, out=out, **fields)  # noqa: E731
        saved = ops._EAGER_FIELDS
        ops._EAGER_FIELDS = frozenset()  # nothing is remembered: every call validates and dispatches
        try:
            rows["ddim_step, operator (validated, dispatched)"] = _per_call_us(call, max(1, launches // 4))
        finally:
            ops._EAGER_FIELDS = saved
        call()  # remembers the combination
        rows["ddim_step, eager path"] = _per_call_us(call, launches)
        rows.update(_scheduler_rows(bound_mod, x, eps, max(1, launches // SAMPLER_STEPS)))
        rows.update(_sampler_rows(bound_mod, max(1, launches // (4 * SAMPLER_STEPS))))
    return rows


@contextlib.contextmanager
def _op_on_the_kernel(launch):
    """ddim_fused.ddim_step's "auto" step function on CPU tensors is `launch` (the stubbed kernel's)."""
    saved = ops.step_function
    ops.step_function = lambda backend, device, dtype: launch
    ops._EAGER.clear()
    try:
        yield
    finally:
        ops.step_function = saved
        ops._EAGER.clear()


def _scheduler_rows(bound_mod, x, eps, loops: int) -> dict[str, float]:
    try:
        from ddim_fused.diffusers import FusedDDIMScheduler  # noqa: PLC0415 - optional dependency
    except ImportError:
        return {}
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    scheduler = FusedDDIMScheduler(**config)
    scheduler.backend = "triton"  # the kernel (stubbed) on CPU tensors
    scheduler.set_timesteps(SAMPLER_STEPS)
    timesteps = list(scheduler.timesteps)

    def loop():
        for t in timesteps:
            scheduler.step(eps, t, x, return_dict=False)

    rows = {}
    loop()
    key = next(iter(scheduler._step_functions))
    for name, launch in (("launch_ddim_step", kernels().ddim_step.launch_ddim_step),
                         ("launch_step", bound_mod.launch_step)):
        scheduler._step_functions[key] = launch
        rows[f"FusedDDIMScheduler.step, {name}"] = _per_call_us(loop, loops) / len(timesteps)
    return rows


def _sampler_rows(bound_mod, calls: int) -> dict[str, float]:
    model = TrivialEps()
    cond, uncond = torch.ones(1), torch.zeros(1)
    x_T = torch.randn(ENTRY_SHAPE, generator=torch.Generator().manual_seed(2))
    rows = {}
    for name, scale, un in (("eta0", 1.0, None), ("guidance", 3.0, uncond)):
        sampler = DDIMSampler(model, SAMPLER_STEPS, "uniform", 0.0, backend="triton")
        run = lambda: sampler.sample(ENTRY_SHAPE, cond, x_last=x_T, uncond_scale=scale,  # noqa: E731
                                     uncond_cond=un, seed=1)
        run()
        if un is not None:
            saved = DDIMSampler._denoise_doubled
            DDIMSampler._denoise_doubled = lambda self, x, plan: self._denoise_loop(x, plan, None)
            try:
                rows["sampler step, guidance, torch.cat per step"] = _per_call_us(run, calls) / SAMPLER_STEPS
            finally:
                DDIMSampler._denoise_doubled = saved
            bound_mod.BoundStep.stores_twice = False  # each step's launch stores one half, a copy the other
            try:
                rows["sampler step, guidance, doubled, copy per step"] = _per_call_us(run, calls) / SAMPLER_STEPS
            finally:
                bound_mod.BoundStep.stores_twice = True
        rows[f"sampler step, {name}" + (", doubled, one launch" if un is not None else "")] = \
            _per_call_us(run, calls) / SAMPLER_STEPS
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.launch_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=20000, help="launches per round (default 20000)")
    args = parser.parse_args(argv)
    for name, us in {**launch_rows(args.launches), **entry_rows(args.launches)}.items():
        print(f"{name:48s} {us:8.2f} us (Python only, kernel launch stubbed)")
    count, us = global_check_us(args.launches)
    print(f"{'Triton global check, step':48s} {us:8.2f} us (per ordinary launch; the kernel reads {count} globals)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
