"""diffusers' scheduler step timed inside a real pipeline loop: stock DDIMScheduler vs fused.

A `DDIMPipeline` with a randomly initialised `UNet2DModel` runs its own denoising loop;
`pipe.scheduler.step` is wrapped so that every call the pipeline makes is timed where it
happens, between two UNet calls (caches and allocator in the state a real loop leaves
them). The same pipeline runs with diffusers' DDIMScheduler and, after `use_fused`, with
FusedDDIMScheduler; runs of the two alternate, so load from other processes hits both
alike. Rows give the step's p20/p50/p80 per call, the whole pipeline call per step, and
the step's share of it.

    python -m bench.pipeline [--quick] [--out-dir DIR] [--threads N]

Timings on a shared CPU are noisy: compare providers within one run, not across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .timing import QUANTILES, environment, tune_malloc

PROVIDERS = ("stock", "fused")
# (name, UNet sample size, channels, batch, eta): a pixel-space 32x32 model and a
# latent-sized 4x64x64 one (SD 1.5's latent at 512 px), deterministic and with noise.
CASES = (
    ("B4-3x32x32 eta0", 32, 3, 4, 0.0),
    ("B4-3x32x32 eta1", 32, 3, 4, 1.0),
    ("B1-4x64x64 eta0", 64, 4, 1, 0.0),
    ("B4-4x64x64 eta0", 64, 4, 4, 0.0),
    ("B4-4x64x64 eta1", 64, 4, 4, 1.0),
)
QUICK_CASES = CASES[:1] + CASES[3:4]


def _pipeline(sample_size: int, channels: int):
    """A DDIMPipeline with a small random UNet (the model is not the subject; its cost is reported)."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel  # noqa: PLC0415 - optional dependency

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDIMPipeline(unet=unet.eval(), scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                  beta_end=0.012, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _StepTimer:
    """Replaces scheduler.step with a wrapper recording each call's wall and thread CPU time (s).

    The thread's CPU time leaves out the time the thread waited while other processes ran
    (it still includes their cost in shared caches and cores).
    """

    def __init__(self, scheduler):
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._step = scheduler.step
        scheduler.step = self

    def clear(self) -> None:
        self.times.clear()
        self.cpu_times.clear()

    def __call__(self, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = self._step(*args, **kwargs)
        self.cpu_times.append(time.thread_time() - c0)
        self.times.append(time.perf_counter() - t0)
        return out


def pipeline_rows(cases=CASES, steps: int = 25, rounds: int = 5) -> list[dict]:
    """Time stock and fused scheduler.step inside DDIMPipeline's loop, alternating rounds.

    Args:
        cases: (name, sample size, channels, batch, eta) tuples.
        steps: num_inference_steps of each pipeline call.
        rounds: pipeline calls per provider after one warm-up call each.

    Returns:
        one dict per (case, provider): step_us_p20/p50/p80 (wall time per step() call),
        step_cpu_us_p50 (the thread's CPU time), pipeline_ms_per_step (p50 of a whole call / steps), step_share, calls, and for the
        fused rows step_speedup = stock p50 / fused p50.
    """
    from ddim_fused.diffusers import use_fused  # noqa: PLC0415 - imports diffusers

    rows = []
    for name, size, channels, batch, eta in cases:
        pipes = {"stock": _pipeline(size, channels)}
        pipes["fused"] = use_fused(_pipeline(size, channels), backend="auto")
        timers = {p: _StepTimer(pipe.scheduler) for p, pipe in pipes.items()}
        totals = {p: [] for p in PROVIDERS}

        def call(provider):
            t0 = time.perf_counter()
            pipes[provider](batch_size=batch, num_inference_steps=steps, eta=eta, output_type="np",
                            generator=torch.Generator().manual_seed(0))
            return time.perf_counter() - t0

        for provider in PROVIDERS:  # warm-up: allocator, lazy init, host tables
            call(provider)
            timers[provider].clear()
        for _ in range(rounds):
            for provider in PROVIDERS:
                totals[provider].append(call(provider))
        for provider in PROVIDERS:
            q20, q50, q80 = np.quantile(timers[provider].times, QUANTILES)
            per_step = float(np.median(totals[provider])) / steps
            rows.append({"case": name, "provider": provider, "latent": [batch, channels, size, size], "eta": eta,
                         "steps": steps, "calls": len(timers[provider].times),
                         "step_us_p20": q20 * 1e6, "step_us_p50": q50 * 1e6, "step_us_p80": q80 * 1e6,
                         "step_cpu_us_p50": float(np.median(timers[provider].cpu_times)) * 1e6,
                         "pipeline_ms_per_step": per_step * 1e3, "step_share": q50 / per_step})
        stock, fused = rows[-2], rows[-1]
        fused["step_speedup"] = stock["step_us_p50"] / fused["step_us_p50"]
    return rows


def format_rows(rows: list[dict], env: dict) -> str:
    """A plain-text table of pipeline_rows' output, headed by the run's environment."""
    lines = [f"{env['device_name']} | torch {env['torch']} | diffusers {env['diffusers']} | {env['date']} | "
             f"commit {str(env['commit'])[:10]}{' (dirty)' if env['dirty'] else ''} | "
             f"load average at start {env.get('load_average', 'n/a')}",
             "scheduler.step inside DDIMPipeline's loop (random UNet2DModel, CPU); step in us per call "
             "(wall p50 [p20, p80], thread CPU time p50); pipeline ms per step (p50); "
             "speedup = stock p50 / fused p50 (wall)",
             f"{'case':18s} {'provider':8s} {'step p50':>9s} {'[p20, p80]':>20s} {'cpu p50':>8s} {'pipe/step':>10s} "
             f"{'share':>6s} {'speedup':>8s}"]
    for r in rows:
        speedup = f"{r['step_speedup']:.2f}x" if "step_speedup" in r else ""
        lines.append(f"{r['case']:18s} {r['provider']:8s} {r['step_us_p50']:9.1f} "
                     f"[{r['step_us_p20']:8.1f}, {r['step_us_p80']:8.1f}] {r['step_cpu_us_p50']:8.1f} "
                     f"{r['pipeline_ms_per_step']:10.2f} "
                     f"{100 * r['step_share']:5.1f}% {speedup:>8s}")
    return "\n".join(lines) + "\n"


def _write_new(path: Path, text: str) -> None:
    """Write to a new temporary file beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "x", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    """Run the pipeline benchmark, print the table, write pipeline.json and pipeline.txt."""
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two cases, 10 steps, 3 rounds")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="results folder (default bench/results/cpu-pipeline-<date>)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        print("ddim-fused: error: --threads must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    malloc_tuned = tune_malloc()
    device = torch.device("cpu")
    env = environment(device, malloc_tuned)
    # Other processes on the machine: the timings' noise floor, recorded with them.
    env["load_average"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    rows = pipeline_rows(QUICK_CASES, steps=10, rounds=3) if args.quick else pipeline_rows()
    text = format_rows(rows, env)
    print(text, end="")
    out = args.out_dir or Path(__file__).resolve().parent / "results" / f"cpu-pipeline-{env['date'][:10]}"
    out.mkdir(parents=True, exist_ok=True)
    _write_new(out / "pipeline.json", json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    _write_new(out / "pipeline.txt", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
