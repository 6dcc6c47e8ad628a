"""What diffusers' own scheduler tests check, for the fused classes.

- `.compatibles` lists the fused class itself and every stock compatible class;
- saved configs name the stock class, load both ways, and a pipeline saved after
  `use_fused` loads in a fresh process that never imports ddim_fused;
- `add_noise` and the inversion full loop (diffusers' published figures) are unchanged.
"""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMInverseScheduler,
    DDIMPipeline,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
)

from ddim_fused.diffusers import FusedDDIMInverseScheduler, FusedDDIMScheduler, use_fused  # noqa: E402
from tests.helpers import (  # noqa: E402
    FP32_RTOL,
    assert_close,
    env_without_checkout,
    scheduler_dummy_model,
    scheduler_dummy_sample,
)

PAIRS = {"ddim": (FusedDDIMScheduler, DDIMScheduler), "inverse": (FusedDDIMInverseScheduler, DDIMInverseScheduler)}
CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
              steps_offset=1, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _loop(scheduler, steps=8):
    """The prev_samples of a short loop with a fixed nonlinear model."""
    scheduler.set_timesteps(steps)
    x, outs = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)), []
    for t in scheduler.timesteps:
        x = scheduler.step(torch.tanh(x + t / 1000), t, x).prev_sample
        outs.append(x)
    return outs


def _assert_same_loops(a, b):
    for i, (x, y) in enumerate(zip(_loop(a), _loop(b))):
        assert_close(x, y, rtol=FP32_RTOL, name=f"step {i}")


# --- compatibles ----------------------------------------------------------------------


@pytest.mark.parametrize("pair", list(PAIRS.values()), ids=list(PAIRS))
def test_compatibles_list_the_class_and_the_stock_classes(pair):
    fused_cls, stock_cls = pair
    fused = fused_cls(**CONFIG)
    compatibles = fused.compatibles
    assert compatibles[0] is fused_cls
    assert all(c is not None for c in compatibles)
    assert len(set(compatibles)) == len(compatibles)
    assert set(compatibles) == {fused_cls} | set(stock_cls(**CONFIG).compatibles)
    assert stock_cls in compatibles


@pytest.mark.parametrize("pair", list(PAIRS.values()), ids=list(PAIRS))
def test_every_compatible_class_round_trips_the_config(pair):
    """diffusers' test_compatibles: each compatible class builds from the fused config, and
    the fused class built back from it has the same config on the keys it had."""
    fused_cls, _ = pair
    fused = fused_cls(**CONFIG)
    init_keys = set(inspect.signature(fused_cls.__init__).parameters)
    assert len(fused.compatibles) >= 2
    for comp_cls in fused.compatibles:
        comp = comp_cls.from_config(fused.config)
        assert type(comp) is comp_cls
        back = fused_cls.from_config(comp.config)
        assert type(back) is fused_cls
        assert {k: v for k, v in back.config.items() if k in fused.config} == dict(fused.config), comp_cls.__name__
        assert not (set(back.config) - set(fused.config)) & init_keys  # extra keys only from other classes


# --- config save / load ---------------------------------------------------------------


@pytest.mark.parametrize("pair", list(PAIRS.values()), ids=list(PAIRS))
def test_saved_config_names_the_stock_class_and_loads_both_ways(pair, tmp_path):
    fused_cls, stock_cls = pair
    fused = fused_cls(**CONFIG)
    fused.save_pretrained(tmp_path / "fused")
    saved = json.loads((tmp_path / "fused" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == stock_cls.__name__
    assert fused.config["_class_name"] == fused_cls.__name__  # the object itself keeps its name
    stock_cls(**CONFIG).save_config(tmp_path / "stock")
    loaded = {
        "fused->fused": fused_cls.from_pretrained(tmp_path / "fused"),
        "fused->stock": stock_cls.from_pretrained(tmp_path / "fused"),
        "stock->fused": fused_cls.from_pretrained(tmp_path / "stock"),
    }
    assert type(loaded["fused->fused"]) is fused_cls and type(loaded["stock->fused"]) is fused_cls
    assert type(loaded["fused->stock"]) is stock_cls
    for name, other in loaded.items():
        assert _public(other.config) == _public(fused.config), name
    _assert_same_loops(loaded["fused->fused"], loaded["fused->stock"])
    _assert_same_loops(loaded["stock->fused"], stock_cls(**CONFIG))


def test_trained_betas_survive_a_save(tmp_path):
    fused = FusedDDIMScheduler(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist())
    fused.save_pretrained(tmp_path)
    for cls in (FusedDDIMScheduler, DDIMScheduler):
        assert cls.from_pretrained(tmp_path).betas.tolist() == fused.betas.tolist()


@pytest.mark.parametrize("source", [DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler],
                         ids=["DDIM", "PNDM", "Euler"])
def test_inverse_from_config_of_other_schedulers(source):
    config = source(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1).config
    fused, stock = FusedDDIMInverseScheduler.from_config(config), DDIMInverseScheduler.from_config(config)
    assert type(fused) is FusedDDIMInverseScheduler
    assert _public(fused.config) == _public(stock.config)
    _assert_same_loops(fused, stock)


# --- a pipeline saved after use_fused, loaded in a fresh process -------------------------


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


class _InversionPipe(DiffusionPipeline):
    """A minimal pipeline holding a sampling and an inversion scheduler (as DiffEdit does)."""

    def __init__(self, scheduler, inverse_scheduler):
        super().__init__()
        self.register_modules(scheduler=scheduler, inverse_scheduler=inverse_scheduler)


# Runs in a fresh interpreter: any import of ddim_fused fails, so loading cannot depend on
# it. Prints the loaded classes and configs as JSON and saves the DDIMPipeline's images.
_LOADER = textwrap.dedent('''
    import importlib.abc, json, sys

    class NoDdimFused(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ddim_fused" or name.startswith("ddim_fused."):
                raise ImportError("this process must load the pipeline without ddim_fused")
            return None

    sys.meta_path.insert(0, NoDdimFused())

    import torch
    from diffusers import DiffusionPipeline

    class InversionPipe(DiffusionPipeline):
        def __init__(self, scheduler, inverse_scheduler):
            super().__init__()
            self.register_modules(scheduler=scheduler, inverse_scheduler=inverse_scheduler)

    ddim_dir, inversion_dir, images_path = sys.argv[1:4]
    ddim = DiffusionPipeline.from_pretrained(ddim_dir)
    inversion = InversionPipe.from_pretrained(inversion_dir)
    ddim.set_progress_bar_config(disable=True)
    images = ddim(batch_size=2, num_inference_steps=6, eta=0.5, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    torch.save(images, images_path)
    report = {
        "pipeline": type(ddim).__name__,
        "scheduler": type(ddim.scheduler).__name__,
        "inversion": [type(inversion.scheduler).__name__, type(inversion.inverse_scheduler).__name__],
        "configs": [dict(s.config) for s in (ddim.scheduler, inversion.scheduler, inversion.inverse_scheduler)],
        "ddim_fused_imported": any(m.split(".")[0] == "ddim_fused" for m in sys.modules),
    }
    print(json.dumps(report, default=str))
''')


def test_pipeline_saved_after_use_fused_loads_in_a_fresh_process_without_ddim_fused(tmp_path):
    ddim = DDIMPipeline(unet=_tiny_unet(), scheduler=DDIMScheduler(prediction_type="v_prediction"))
    ddim.set_progress_bar_config(disable=True)
    inversion = _InversionPipe(DDIMScheduler(**CONFIG), DDIMInverseScheduler(**CONFIG))
    for pipe in (ddim, inversion):
        use_fused(pipe, backend="torch")
    assert type(ddim.scheduler) is FusedDDIMScheduler
    assert type(inversion.inverse_scheduler) is FusedDDIMInverseScheduler
    ddim.save_pretrained(tmp_path / "ddim")
    inversion.save_pretrained(tmp_path / "inversion")

    index = json.loads((tmp_path / "inversion" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["inverse_scheduler"] == ["diffusers", "DDIMInverseScheduler"]
    assert json.loads((tmp_path / "ddim" / "model_index.json").read_text())["scheduler"] == ["diffusers",
                                                                                           "DDIMScheduler"]

    env = env_without_checkout(HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", _LOADER, str(tmp_path / "ddim"), str(tmp_path / "inversion"),
                          str(tmp_path / "images.pt")], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert not report["ddim_fused_imported"]
    assert report["pipeline"] == "DDIMPipeline" and report["scheduler"] == "DDIMScheduler"
    assert report["inversion"] == ["DDIMScheduler", "DDIMInverseScheduler"]
    for loaded, ours in zip(report["configs"], (ddim.scheduler, inversion.scheduler, inversion.inverse_scheduler)):
        assert json.loads(json.dumps(_public(loaded))) == json.loads(json.dumps(_public(ours.config), default=str))

    # The stock pipeline loaded there draws the same images as the fused one here.
    stock_images = torch.load(tmp_path / "images.pt")
    fused_images = ddim(batch_size=2, num_inference_steps=6, eta=0.5, generator=torch.Generator().manual_seed(0),
                        output_type="pt").images
    assert_close(fused_images, stock_images, rtol=FP32_RTOL, name="images")


def test_use_fused_after_loading_and_after_manual_assignment(tmp_path):
    """A loaded pipeline has stock schedulers until use_fused; a scheduler assigned by hand
    is recorded by diffusers under ddim_fused's module until use_fused renames it."""
    pipe = _InversionPipe(DDIMScheduler(**CONFIG), DDIMInverseScheduler(**CONFIG))
    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe.config["scheduler"][0] == "ddim_fused.diffusers"
    kept = pipe.scheduler
    use_fused(pipe)
    assert pipe.scheduler is kept
    assert tuple(pipe.config["scheduler"]) == ("diffusers", "DDIMScheduler")
    pipe.save_pretrained(tmp_path)
    loaded = _InversionPipe.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is DDIMScheduler and type(loaded.inverse_scheduler) is DDIMInverseScheduler
    use_fused(loaded)
    assert type(loaded.scheduler) is FusedDDIMScheduler
    assert type(loaded.inverse_scheduler) is FusedDDIMInverseScheduler
    assert _public(loaded.scheduler.config) == _public(pipe.scheduler.config)


# --- add_noise and the inversion full loop ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_add_noise_is_diffusers_and_leaves_the_step_intact(dtype):
    """DDIMScheduler.add_noise, inherited (DDIMInverseScheduler has none, in diffusers too)."""
    fused, stock = FusedDDIMScheduler(**CONFIG), DDIMScheduler(**CONFIG)
    for s in (fused, stock):
        s.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 3, 8, 8, generator=gen).to(dtype), torch.randn(3, 3, 8, 8, generator=gen).to(dtype)
    for timesteps in (fused.timesteps[:1], fused.timesteps[3:6], torch.tensor([0, 500, 999])):
        assert torch.equal(fused.add_noise(x0, noise, timesteps), stock.add_noise(x0, noise, timesteps))
    x = fused.add_noise(x0.float(), noise.float(), fused.timesteps[:1])
    t = fused.timesteps[0]
    assert_close(fused.step(torch.tanh(x), t, x).prev_sample, stock.step(torch.tanh(x), t, x).prev_sample)


# diffusers' published full-loop figures for DDIMInverseScheduler, from huggingface/diffusers
# tests/schedulers/test_scheduler_ddim_inverse.py (10 steps, the dummy sample and model of
# its SchedulerCommonTest, rebuilt here): (config, sum |x|, mean |x|).
INVERSE_BASE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    clip_sample=True)
INVERSE_PUBLISHED = {
    "no_noise": (dict(), 671.6816, 0.8746),
    "v_prediction": (dict(prediction_type="v_prediction"), 1394.2185, 1.8154),
    "set_alpha_to_one": (dict(set_alpha_to_one=True, beta_start=0.01), 539.9622, 0.7031),
    "no_set_alpha_to_one": (dict(set_alpha_to_one=False, beta_start=0.01), 542.6722, 0.7066),
}


@pytest.mark.parametrize("case", list(INVERSE_PUBLISHED.values()), ids=list(INVERSE_PUBLISHED))
def test_inverse_published_full_loops(case):
    config, want_sum, want_mean = case
    finals = []
    for cls in (FusedDDIMInverseScheduler, DDIMInverseScheduler):
        s = cls(**{**INVERSE_BASE, **config})
        s.set_timesteps(10)
        sample = scheduler_dummy_sample()
        for t in s.timesteps:
            sample = s.step(scheduler_dummy_model(sample, t), t, sample).prev_sample
        finals.append(sample)
    fused, stock = finals
    assert abs(fused.abs().sum().item() - want_sum) < 1e-2
    assert abs(fused.abs().mean().item() - want_mean) < 1e-3
    assert_close(fused, stock, rtol=FP32_RTOL)
