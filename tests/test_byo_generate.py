"""`ddim-fused generate --model DIR` against diffusers' own DDIMScheduler loop, sample by sample.

Sample i of a run must equal diffusers' loop started from initial_noise(..., sample_offset=i),
to fp32 rounding, whatever the batch size and across a resume. The models are tiny random
UNets saved as local folders.
"""
import json

import numpy as np
import pytest
import torch

from ddim_fused import generate as gen
from ddim_fused import initial_noise
from ddim_fused.cli import main
from tests.byo_models import (
    COND_DIM,
    COND_LEN,
    diffusers,
    needs_diffusers,
    reference_samples,
    save_pipeline,
    save_scheduler_file,
    tiny_cond_unet,
    tiny_unet,
)
from tests.helpers import assert_close

pytestmark = needs_diffusers

NUM, STEPS, SEED = 5, 6, 4
# The UNet's CPU convolutions round differently per batch size (measured up to 1.5e-5 on
# samples of magnitude 1); the sampler's own step is within 5e-6 of diffusers' step.
RTOL = 3e-5


@pytest.fixture(autouse=True)
def one_thread():
    # --threads 1 sets torch's global thread count; give the rest of the session its own back.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def generate(model_args, out, *extra):
    argv = ["generate", *model_args, "--num", str(NUM), "--steps", str(STEPS), "--seed", str(SEED),
            "--shard-size", "2", "--device", "cpu", "--threads", "1", "--no-progress", "--out", str(out), *extra]
    assert main(argv) == 0
    return gen.load_samples(out)


@pytest.fixture(scope="module")
def epsilon_pipeline(tmp_path_factory):
    """diffusers' defaults: epsilon, clip_sample on, leading spacing, steps_offset 0, set_alpha_to_one."""
    folder = tmp_path_factory.mktemp("eps") / "pipe"
    return save_pipeline(folder, tiny_unet(0), diffusers.DDIMScheduler())


def test_epsilon_pipeline_matches_diffusers_at_two_batch_sizes_and_after_a_resume(epsilon_pipeline, tmp_path,
                                                                                   capsys):
    unet = diffusers.UNet2DModel.from_pretrained(epsilon_pipeline / "unet")
    scheduler = diffusers.DDIMScheduler.from_pretrained(epsilon_pipeline, subfolder="scheduler")
    assert scheduler.config.clip_sample and scheduler.config.prediction_type == "epsilon"
    ref = reference_samples(unet, scheduler, NUM, STEPS, SEED)
    one = generate(["--model", str(epsilon_pipeline)], tmp_path / "one", "--batch-size", "1")
    three = generate(["--model", str(epsilon_pipeline)], tmp_path / "three", "--batch-size", "3")
    for run in (one, three):
        assert run["samples"].shape == (NUM, 3, 8, 8)
        assert (run["labels"] == -1).all()  # an unconditional model: no class
        assert_close(torch.from_numpy(run["samples"]), ref, rtol=RTOL)

    # Resume: a lost shard and manifest are redone (with another batch size) to the same samples.
    (tmp_path / "three" / "shard-000001.npz").unlink()
    (tmp_path / "three" / "manifest.json").unlink()
    capsys.readouterr()
    resumed = generate(["--model", str(epsilon_pipeline)], tmp_path / "three", "--batch-size", "2")
    assert "2 complete shard(s) kept" in capsys.readouterr().out
    assert_close(torch.from_numpy(resumed["samples"]), ref, rtol=RTOL)
    assert np.array_equal(resumed["samples"][:2], three["samples"][:2])

    manifest = json.loads((tmp_path / "three" / "manifest.json").read_text())
    model = manifest["model"]
    assert model["path"] == str(epsilon_pipeline.resolve()) and model["class"] == "UNet2DModel"
    assert len(model["config_sha256"]) == len(model["weights_sha256"]) == 64
    assert manifest["config"]["discretize"] == "leading" and manifest["config"]["classes"] is None


def test_a_changed_weight_file_is_another_run(epsilon_pipeline, tmp_path):
    copy = tmp_path / "pipe"
    save_pipeline(copy, tiny_unet(1), diffusers.DDIMScheduler())  # same config, other weights
    generate(["--model", str(epsilon_pipeline)], tmp_path / "run")
    with pytest.raises(SystemExit) as info:
        generate(["--model", str(copy)], tmp_path / "run")
    assert info.value.code == 2


def test_v_prediction_trailing_with_noise_matches_diffusers(tmp_path):
    scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                        set_alpha_to_one=False, clip_sample=False, beta_schedule="scaled_linear")
    folder = save_pipeline(tmp_path / "vpipe", tiny_unet(2), scheduler)
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet")
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    # eta > 0: the reference steps with the sampler's keyed noise, so the noise scale and
    # diffusers' trailing alpha_prev rule are both checked.
    ref = reference_samples(unet, scheduler, NUM, STEPS, SEED, eta=0.5)
    for batch in ("2", "5"):
        run = generate(["--model", str(folder)], tmp_path / f"run{batch}", "--batch-size", batch, "--eta", "0.5")
        assert_close(torch.from_numpy(run["samples"]), ref, rtol=RTOL)


def test_conditional_unet_with_cond_and_guidance_matches_diffusers(tmp_path):
    folder = tmp_path / "cunet"
    tiny_cond_unet(3).save_pretrained(folder)
    scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction", clip_sample=False, steps_offset=1)
    scheduler_file = save_scheduler_file(tmp_path / "scheduler_config.json", scheduler)
    gen_ = torch.Generator().manual_seed(0)
    cond = torch.randn(NUM, COND_LEN, COND_DIM, generator=gen_)
    uncond = torch.randn(COND_LEN, COND_DIM, generator=gen_)
    torch.save(cond, tmp_path / "cond.pt")
    np.save(tmp_path / "uncond.npy", uncond.numpy())
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder)
    ref = reference_samples(unet, scheduler, NUM, STEPS, SEED, cond=cond, uncond=uncond, scale=2.5)
    args = ["--model", str(folder), "--scheduler-config", str(scheduler_file), "--cond", str(tmp_path / "cond.pt"),
            "--uncond", str(tmp_path / "uncond.npy"), "--guidance", "2.5"]
    for batch in ("1", "4"):
        run = generate(args, tmp_path / f"run{batch}", "--batch-size", batch)
        assert_close(torch.from_numpy(run["samples"]), ref, rtol=RTOL)
    model = json.loads((tmp_path / "run1" / "manifest.json").read_text())["model"]
    assert model["class"] == "UNet2DConditionModel" and len(model["cond_sha256"]) == 64
    assert model["scheduler_config"] == str(scheduler_file.resolve())


def test_one_cond_row_is_shared_by_every_sample(tmp_path):
    folder = tmp_path / "cunet"
    tiny_cond_unet(4).save_pretrained(folder)
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    scheduler_file = save_scheduler_file(tmp_path / "s.json", scheduler)
    cond = torch.randn(COND_LEN, COND_DIM, generator=torch.Generator().manual_seed(1))
    torch.save({"encoder_hidden_states": cond}, tmp_path / "cond.pt")
    run = generate(["--model", str(folder), "--scheduler-config", str(scheduler_file), "--cond",
                    str(tmp_path / "cond.pt")], tmp_path / "run", "--batch-size", "3")
    ref = reference_samples(diffusers.UNet2DConditionModel.from_pretrained(folder), scheduler, NUM, STEPS, SEED,
                            cond=cond[None])
    assert_close(torch.from_numpy(run["samples"]), ref, rtol=RTOL)


def test_class_conditional_unet_takes_classes(tmp_path):
    folder = save_pipeline(tmp_path / "cls", tiny_unet(5, num_class_embeds=4), diffusers.DDIMScheduler())
    run = generate(["--model", str(folder)], tmp_path / "run", "--class", "1", "3", "--batch-size", "2")
    assert run["labels"].tolist() == [1, 3, 1, 3, 1]
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet")
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(STEPS)
    # Sample 1 (class 3) by hand.
    x = initial_noise((1, 3, 8, 8), SEED, sample_offset=1)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=torch.tensor([3])).sample, t, x).prev_sample
    assert_close(torch.from_numpy(run["samples"][1]), x[0], rtol=RTOL)
