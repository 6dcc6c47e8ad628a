"""The parity gate must reject a wrong provider (so it cannot pass vacuously).

Plain tests (no benchmark fixture): run with `pytest bench/test_parity_gate.py`;
`--benchmark-only` skips them.
"""
import torch

from bench.cases import CASES, make_inputs
from bench.parity import check_output, exact_step, noise_checks
from bench.providers import Providers, x_prev_of
from ddim_fused.metrics import relative_rms_error


def test_gate_accepts_torch_and_rejects_a_perturbed_output(device):
    providers = Providers(device)
    case = CASES["cfg"]
    inputs = make_inputs(case, (2, 3, 17, 23), torch.float32, device)
    exact = exact_step(providers, case, inputs)
    good = x_prev_of(providers.make("torch", case, inputs, "fp32")())
    assert check_output("torch", case, "fp32", good, exact, None).ok
    bad = good.clone()
    bad.view(-1)[7] += 1e-2 * good.abs().max()
    assert not check_output("torch", case, "fp32", bad, exact, None).ok
    nan = good.clone()
    nan.view(-1)[0] = float("nan")
    assert not check_output("torch", case, "fp32", nan, exact, None).ok


def test_low_precision_bound_ignores_an_eager_result_with_inf(device):
    # "At most twice eager's error" must not become "anything" when eager overflowed.
    providers = Providers(device)
    case = CASES["eta0"]
    inputs = make_inputs(case, (2, 3, 17, 23), torch.float16, device)
    exact = exact_step(providers, case, inputs)
    eager = x_prev_of(providers.make("eager", case, inputs, "fp16")())
    overflowed = eager.clone()
    overflowed.view(-1)[0] = float("inf")
    assert relative_rms_error(overflowed, exact) == float("inf")
    wrong = (exact * 1.1).half()
    assert not check_output("torch", case, "fp16", wrong, exact, eager).ok
    assert not check_output("torch", case, "fp16", wrong, exact, overflowed).ok


def test_noise_check_rejects_missing_noise(device):
    providers = Providers(device)
    case = CASES["eta-drawn"]
    inputs = make_inputs(case, (2, 3, 17, 23), torch.float32, device)
    assert all(c.ok for c in noise_checks(providers, ["torch", "eager"], case, "fp32", inputs))
    # A step that forgets its noise (here: adds zeros) has zero noise std: the gate must fail it.
    quiet = providers.make("torch", CASES["eta-noise"], dict(inputs, noise=torch.zeros_like(inputs["x"])), "fp32")
    providers_make = providers.make
    providers.make = lambda name, c, i, d: quiet
    try:
        assert not all(c.ok for c in noise_checks(providers, ["torch"], case, "fp32", inputs))
    finally:
        providers.make = providers_make
