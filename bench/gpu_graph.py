"""Whole 50-step loops: `sample(cuda_graph=True)` against the same loop uncaptured and diffusers'.

Providers, each a full sample per call (fresh seed per call for the fused ones, so a
replay is timed as a user would run it: keys and inputs copied in, graph launched,
output cloned):
- fused: `DDIMSampler.sample(..., cuda_graph=False)` (lean per-step launches);
- fused-graph: `DDIMSampler.sample(..., cuda_graph=True)` (captured on the first call,
  which the warm-up absorbs; its capture time is reported separately);
- diffusers: a diffusers-pipeline-style loop over `DDIMScheduler.step`.
Models: the trivial eps-model (returns x: the loops' own cost) at 1x4x8x8 and 4x4x64x64,
with and without guidance, eta 0 and 1; and the embedded digits model (B=16) when it loads.

Before timing, the captured sample is checked against the uncaptured one for two seeds
(the same noise bits, see `ddim_fused.graph`; allowed 1e-4); a mismatch fails the run.

    python -m bench.gpu_graph [--out-dir DIR] [--budget-s S] [--device cuda]

Needs CUDA for the graph provider; on CPU it runs the other two (a smoke test).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddim_fused import DDIMSampler
from ddim_fused.schedules import make_alpha_bar

from .cases import ALPHA_BAR, DISCRETIZE, GUIDANCE, N_STEPS
from .loop import TrivialEps, _diffusers_loop
from .providers import diffusers_scheduler
from .timing import sync, time_interleaved

PROVIDERS = ("fused", "fused-graph", "diffusers")
TRIVIAL_CASES = (("tiny-eta0", (1, 4, 8, 8), 0.0, False), ("tiny-eta1", (1, 4, 8, 8), 1.0, False),
                 ("tiny-cfg", (1, 4, 8, 8), 0.0, True), ("sd-latent-eta1", (4, 4, 64, 64), 1.0, False))


def loop_fns(model, shape, device, eta, cfg, cond, uncond):
    """({provider: zero-argument callable running one whole sample}, {provider: why missing}, capture seconds)."""
    fused = DDIMSampler(model, N_STEPS, DISCRETIZE, eta)
    scale, un = (GUIDANCE, uncond) if cfg else (1.0, None)
    seeds = itertools.count(1)
    kwargs = dict(device=device, uncond_scale=scale, uncond_cond=un)
    fns, missing, capture_s = {}, {}, None
    fns["fused"] = lambda: fused.sample(shape, cond, seed=next(seeds), **kwargs)
    if device.type == "cuda":
        for seed in (11, 12):
            start = time.perf_counter()
            graphed = fused.sample(shape, cond, seed=seed, cuda_graph=True, **kwargs)
            sync(device)
            capture_s = capture_s or time.perf_counter() - start
            plain = fused.sample(shape, cond, seed=seed, **kwargs)
            if not torch.allclose(graphed, plain, rtol=1e-4, atol=1e-4):
                raise RuntimeError(f"captured and uncaptured samples differ for seed {seed}")
        fns["fused-graph"] = lambda: fused.sample(shape, cond, seed=next(seeds), cuda_graph=True, **kwargs)
    else:
        missing["fused-graph"] = "needs CUDA"
    try:
        alpha_bar = np.asarray(torch.as_tensor(model.alpha_bar, dtype=torch.float64))
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        fns["diffusers"] = _diffusers_loop(diffusers_scheduler(alpha_bar), model, x_T, cond, un, scale, eta)
    except ImportError as err:
        missing["diffusers"] = f"diffusers is not installed ({err})"
    return fns, missing, capture_s


def _rows(case, model_name, shape, fns, missing, capture_s, device, budget_s):
    times = time_interleaved(fns, device, budget_s=budget_s, warmup=1, min_samples=5)
    rows = []
    for name in PROVIDERS:
        row = {"case": case, "model": model_name, "shape": list(shape), "provider": name, "steps": N_STEPS,
               "skipped": missing.get(name)}
        if name in times:
            row.update(p20_s=times[name]["p20"], p50_s=times[name]["p50"], p80_s=times[name]["p80"],
                       per_step_us=times[name]["p50"] / N_STEPS * 1e6)
        if name == "fused-graph" and capture_s is not None:
            row["first_call_with_capture_s"] = capture_s
        rows.append(row)
    return rows


def _digits(device):
    """(model, shape, cond, uncond), or None with the reason it is unavailable."""
    try:
        from ddim_fused.digits import load_digits_model  # noqa: PLC0415 - optional model, may be absent
        model = load_digits_model(device=device)
    except Exception as err:  # noqa: BLE001 - an optional model: any failure is a skip with its reason
        return None, f"digits model unavailable: {type(err).__name__}: {err}"
    batch = 16
    return (model, (batch, *model.image_shape), model.cond([i % 10 for i in range(batch)]),
            model.null_cond(batch)), None


def run(device: torch.device, budget_s: float, log=print) -> list[dict]:
    """Every case and provider; rows with per-step times (us) or the reason a provider is missing."""
    trivial = TrivialEps(make_alpha_bar(ALPHA_BAR, 1000))
    rows = []
    for case, shape, eta, cfg in TRIVIAL_CASES:
        cond, uncond = torch.ones(shape[0], device=device), torch.zeros(shape[0], device=device)
        fns, missing, capture_s = loop_fns(trivial, shape, device, eta, cfg, cond, uncond)
        rows += _rows(case, "trivial", shape, fns, missing, capture_s, device, budget_s)
    digits, reason = _digits(device)
    if digits is None:
        rows.append({"case": "digits", "model": "digits", "provider": "all", "skipped": reason})
    else:
        model, shape, cond, uncond = digits
        for case, cfg in (("digits", False), ("digits-cfg", True)):
            fns, missing, capture_s = loop_fns(model, shape, device, 0.0, cfg, cond, uncond)
            rows += _rows(case, "digits", shape, fns, missing, capture_s, device, budget_s)
    for row in rows:
        timing = f"{row['per_step_us']:9.1f} us/step" if "per_step_us" in row else f"skipped: {row['skipped']}"
        log(f"  {row['case']:16s} {row['provider']:12s} {timing}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_graph", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None, help="write gpu_graph.json there")
    parser.add_argument("--budget-s", type=float, default=0.5, help="rough timing budget per provider and case")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.gpu_graph: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    with torch.no_grad():
        rows = run(device, args.budget_s)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        path = args.out_dir / "gpu_graph.json"
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "x") as f:
            json.dump({"device": str(device), "rows": rows}, f, indent=1)
        tmp.replace(path)
        print(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
