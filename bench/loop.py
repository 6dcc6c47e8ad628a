"""Whole sampling loops: 50 DDIM steps, fused sampler vs reference vs diffusers.

With the trivial eps-model (it returns its input: no work, no allocation) and a tiny
latent, a loop's time is the samplers' own per-step cost: host overhead (Python,
argument checks, coefficient lookups, op dispatch or kernel launches). The measured
cost of the model call is subtracted to give the host overhead per step. With the
embedded digits model (when shipped) the loop is a real, small end-to-end sample.
On CUDA the fused loop is also captured in a CUDA graph (one replay = 50 steps).

Before any timing, every loop's result is checked once against the reference sampler
run with the same noise: the keyed Philox noise fed to it for the fused sampler's
default noise, torch.randn from the same torch seed otherwise (`verify`).
"""
from __future__ import annotations

import numpy as np
import torch

from ddim_fused import DDIMSampler, ReferenceDDIMSampler
from ddim_fused.metrics import relative_rms_error
from ddim_fused.philox import keyed_normal_torch
from ddim_fused.schedules import make_alpha_bar

from .cases import ALPHA_BAR, DISCRETIZE, ETA, GUIDANCE, N_STEPS, SEED
from .providers import diffusers_scheduler
from .timing import sync, time_host, time_interleaved

LOOP_PROVIDERS = ("fused", "reference", "diffusers", "fused-cudagraph")
# Relative RMS error of a 50-step fp32 loop against the reference's fp32 loop: rounding
# differences of two fp32 formulas, compounded over the steps.
LOOP_RTOL = 1e-5
# A trained model's loops: no fp32 loop may sit further than this from the reference
# (the digits model measured 2e-5, 3.7e-4 under guidance, on an H100).
MODEL_LOOP_CAP = 1e-3
LOOP_TORCH_SEED = 2468  # torch's seed before each checked run, so torch.randn draws agree


class TrivialEps:
    """eps-model that returns x itself: isolates the samplers' own per-step cost."""

    n_steps = 1000

    def __init__(self, alpha_bar):
        self.alpha_bar = alpha_bar

    def __call__(self, x, t, cond):
        return x


def _cond(batch, device):
    return torch.ones(batch, device=device), torch.zeros(batch, device=device)


def loop_fns(model, shape, device, dtype, *, eta=0.0, cfg=False, noise_source="philox", cond=None,
             uncond=None, backend="auto"):
    """Zero-argument callables, one per loop provider, each running a whole 50-step sample.

    Args:
        model: eps-model (protocol of the samplers) with alpha_bar.
        shape: (B, *s) latent shape.
        device, dtype: of the latent.
        eta: DDIM eta; cfg: classifier-free guidance (batch-doubled model call).
        noise_source: the fused sampler's noise ("philox" keyed, or "torch" randn).
        cond, uncond: conditioning tensors (default: (B,) ones and zeros).

    Returns:
        ({provider: fn}, {provider: reason it is missing}, {provider: the reference run
        (a zero-argument callable) that its result must match, see `verify`}).
    """
    gen = torch.Generator().manual_seed(SEED)
    x_T = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if cond is None:
        cond, uncond = _cond(shape[0], device)
    scale = GUIDANCE if cfg else 1.0
    un = uncond if cfg else None
    fused = DDIMSampler(model, N_STEPS, DISCRETIZE, eta, backend=backend, noise_source=noise_source, seed=SEED)
    ref = ReferenceDDIMSampler(model, N_STEPS, DISCRETIZE, eta)
    fns, missing = {}, {}
    fns["fused"] = lambda: fused.sample(shape, cond, x_last=x_T, uncond_scale=scale, uncond_cond=un)
    fns["reference"] = lambda: ref.sample(shape, cond, x_last=x_T, uncond_scale=scale, uncond_cond=un)
    numel = int(np.prod(shape[1:]))

    def step_noise(index):
        return keyed_normal_torch(shape[0], numel, SEED, index, "step", 0, device=device).view(shape).to(dtype)

    def keyed_reference():
        return ref.sample(shape, cond, x_last=x_T, uncond_scale=scale, uncond_cond=un, step_noise=step_noise)

    # The reference run each provider must reproduce (same noise), for `verify`: the
    # fused sampler's keyed noise fed to the reference, or torch.randn drawn alike.
    keyed = noise_source == "philox" and eta != 0
    expected = {"fused": keyed_reference if keyed else fns["reference"], "diffusers": fns["reference"]}
    expected["fused-cudagraph"] = expected["fused"]
    try:
        alpha_bar = np.asarray(torch.as_tensor(model.alpha_bar, dtype=torch.float64))
        sched = diffusers_scheduler(alpha_bar)
        fns["diffusers"] = _diffusers_loop(sched, model, x_T, cond, un, scale, eta)
    except ImportError as err:
        missing["diffusers"] = f"diffusers is not installed ({err})"
    if device.type != "cuda":
        missing["fused-cudagraph"] = "needs CUDA"
    elif noise_source == "torch" and eta != 0:
        missing["fused-cudagraph"] = "torch.randn inside a CUDA graph replays other numbers than the reference draws"
    else:
        try:
            fns["fused-cudagraph"] = _graph_loop(fused, shape, cond, x_T, scale, un)
        except Exception as err:  # noqa: BLE001 - capture can fail in many ways; report, don't crash
            missing["fused-cudagraph"] = f"CUDA graph capture failed: {type(err).__name__}: {err}"
    return fns, missing, expected


def verify(fns: dict, expected: dict, rtol: float = LOOP_RTOL) -> dict:
    """Each provider's loop result against the reference run it must reproduce.

    Returns:
        {provider: {"check_error": rel RMS error, "check_bound": rtol, "parity_ok": bool}};
        the reference itself is the yardstick and gets no entry.
    """
    out = {}
    for name, fn in fns.items():
        if name not in expected:
            continue
        torch.manual_seed(LOOP_TORCH_SEED)
        got = fn()
        torch.manual_seed(LOOP_TORCH_SEED)
        want = expected[name]()
        err = relative_rms_error(got, want)
        out[name] = {"check_error": err, "check_bound": rtol, "parity_ok": bool(np.isfinite(err) and err <= rtol)}
    return out


def _diffusers_loop(sched, model, x_T, cond, uncond, scale, eta):
    """A diffusers-pipeline-style loop: set_timesteps, model call, CFG combine, scheduler.step."""

    @torch.no_grad()
    def run():
        sched.set_timesteps(N_STEPS)
        x = x_T
        for t in sched.timesteps:
            ts = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
            if uncond is not None:
                out = model(torch.cat([x, x]), torch.cat([ts, ts]), torch.cat([uncond, cond]))
                e_u, e_c = out.chunk(2)
                eps = e_u + scale * (e_c - e_u)
            else:
                eps = model(x, ts, cond)
            x = sched.step(eps, t, x, eta=eta, return_dict=False)[0]
        return x

    return run


def _graph_loop(fused, shape, cond, x_T, scale, uncond):
    """The sampler's own captured loop (`sample(..., cuda_graph=True)`): the first call
    captures, every later one copies x_T in and replays all 50 steps."""

    def run():
        return fused.sample(shape, cond, x_last=x_T, uncond_scale=scale, uncond_cond=uncond, cuda_graph=True)

    run()  # capture outside the timed calls
    return run


def loop_configs(quick: bool):
    """(id, shape, eta, cfg, noise_source) of the trivial-model loops."""
    tiny = (1, 4, 8, 8)
    configs = [("eta0", tiny, 0.0, False, "philox"), ("cfg", tiny, 0.0, True, "philox"),
               ("eta-philox", tiny, ETA, False, "philox"), ("eta-randn", tiny, ETA, False, "torch")]
    if not quick:
        configs.append(("eta0-4x64x64", (1, 4, 64, 64), 0.0, False, "philox"))
    return configs


def run_loops(device: torch.device, quick: bool, budget_s: float, log=print) -> list[dict]:
    """Time every loop config and provider; rows include per-step time and host overhead (us)."""
    model = TrivialEps(make_alpha_bar(ALPHA_BAR, 1000))
    rows = []
    for loop_id, shape, eta, cfg, noise_source in loop_configs(quick):
        fns, missing, expected = loop_fns(model, shape, device, torch.float32, eta=eta, cfg=cfg,
                                          noise_source=noise_source)
        checks = verify(fns, expected)
        x = torch.zeros(shape, device=device)
        ts = torch.zeros(shape[0], dtype=torch.long, device=device)
        model_s = time_host(lambda: model(x, ts, None), device, budget_s=0.02)["p50"]
        times = time_interleaved(fns, device, budget_s=budget_s, warmup=1, min_samples=5)
        for name in LOOP_PROVIDERS:
            if name in missing:
                rows.append(_loop_row(loop_id, "trivial", shape, name, None, 0.0, missing[name]))
                continue
            # One model call per step (batch-doubled under CFG); a graph replay has no Python model call.
            row = _loop_row(loop_id, "trivial", shape, name, times[name], 0.0 if name == "fused-cudagraph" else model_s)
            row.update(checks.get(name, {}))
            rows.append(row)
            log(f"  loop {loop_id:14s} {name:16s} {row['per_step_us']:9.1f} us/step  "
                f"overhead {row['host_overhead_us']:9.1f} us/step{_check_note(row)}")
    rows += _digits_loops(device, budget_s, log)
    return rows


def _check_note(row) -> str:
    if "check_error" not in row:
        return ""
    verdict = "ok" if row["parity_ok"] else "FAILED"
    return f"  check vs reference {row['check_error']:.1e} <= {row['check_bound']:.0e} {verdict}"


def _loop_row(loop_id, model, shape, name, t, model_s, skipped=None):
    row = {"kind": "loop", "loop": loop_id, "model": model, "shape": list(shape), "provider": name,
           "steps": N_STEPS, "skipped": skipped}
    if t is not None:
        per_step = t["p50"] / N_STEPS
        row.update(p20_s=t["p20"], p50_s=t["p50"], p80_s=t["p80"], per_step_us=per_step * 1e6,
                   host_overhead_us=(per_step - model_s) * 1e6)
    return row


def _against_diffusers(checks: dict) -> dict:
    """The checks of a trained model's loops: a 50-step loop amplifies the rounding of two
    fp32 formulas far beyond LOOP_RTOL (more so under guidance), so there diffusers' own
    fp32 loop is the yardstick: each fused loop may be at most twice its distance from the
    reference (the tests' rule). Every loop, diffusers' too, must stay within MODEL_LOOP_CAP
    (which alone bounds the fused loops where diffusers is not installed)."""
    yardstick = checks.get("diffusers", {}).get("check_error")
    finite = yardstick is not None and bool(np.isfinite(yardstick))
    for name, check in checks.items():
        bound = MODEL_LOOP_CAP if name == "diffusers" or not finite else min(MODEL_LOOP_CAP,
                                                                            max(LOOP_RTOL, 2 * yardstick))
        check.update(check_bound=bound, parity_ok=bool(np.isfinite(check["check_error"]) and check["check_error"] <= bound))
    return checks


def _digits_loops(device, budget_s, log):
    try:
        from ddim_fused.digits import load_digits_model  # noqa: PLC0415
        model = load_digits_model(device=device)
    except Exception as err:  # noqa: BLE001 - an optional model: any failure is a skip with its reason
        reason = f"digits model unavailable: {type(err).__name__}: {err}"
        log(f"  loop digits: skipped ({reason})")
        return [_loop_row("digits", "digits", (16, 1, 8, 8), "fused", None, 0.0, reason)]
    B = 16
    shape = (B, *model.image_shape)
    cond = model.cond([i % 10 for i in range(B)])
    rows = []
    for loop_id, cfg in (("digits", False), ("digits-cfg", True)):
        fns, missing, expected = loop_fns(model, shape, device, torch.float32, cfg=cfg, cond=cond,
                                          uncond=model.null_cond(B))
        checks = _against_diffusers(verify(fns, expected))
        times = time_interleaved(fns, device, budget_s=budget_s, warmup=1, min_samples=5)
        for name in LOOP_PROVIDERS:
            if name in missing:
                rows.append(_loop_row(loop_id, "digits", shape, name, None, 0.0, missing[name]))
                continue
            row = _loop_row(loop_id, "digits", shape, name, times[name], 0.0)
            row.pop("host_overhead_us")  # the model's cost dominates: no overhead claim here
            row.update(checks.get(name, {}))
            rows.append(row)
            log(f"  loop {loop_id:14s} {name:16s} {row['per_step_us']:9.1f} us/step (digits UNet included)"
                f"{_check_note(row)}")
    sync(device)
    return rows
