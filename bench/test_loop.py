"""Whole 50-step loops under pytest-benchmark: fused sampler vs reference vs diffusers.

The trivial eps-model and a tiny latent leave only the samplers' own per-step cost.
"""
import pytest
import torch

from bench import loop
from bench.cases import ETA
from bench.loop import TrivialEps, loop_fns, verify
from bench.providers import availability
from ddim_fused.schedules import make_alpha_bar

CONFIGS = {"eta0": (0.0, False, "philox"), "cfg": (0.0, True, "philox"),
           "eta-philox": (ETA, False, "philox"), "eta-randn": (ETA, False, "torch")}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("provider", ["fused", "reference", "diffusers", "fused-cudagraph"])
def test_loop(benchmark, device, provider, config):
    if provider == "diffusers":
        ok, reason = availability("diffusers", device)
        if not ok:
            pytest.skip(reason)
    eta, cfg, noise_source = CONFIGS[config]
    model = TrivialEps(make_alpha_bar("scaled_linear", 1000))
    fns, missing, expected = loop_fns(model, (1, 4, 8, 8), device, torch.float32, eta=eta, cfg=cfg,
                                      noise_source=noise_source)
    if provider in missing:
        pytest.skip(missing[provider])
    # The loop's result against the reference run with the same noise, before any timing.
    check = verify({provider: fns[provider]}, expected).get(provider)
    assert check is None or check["parity_ok"], f"{provider} {config}: {check}"
    if device.type == "cuda":
        def run():
            fns[provider]()
            torch.cuda.synchronize()
    else:
        run = fns[provider]
    benchmark.extra_info.update(provider=provider, config=config, steps=50)
    benchmark(run)


def test_a_model_loop_is_held_to_twice_diffusers_distance():
    def check(err):
        return {"check_error": err, "check_bound": loop.LOOP_RTOL, "parity_ok": err <= loop.LOOP_RTOL}

    checks = loop._against_diffusers({"fused": check(3e-4), "fused-cudagraph": check(8e-4), "diffusers": check(2e-4)})
    assert checks["fused"]["parity_ok"] and not checks["fused-cudagraph"]["parity_ok"]
    assert checks["fused"]["check_bound"] == 4e-4 and checks["diffusers"]["parity_ok"]
    # Every loop stays within the cap, diffusers' included.
    far = loop._against_diffusers({"fused": check(0.5), "diffusers": check(0.4)})
    assert not far["fused"]["parity_ok"] and not far["diffusers"]["parity_ok"]
    # Without a finite yardstick (diffusers missing or NaN) the cap alone bounds the fused loops.
    alone = loop._against_diffusers({"fused": check(3e-4)})
    assert alone["fused"]["parity_ok"] and alone["fused"]["check_bound"] == loop.MODEL_LOOP_CAP
    nan = loop._against_diffusers({"fused": check(3e-4), "diffusers": check(float("nan"))})
    assert nan["fused"]["parity_ok"] and not nan["diffusers"]["parity_ok"]
