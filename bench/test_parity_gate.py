"""The parity gate must pass every correct provider and reject a wrong one (never vacuously).

Plain tests (no benchmark fixture): run with `pytest bench/test_parity_gate.py`;
`--benchmark-only` skips them.
"""
import math

import pytest
import torch

from bench.cases import CASES, GUIDANCE, make_inputs
from bench.parity import BASELINE_SLACK, check_group, exact_outputs, low_precision_bounds
from bench.providers import Providers, availability
from ddim_fused.metrics import relative_rms_error

SHAPE = (2, 3, 17, 23)


def _providers_with(device, name, wrap, *more):
    """Providers whose `name` returns wrap(its outputs) instead of its outputs (more: further
    name, wrap pairs)."""
    providers = Providers(device)
    make = providers.make
    wraps = dict(zip((name,) + more[::2], (wrap,) + more[1::2]))

    def patched(n, case, inputs, dtype_id=""):
        fn = make(n, case, inputs, dtype_id)
        return (lambda: wraps[n](fn())) if n in wraps else fn

    providers.make = patched
    return providers


@pytest.mark.parametrize("case_name", ["eta0-x0", "eta-drawn", "cfg", "paint"])
def test_gate_accepts_every_available_provider(device, case_name):
    names = [n for n in ("torch", "labml", "minimal", "diffusers") if availability(n, device)[0]]
    case = CASES[case_name]
    checks = check_group(Providers(device), names, case, "fp32", make_inputs(case, SHAPE, torch.float32, device))
    assert {c.provider for c in checks} == set(names)
    assert {c.output for c in checks} == set(case.outputs)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_gate_accepts_the_compiled_baseline(device):
    case = CASES["eta-drawn"]  # drawn noise too: fallback_random makes it torch.randn's
    checks = check_group(Providers(device), ["compile"], case, "fp32", make_inputs(case, SHAPE, torch.float32, device))
    assert checks and all(c.ok for c in checks), checks


@pytest.mark.parametrize("output", [0, 1], ids=["x_prev", "pred_x0"])
def test_gate_rejects_one_perturbed_element_of_any_output(device, output):
    case = CASES["eta0-x0"]
    inputs = make_inputs(case, SHAPE, torch.float32, device)

    def perturb(outs):
        outs = [o.clone() for o in outs]
        outs[output].view(-1)[7] += 1e-2 * outs[output].abs().max()
        return tuple(outs)

    checks = check_group(_providers_with(device, "torch", perturb), ["torch"], case, "fp32", inputs)
    bad = [c.output for c in checks if not c.ok]
    assert bad == [case.outputs[output]]


def test_gate_rejects_nan_and_missing_outputs(device):
    case = CASES["eta0-x0"]
    inputs = make_inputs(case, SHAPE, torch.float32, device)

    def nan(outs):
        first = outs[0].clone()
        first.view(-1)[0] = float("nan")
        return (first,) + tuple(outs[1:])

    assert not all(c.ok for c in check_group(_providers_with(device, "torch", nan), ["torch"], case, "fp32", inputs))
    only_x_prev = _providers_with(device, "torch", lambda outs: outs[:1])
    assert not all(c.ok for c in check_group(only_x_prev, ["torch"], case, "fp32", inputs))


@pytest.mark.parametrize("name", ["torch", "minimal"])
def test_drawn_noise_must_be_the_providers_own_stream(device, name):
    # Not moments: noise with the right statistics from the wrong stream is rejected.
    case = CASES["eta-drawn"]
    inputs = make_inputs(case, SHAPE, torch.float32, device)
    providers = Providers(device)
    coef = providers.samplers(case.eta).coefs.noise_coef

    def other_noise(outs):
        return (outs[0] + coef * torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(99)).to(device),)

    assert all(c.ok for c in check_group(providers, [name], case, "fp32", inputs))
    assert not any(c.ok for c in check_group(_providers_with(device, name, other_noise), [name], case, "fp32", inputs))
    quiet = _providers_with(device, name, lambda outs: (outs[0] * 0 + exact_outputs(
        providers, CASES["eta0"], inputs)[0].float(),))
    assert not any(c.ok for c in check_group(quiet, [name], case, "fp32", inputs))


def test_low_precision_bound_is_twice_the_better_eager_error(device):
    case = CASES["cfg"]
    inputs = make_inputs(case, SHAPE, torch.bfloat16, device)
    providers = Providers(device)
    results = {}
    (bound, _), = low_precision_bounds(providers, case, inputs, "bf16", results)
    errs = [relative_rms_error(results[n][0][0], results[n][1][0]) for n in ("labml", "minimal")]
    exact = results["labml"][1][0]
    floor = relative_rms_error(exact.to(torch.bfloat16), exact)
    assert bound == pytest.approx(2 * max(min(errs), floor))
    assert bound < 2 * max(errs) or errs[0] == errs[1]  # the looser eager does not set it
    # A bf16 result 1% off everywhere is rejected although bf16 keeps only 8 bits.
    wrong = _providers_with(device, "torch", lambda outs: ((outs[0].float() * 1.01).to(torch.bfloat16),))
    assert not all(c.ok for c in check_group(wrong, ["torch"], case, "bf16", inputs))
    assert all(c.ok for c in check_group(providers, ["torch"], case, "bf16", inputs))


def test_low_precision_baselines_get_slack_but_fused_providers_do_not(device):
    """An error 3x the fused bound passes a baseline (op-by-op rounding) and fails a fused
    provider; a wrong formula fails both."""
    case = CASES["eta0"]
    inputs = make_inputs(case, SHAPE, torch.bfloat16, device)
    (bound, _), = low_precision_bounds(Providers(device), case, inputs, "bf16", {})
    exact = exact_outputs(Providers(device), case, inputs)[0]
    noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(3)).to(exact.device, torch.float64)
    blurred = exact + noise * (3 * bound * exact.norm() / noise.norm())  # rel RMS error ~3x the bound

    def off(outs):
        return (blurred.to(torch.bfloat16),)

    for name in ("torch", "labml"):
        (check,) = check_group(_providers_with(device, name, off), [name], case, "bf16", inputs)
        assert 2 * bound < check.error < BASELINE_SLACK * bound
        assert check.ok == (name == "labml"), check
    wrong = _providers_with(device, "labml", lambda outs: ((outs[0].float() * 1.05).to(torch.bfloat16),))
    assert not any(c.ok for c in check_group(wrong, ["labml"], case, "bf16", inputs))


def test_guided_baselines_get_slack_scaled_by_the_guidance(device):
    """With guidance a baseline's error may reach BASELINE_SLACK * GUIDANCE times the fused
    bound (it rounds eps_c - eps_u before scaling it); a fused provider's may not."""
    case = CASES["cfg"]
    inputs = make_inputs(case, SHAPE, torch.float16, device)
    (bound, _), = low_precision_bounds(Providers(device), case, inputs, "fp16", {})
    exact = exact_outputs(Providers(device), case, inputs)[0]
    noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(5)).to(exact.device, torch.float64)
    scale = 2 * BASELINE_SLACK  # past the unguided slack, inside the guided one (GUIDANCE >= 2)
    blurred = exact + noise * (scale * bound * exact.norm() / noise.norm())

    def off(outs):
        return (blurred.to(torch.float16),)

    for name in ("torch", "labml"):
        (check,) = check_group(_providers_with(device, name, off), [name], case, "fp16", inputs)
        assert BASELINE_SLACK * bound < check.error < BASELINE_SLACK * GUIDANCE * bound
        assert check.ok == (name == "labml"), check


def test_low_precision_bound_ignores_an_eager_result_with_inf(device):
    # "At most twice eager's error" must not become "anything" when an eager run overflowed.
    case = CASES["eta0"]
    inputs = make_inputs(case, SHAPE, torch.float16, device)
    def overflow(outs):
        return (outs[0].clone().fill_(float("inf")),)

    providers = _providers_with(device, "labml", overflow, "minimal", overflow)
    results = {}
    (bound, _), = low_precision_bounds(providers, case, inputs, "fp16", results)
    assert math.isfinite(bound) and bound < 1e-2
