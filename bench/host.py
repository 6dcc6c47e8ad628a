"""Host cost per step: the fused diffusers step and the fused sampler against their baselines.

Targets (CPU, 1 thread):
- `FusedDDIMScheduler.step` <= 0.5x `DDIMScheduler.step`, timed inside a denoising loop
  (a small conv model runs between steps; timesteps come from `scheduler.timesteps`),
  at 1x4x32x32 and 1x4x64x64, eta 0 and 1;
- `DDIMSampler.sample` per step <= 0.25x `ReferenceDDIMSampler.sample`, trivial model
  (returns x), 1x4x8x8, at eta 0, eta 1 (keyed noise) and with guidance: whole calls, as a
  bulk run makes them (each with a new seed, so calls after the first reuse the sampler's
  steps and draw their own noise). A new sampler per call (its constructor and a first
  call, which builds the steps) is reported beside them without a target.

Targets (GPU, `--device cuda`), host time per step as the thread CPU time of the launch
path (the GPU work is queued asynchronously, so the CPU time is the host's own cost), at
1x4x64x64 with a trivial model:
- `DDIMSampler.sample` per step <= 10 us at eta 0 and eta 1 (keyed noise), <= 15 us with
  guidance: a whole 50-step call (a new seed per call) divided by 50;
- one `ddim_fused.ddim_step` call <= 15 us (the validated op, eager);
- `FusedDDIMScheduler.step` <= 30 us and <= 0.2x `DDIMScheduler.step`, in the loop above
  on CUDA tensors (1x4x32x32 and 1x4x64x64, eta 0 and 1).
A new sampler per call is reported beside them without a target. On the CPU the op's call
is reported too, without a target (its time includes the step's own compute).

Each measurement alternates the two providers (A/B, many rounds) and reports medians of
thread CPU time, which leaves out time the thread spent waiting for a shared core.

    python -m bench.host [--rounds N] [--out-dir DIR] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddim_fused import DDIMSampler, ReferenceDDIMSampler
from ddim_fused.schedules import make_alpha_bar

SCHEDULER_CASES = (((1, 4, 32, 32), 0.0), ((1, 4, 32, 32), 1.0), ((1, 4, 64, 64), 0.0), ((1, 4, 64, 64), 1.0))
SAMPLER_CASES = (("eta0", 0.0, False), ("eta1-keyed", 1.0, False), ("guidance", 0.0, True))
SCHEDULER_TARGET, SAMPLER_TARGET = 0.5, 0.25
GPU_SHAPE = (1, 4, 64, 64)
# Host time per step on the GPU path (us): the sampler's loop, the op, the diffusers step.
GPU_SAMPLER_TARGET_US, GPU_GUIDED_TARGET_US, GPU_OP_TARGET_US = 10.0, 15.0, 15.0
GPU_SCHEDULER_TARGET_US, GPU_SCHEDULER_TARGET = 30.0, 0.2
STEPS = 50


class TrivialEps:
    """A model that returns its input: only the host path is left to time."""

    n_steps = 1000

    def __init__(self):
        self.alpha_bar = make_alpha_bar("linear", 1000)

    def __call__(self, x, t, cond):
        return x


def _scheduler_loop(scheduler, model, latent, eta, record):
    """A pipeline's loop: model call, then scheduler.step timed on its own (thread CPU time)."""
    scheduler.set_timesteps(STEPS)
    x = latent
    gen = torch.Generator(latent.device).manual_seed(0)
    for t in scheduler.timesteps:
        eps = model(x)
        start = time.thread_time()
        x = scheduler.step(eps, t, x, eta=eta, generator=gen, return_dict=False)[0]
        record.append(time.thread_time() - start)
    return x


def scheduler_rows(rounds: int, device: torch.device = torch.device("cpu")) -> list[dict]:
    """Median step cost of DDIMScheduler vs FusedDDIMScheduler inside a loop, per case.

    On CUDA the host time of each step (the GPU work is queued), reported without a target.
    """
    from diffusers import DDIMScheduler  # noqa: PLC0415 - optional dependency

    from ddim_fused.diffusers import FusedDDIMScheduler  # noqa: PLC0415 - imports diffusers

    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    rows = []
    for shape, eta in SCHEDULER_CASES:
        conv = torch.nn.Conv2d(shape[1], shape[1], 3, padding=1).eval().to(device)
        latent = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
        schedulers = {"stock": DDIMScheduler(**config), "fused": FusedDDIMScheduler(**config)}
        times = {name: [] for name in schedulers}
        with torch.no_grad():
            for _ in range(rounds):
                for name, scheduler in schedulers.items():
                    _scheduler_loop(scheduler, conv, latent, eta, times[name])
        stock, fused = statistics.median(times["stock"]), statistics.median(times["fused"])
        cuda = device.type == "cuda"
        rows.append({"kind": "scheduler-step", "shape": list(shape), "eta": eta, "stock_us": stock * 1e6,
                     "fused_us": fused * 1e6, "ratio": fused / stock, "device": device.type,
                     "target": GPU_SCHEDULER_TARGET if cuda else SCHEDULER_TARGET,
                     "target_us": GPU_SCHEDULER_TARGET_US if cuda else None})
    return rows


def sampler_rows(rounds: int) -> list[dict]:
    """Per-step cost of whole 50-step samples, fused vs reference, trivial model, 1x4x8x8."""
    model, shape = TrivialEps(), (1, 4, 8, 8)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    cond, uncond = torch.ones(1), torch.zeros(1)
    rows = []
    for name, eta, guided in SAMPLER_CASES:
        scale, un = (3.0, uncond) if guided else (1.0, None)
        fused = DDIMSampler(model, STEPS, "uniform", eta)
        ref = ReferenceDDIMSampler(model, STEPS, "uniform", eta)
        seeds = itertools.count(1)  # a new seed per call: reused steps must draw fresh noise each time
        fns = {"fused": lambda s=fused: s.sample(shape, cond, x_last=x_T, uncond_scale=scale, uncond_cond=un,
                                                 seed=next(seeds)),
               "reference": lambda s=ref: s.sample(shape, cond, x_last=x_T, uncond_scale=scale, uncond_cond=un),
               # A new sampler per call: its constructor and a first call, which builds its steps.
               "new sampler": lambda: DDIMSampler(model, STEPS, "uniform", eta).sample(
                   shape, cond, x_last=x_T, uncond_scale=scale, uncond_cond=un, seed=next(seeds))}
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                start = time.thread_time()
                fn()
                times[k].append((time.thread_time() - start) / STEPS)
        f, r, first = (statistics.median(times[k]) for k in ("fused", "reference", "new sampler"))
        rows.append({"kind": "sampler-step", "case": name, "shape": list(shape), "fused_us": f * 1e6,
                     "reference_us": r * 1e6, "ratio": f / r, "target": SAMPLER_TARGET})
        rows.append({"kind": "sampler-step", "case": f"{name} new sampler", "shape": list(shape),
                     "fused_us": first * 1e6, "reference_us": r * 1e6, "ratio": first / r, "target": None})
    return rows


def gpu_rows(rounds: int, device: torch.device) -> list[dict]:
    """Host (thread CPU) time per fused step on CUDA tensors: the sampler's loop and the op."""
    model, shape = TrivialEps(), GPU_SHAPE
    x_T = torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(2))
    cond, uncond = torch.ones(1, device=device), torch.zeros(1, device=device)
    rows = []
    for name, eta, guided in SAMPLER_CASES:
        scale, un = (3.0, uncond) if guided else (1.0, None)
        fused, seeds = DDIMSampler(model, STEPS, "uniform", eta), itertools.count(1)
        run = lambda: fused.sample(shape, cond, x_last=x_T, uncond_scale=scale, uncond_cond=un,  # noqa: E731
                                   seed=next(seeds))
        target = GPU_GUIDED_TARGET_US if guided else GPU_SAMPLER_TARGET_US
        rows.append(_host_row(f"sampler/step {name}", run, STEPS, rounds, device, target=target))
        new = lambda: DDIMSampler(model, STEPS, "uniform", eta).sample(  # noqa: E731
            shape, cond, x_last=x_T, uncond_scale=scale, uncond_cond=un, seed=next(seeds))
        rows.append(_host_row(f"sampler/step {name} new sampler", new, STEPS, rounds, device, target=None))
    return rows + op_rows(rounds, device, GPU_OP_TARGET_US)


def op_rows(rounds: int, device: torch.device, target: float | None) -> list[dict]:
    """Host (thread CPU) time of one `ddim_fused.ddim_step` call, 1x4x64x64, at eta 0 and 1 (keyed noise)."""
    import ddim_fused  # noqa: PLC0415 - the public op

    gen = torch.Generator(device).manual_seed(2)
    x, eps = torch.randn(GPU_SHAPE, device=device, generator=gen), torch.randn(GPU_SHAPE, device=device, generator=gen)
    out = torch.empty_like(x)
    rows = []
    for name, extra in (("eta0", {}), ("eta1-keyed", {"noise_coef": 0.3, "seed": 7, "step_key": 3})):
        run = lambda e=extra: ddim_fused.ddim_step(x, eps, out=out, x_coef=1.01, eps_coef=-0.02, **e)  # noqa: E731
        rows.append(_host_row(f"ddim_fused.ddim_step {name}", run, 1, rounds * 10, device, target=target))
    return rows


def _host_row(label: str, run, steps: int, rounds: int, device: torch.device, target: float | None) -> dict:
    """Median host time per step of `run` (on a CPU device that includes the step's compute)."""
    cuda = device.type == "cuda"
    for _ in range(3):  # compile and warm the caches
        run()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(rounds):
        start = time.thread_time()
        run()
        times.append((time.thread_time() - start) / steps)
        if cuda:
            torch.cuda.synchronize(device)  # outside the timed span: the queue never fills up
    host = statistics.median(times) * 1e6
    return {"kind": "gpu-host" if cuda else "cpu-host", "label": label, "shape": list(GPU_SHAPE), "fused_us": host,
            "target_us": target, "device": torch.cuda.get_device_name(device) if cuda else "CPU"}


def format_rows(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        if row["kind"] in ("gpu-host", "cpu-host"):
            target = row["target_us"]
            verdict = ("no target" if target is None
                       else ("meets" if row["fused_us"] <= target else "MISSES") + f" <= {target:g} us")
            lines.append(f"{row['label'] + ' ' + 'x'.join(map(str, row['shape'])):44s} host {row['fused_us']:8.1f} us"
                         f" per step on {row['device']} ({verdict})")
            continue
        shape = "x".join(map(str, row["shape"]))
        on = " on cuda" if row.get("device") == "cuda" else ""
        label = (f"scheduler.step {shape} eta {row['eta']:g}{on}" if row["kind"] == "scheduler-step"
                 else f"sampler/step {row['case']} {shape}")
        base = row.get("stock_us", row.get("reference_us"))
        target_us = row.get("target_us")
        if row["target"] is None:
            verdict = "no target"
        elif target_us is not None:
            ok = row["ratio"] <= row["target"] and row["fused_us"] <= target_us
            verdict = ("meets" if ok else "MISSES") + f" <= {target_us:g} us and <= {row['target']}x"
        else:
            verdict = ("meets" if row["ratio"] <= row["target"] else "MISSES") + f" <= {row['target']}"
        lines.append(f"{label:44s} fused {row['fused_us']:8.1f} us  baseline {base:8.1f} us  "
                     f"ratio {row['ratio']:.2f} ({verdict})")
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="A/B rounds per case (default 20)")
    parser.add_argument("--out-dir", type=Path, default=None, help="write host.json and host.txt here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: the ratio targets; cuda: host time per step on the GPU path")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.set_num_threads(1)
    if args.device == "cuda":
        rows = gpu_rows(args.rounds, torch.device("cuda"))
        try:
            rows += scheduler_rows(max(1, args.rounds // 4), torch.device("cuda"))
        except ImportError as err:  # diffusers is optional on a GPU machine
            print(f"scheduler rows skipped: diffusers is not installed ({err})")
    else:
        rows = (sampler_rows(args.rounds) + scheduler_rows(max(1, args.rounds // 4))
                + op_rows(args.rounds, torch.device("cpu"), None))
    text = format_rows(rows)
    print(text)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        _write(args.out_dir / "host.json", json.dumps(rows, indent=2) + "\n")
        _write(args.out_dir / "host.txt", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
