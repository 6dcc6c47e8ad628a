"""Parity of every provider against the reference before any speedup is reported.

The exact result is the eager reference run in float64 on the same inputs. fp32
providers must match it to a relative RMS error of FP32_RTOL; in fp16/bf16 a provider's
error may be at most twice the eager reference's own error in that dtype (plus a floor
for dtypes where eager happens to be nearly exact). Steps that draw their own noise
cannot match bitwise: the fused Triton and torch paths share one Philox stream and are
compared with each other, and every provider's drawn noise, recovered as
(x_prev - x_prev without noise) / noise_coef, must look standard normal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddim_fused.metrics import relative_rms_error

from .cases import CASES, DTYPES, INDEX, Case, make_inputs
from .providers import Providers, eager_step, x_prev_of

FP32_RTOL = 1e-5
LOW_PRECISION_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
PARITY_SHAPE = (2, 3, 17, 23)  # not a multiple of any block size


@dataclass
class Check:
    """One comparison: what was compared, its error, its bound, and whether it passed."""

    provider: str
    case: str
    dtype: str
    error: float
    bound: float
    what: str

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.bound


def exact_step(providers: Providers, case: Case, inputs: dict) -> torch.Tensor:
    """The reference step in float64 on the same inputs (noise given, so deterministic)."""
    s = providers.samplers(case.eta)
    args = [t.double() if t is not None else None for t in
            (inputs["x"], inputs["model_out"], inputs["noise"], inputs["orig"], inputs["orig_noise"], inputs["mask"])]
    return x_prev_of(eager_step(s.ref, case)(*args))


def check_output(name: str, case: Case, dtype_id: str, out: torch.Tensor, exact: torch.Tensor,
                 eager_out: torch.Tensor | None) -> Check:
    """Compare one provider's x_prev with the float64 reference under the dtype's rule."""
    err = relative_rms_error(out, exact)
    if out.dtype in (torch.float32, torch.float64):
        return Check(name, case.name, dtype_id, err, FP32_RTOL, "rel RMS vs float64 reference")
    eager_err = relative_rms_error(eager_out, exact) if eager_out is not None else 0.0
    floor = LOW_PRECISION_FLOOR.get(out.dtype, 1e-3)
    # An eager result with NaN/Inf (error inf) would make "2x eager's error" accept anything.
    bound = max(2 * eager_err, floor) if math.isfinite(eager_err) else floor
    return Check(name, case.name, dtype_id, err, bound, "rel RMS vs float64 reference, <= 2x eager's")


def noise_checks(providers: Providers, names, case: Case, dtype_id: str, inputs: dict) -> list[Check]:
    """For steps that draw noise: fused paths agree with each other; every noise looks N(0, 1)."""
    det_case = Case(case.name + "-nonoise", eta=case.eta, noise="tensor", cfg=case.cfg, paint=case.paint)
    zero = dict(inputs, noise=torch.zeros_like(inputs["x"]))
    base = exact_step(providers, det_case, zero)
    coef = float(providers.samplers(case.eta).fused.coefs.noise_scale[INDEX])
    checks, outs = [], {}
    for name in names:
        out = x_prev_of(providers.make(name, case, inputs, dtype_id)())
        outs[name] = out
        z = (out.double().cpu() - base.cpu()) / coef
        # Over n >= 2000 normals the sample std is within 0.1 of 1 with overwhelming probability;
        # in fp16/bf16 the rounding of x_prev adds a little spread, hence the wider bound there.
        tol = 0.1 if out.dtype == torch.float32 else 0.2
        checks.append(Check(name, case.name, dtype_id, abs(z.std().item() - 1.0), tol, "|std of drawn noise - 1|"))
        checks.append(Check(name, case.name, dtype_id, abs(z.mean().item()), tol, "|mean of drawn noise|"))
    if "triton" in outs and "torch" in outs and outs["torch"].dtype == torch.float32:
        checks.append(Check("triton", case.name, dtype_id, relative_rms_error(outs["triton"], outs["torch"]), FP32_RTOL,
                            "rel RMS vs torch backend (same Philox stream)"))
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
        inputs = make_inputs(case, shape, dtype, device)
        if not case.deterministic:
            checks += noise_checks(providers, names, case, dtype_id, inputs)
            continue
        exact = exact_step(providers, case, inputs)
        eager_out = x_prev_of(providers.make("eager", case, inputs, dtype_id)())
        for name in names:
            out = x_prev_of(providers.make(name, case, inputs, dtype_id)())
            checks.append(check_output(name, case, dtype_id, out, exact, eager_out))
    return checks


def summarize(checks: list[Check]) -> str:
    """One line per failed check, or a one-line pass summary."""
    bad = [c for c in checks if not c.ok]
    if not bad:
        return f"parity: {len(checks)} checks passed"
    lines = [f"parity: {len(bad)} of {len(checks)} checks FAILED"]
    lines += [f"  {c.provider} {c.case} {c.dtype}: {c.what} = {c.error:.3e} > {c.bound:.1e}" for c in bad]
    return "\n".join(lines)
