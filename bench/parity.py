"""Parity of every provider against the reference before any speedup is reported.

The exact result is labml's formula (the eager reference) run in float64 on the same
inputs and the same noise. Every output a provider returns is gated (x_prev, and
pred_x0 where a case times it):
- fp32: relative RMS error <= FP32_RTOL.
- fp16/bf16: the fused providers at most twice the error of the better eager baseline
  (labml or minimal) in that dtype on the same inputs, never tighter than twice the
  error of the exact result rounded once to the dtype (the least error any stored result
  can have). The baselines themselves round after every op, some more often than
  others (on an H200, bf16: labml 2.0x and diffusers 2.8x minimal's error), so they get
  BASELINE_SLACK times that bound: still far below what a wrong formula gives. With
  guidance, labml and diffusers round eps_c - eps_u to the dtype before scaling it by the
  guidance, so their error grows with the scale (on an H200, cfg fp16 at 7.5: 10x
  minimal's error); their slack is multiplied by the scale.
- Drawn noise is reproduced, not judged on its moments: the fused providers' against
  the keyed Philox stream, the others' against torch.randn from the same torch seed
  (`bench.providers.drawn_noise`); the exact result then uses that very noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddim_fused.metrics import relative_rms_error

from .cases import CASES, DTYPES, GUIDANCE, Case, make_inputs
from .providers import EAGER, FUSED, Providers, drawn_noise, labml_step

FP32_RTOL = 1e-5
BASELINE_SLACK = 4.0  # fp16/bf16 baselines: their op-by-op rounding, see the module docstring
GATE_SEED = 4321  # torch's seed before each provider call, so torch.randn draws are reproducible
PARITY_SHAPE = (2, 3, 17, 23)  # not a multiple of any block size


@dataclass
class Check:
    """One comparison: which output of which provider, its error, its bound, and the rule."""

    provider: str
    case: str
    dtype: str
    output: str
    error: float
    bound: float
    what: str

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.bound


def exact_outputs(providers: Providers, case: Case, inputs: dict, noise=None) -> tuple:
    """labml's step in float64 on the same inputs (noise: the step noise, if the case has any)."""
    s = providers.samplers(case.eta)
    noise = inputs["noise"] if noise is None else noise
    args = [t.double() if t is not None else None for t in
            (inputs["x"], inputs["model_out"], noise, inputs["orig"], inputs["orig_noise"], inputs["mask"])]
    return labml_step(s.ref, case)(*args)


def run_provider(providers: Providers, name: str, case: Case, inputs: dict, dtype_id: str) -> tuple[tuple, tuple]:
    """(provider's outputs, the float64 exact outputs for the noise it drew)."""
    torch.manual_seed(GATE_SEED)
    outs = tuple(providers.make(name, case, inputs, dtype_id)())
    noise = None
    if not case.deterministic:
        torch.manual_seed(GATE_SEED)
        noise = drawn_noise(name, inputs)
    return outs, exact_outputs(providers, case, inputs, noise)


def low_precision_bounds(providers: Providers, case: Case, inputs: dict, dtype_id: str, results: dict) -> list:
    """Per output: (bound, rule) = twice the better eager baseline's error, floored at twice
    the once-rounded exact result's error. `results` caches provider runs by name."""
    dtype = inputs["x"].dtype
    bounds = []
    for k in range(len(case.outputs)):
        errs = []
        for name in EAGER:
            if name not in results:
                results[name] = run_provider(providers, name, case, inputs, dtype_id)
            outs, exact = results[name]
            errs.append(relative_rms_error(outs[k], exact[k]))
        finite = [e for e in errs if math.isfinite(e)]
        _, exact = results[EAGER[0]]
        floor = relative_rms_error(exact[k].to(dtype), exact[k])
        eager = min(finite) if finite else float("inf")
        bound = 2 * max(eager if math.isfinite(eager) else floor, floor)
        bounds.append((bound, f"rel RMS vs float64 reference, <= 2x the better eager's ({eager:.2e}; "
                              f"once-rounded {floor:.2e})"))
    return bounds


def check_group(providers: Providers, names, case: Case, dtype_id: str, inputs: dict) -> list[Check]:
    """Every output of every provider in `names` on one input, against its exact result."""
    results = {}
    dtype = inputs["x"].dtype
    if dtype in (torch.float32, torch.float64):
        bounds = [(FP32_RTOL, "rel RMS vs float64 reference")] * len(case.outputs)
    else:
        bounds = low_precision_bounds(providers, case, inputs, dtype_id, results)
    noise_rule = "" if case.deterministic else " (its drawn noise reproduced)"
    checks = []
    for name in names:
        if name not in results:
            results[name] = run_provider(providers, name, case, inputs, dtype_id)
        outs, exact = results[name]
        if len(outs) != len(case.outputs):
            checks.append(Check(name, case.name, dtype_id, "outputs", float("inf"), 0.0,
                                f"returned {len(outs)} outputs, expected {case.outputs}"))
            continue
        for k, out_name in enumerate(case.outputs):
            bound, rule = bounds[k]
            if dtype not in (torch.float32, torch.float64) and name not in FUSED:
                slack = BASELINE_SLACK * (GUIDANCE if case.cfg else 1.0)
                bound, rule = slack * bound, f"{slack:g}x ({rule}): a baseline"
            checks.append(Check(name, case.name, dtype_id, out_name, relative_rms_error(outs[k], exact[k]), bound,
                                rule + noise_rule))
    return checks


def run_parity(providers: Providers, names, device: torch.device, pairs, shape=PARITY_SHAPE) -> list[Check]:
    """The gate: every provider on every benchmarked (case, dtype), on a small odd-shaped input.

    Args:
        providers: the Providers factory.
        names: provider names to check (those that will be timed, plus triton where it runs).
        device: where to run.
        pairs: iterable of (case name, dtype id) that the benchmark will time.

    Returns:
        list of Check (all must pass before speedups are reported).
    """
    checks = []
    for case_name, dtype_id in pairs:
        case, dtype = CASES[case_name], DTYPES[dtype_id]
        checks += check_group(providers, names, case, dtype_id, make_inputs(case, shape, dtype, device))
    return checks


def summarize(checks: list[Check]) -> str:
    """One line per failed check, or a one-line pass summary."""
    bad = [c for c in checks if not c.ok]
    if not bad:
        return f"parity: {len(checks)} checks passed"
    lines = [f"parity: {len(bad)} of {len(checks)} checks FAILED"]
    lines += [f"  {c.provider} {c.case} {c.dtype} {c.output}: {c.what} = {c.error:.3e} > {c.bound:.1e}" for c in bad]
    return "\n".join(lines)
