"""The fused step and its baselines under pytest-benchmark (`pytest bench/ --benchmark-only`).

Each benchmark first checks its provider's output against the float64 reference, so a
wrong provider fails instead of producing a timing.
"""
import pytest
import torch

from bench.cases import CASES, DTYPES, make_inputs, shape_id
from bench.parity import check_group
from bench.providers import ALL, Providers, availability

SHAPES = [(1, 4, 64, 64), (8, 4, 64, 64), (16, 4, 128, 128)]
STEP_CASES = ["eta0", "eta-noise", "eta-drawn", "cfg", "paint"]
PROVIDERS = list(ALL)

_factory = {}


def _providers(device):
    if device not in _factory:
        _factory[device] = Providers(device)
    return _factory[device]


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("case_name", STEP_CASES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_step(benchmark, device, provider, case_name, shape):
    ok, reason = availability(provider, device)
    if not ok:
        pytest.skip(reason)
    if provider == "compile" and case_name not in ("eta0", "cfg"):
        pytest.skip("torch.compile is benchmarked on eta0 and cfg here (each compile costs seconds on CPU)")
    case, dtype = CASES[case_name], DTYPES["fp32"]
    providers = _providers(device)
    inputs = make_inputs(case, shape, dtype, device)
    for check in check_group(providers, [provider], case, "fp32", inputs):
        assert check.ok, f"{provider} {case_name} {check.output}: {check.what} = {check.error:.3e} > {check.bound:.1e}"
    fn = providers.make(provider, case, inputs, "fp32")
    if device.type == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
    else:
        run = fn
    benchmark.extra_info.update(provider=provider, case=case_name, shape=list(shape))
    benchmark(run)
