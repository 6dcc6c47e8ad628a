"""sample, paint, interpolate and invert with --model; flags that do not fit the model are one-line errors."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_fused.cli import main
from tests.byo_models import (
    COND_DIM,
    COND_LEN,
    diffusers,
    needs_diffusers,
    save_pipeline,
    save_scheduler_file,
    tiny_cond_unet,
    tiny_unet,
)
from tests.helpers import grid_size

pytestmark = [needs_diffusers, pytest.mark.usefixtures("restore_threads")]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("cli") / "pipe", tiny_unet(0), diffusers.DDIMScheduler())


@pytest.fixture(scope="module")
def cond_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    tiny_cond_unet(1).save_pretrained(root / "unet")
    save_scheduler_file(root / "scheduler.json", diffusers.DDIMScheduler(prediction_type="v_prediction"))
    torch.save(torch.randn(COND_LEN, COND_DIM, generator=torch.Generator().manual_seed(0)), root / "cond.pt")
    torch.save(torch.zeros(COND_LEN, COND_DIM), root / "uncond.pt")
    return root


def run(argv, capsys):
    assert main(argv + ["--threads", "1", "--no-progress", "--device", "cpu"]) == 0
    return capsys.readouterr().out


def rgb_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return image.size


def test_sample_from_a_pipeline_folder_is_an_rgb_grid(pipe, tmp_path, capsys):
    out = tmp_path / "s.png"
    text = run(["sample", "--model", str(pipe), "--num", "4", "--steps", "3", "--out", str(out)], capsys)
    assert rgb_png(out) == grid_size(2, 2)
    assert "sampled 4 samples (unconditional) with 3 DDIM steps (leading)" in text
    assert "guidance 1," in text and "classifier" not in text  # no guidance, no digits classifier


def test_paint_interpolate_invert_with_a_pipeline(pipe, tmp_path, capsys):
    run(["paint", "--model", str(pipe), "--num", "2", "--steps", "3", "--out", str(tmp_path / "p.png")], capsys)
    assert rgb_png(tmp_path / "p.png") == grid_size(2, 3)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run(["paint", "--model", str(pipe), "--input", str(tmp_path / "x.npy"), "--steps", "3",
         "--out", str(tmp_path / "q.png")], capsys)
    run(["interpolate", "--model", str(pipe), "--num", "1", "--frames", "3", "--steps", "3",
         "--out", str(tmp_path / "i.png")], capsys)
    assert rgb_png(tmp_path / "i.png") == grid_size(3, 1)
    text = run(["invert", "--model", str(pipe), "--input", str(tmp_path / "x.npy"),
                "--invert-steps", "5", "--out", str(tmp_path / "v.png")], capsys)
    assert rgb_png(tmp_path / "v.png") == grid_size(2, 2)
    assert re.search(r"^\s+5\s+\d+\.\d+", text, re.M)


def test_conditional_model_commands_take_cond_and_uncond(cond_model, tmp_path, capsys):
    args = ["--model", str(cond_model / "unet"), "--scheduler-config", str(cond_model / "scheduler.json"),
            "--cond", str(cond_model / "cond.pt"), "--steps", "3"]
    text = run(["sample", *args, "--num", "2", "--uncond", str(cond_model / "uncond.pt"), "--guidance", "2",
                "--out", str(tmp_path / "s.png")], capsys)
    assert "cond cond.pt" in text and "guidance 2" in text
    run(["interpolate", *args, "--num", "1", "--frames", "2", "--out", str(tmp_path / "i.png")], capsys)
    assert rgb_png(tmp_path / "i.png") == grid_size(2, 1)


def test_schedule_flags_override_the_scheduler_config(pipe, tmp_path, capsys):
    out = tmp_path / "run"
    run(["generate", "--model", str(pipe), "--num", "2", "--steps", "3", "--prediction-type", "v_prediction",
         "--clip-sample", "off", "--discretize", "trailing", "--out", str(out)], capsys)
    identity = json.loads((out / "run.json").read_text())["identity"]
    assert identity["config"]["discretize"] == "trailing"
    assert identity["model"]["prediction_type"] == "v_prediction"
    assert identity["model"]["schedule_overrides"] == {"prediction_type": "v_prediction", "clip_sample": False,
                                                       "thresholding": False}


def _error(argv, capsys, tmp_path):
    argv = argv + ([] if argv[0] == "generate" else ["--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit) as info:
        main(argv + ["--no-progress", "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) >= 1 and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "x.png").exists()
    return err[-1]


@pytest.mark.parametrize("extra,message", [
    (["--class", "1"], "--class applies to class-conditional models; this model is unconditional"),
    (["--guidance", "2"], "--guidance=2 needs an unconditional input, and this model is unconditional"),
    (["--weights", "w.pt"], "--weights"),
    (["--shape", "4", "8", "8"], "does not have the model's 3 input channels"),
    (["--cond", "c.pt"], "--cond applies to models conditioned on tensors"),
    (["--clip-sample", "-1"], "argument --clip-sample"),
    (["--prediction-type", "x0"], "argument --prediction-type: invalid choice"),
])
def test_flags_that_do_not_fit_an_unconditional_pipeline(pipe, tmp_path, capsys, extra, message):
    if "--cond" in extra:
        torch.save(torch.zeros(2, 3), tmp_path / "c.pt")
        extra = ["--cond", str(tmp_path / "c.pt")]
    if "--weights" in extra:
        (tmp_path / "w.pt").write_bytes(b"")
        extra = ["--weights", str(tmp_path / "w.pt")]
    line = _error(["sample", "--model", str(pipe), *extra], capsys, tmp_path)
    assert line.startswith("ddim-fused: error: ") and message in line, line


@pytest.mark.parametrize("extra,message", [
    ([], "--cond: this model is conditioned on a tensor (encoder hidden states); give one"),
    (["--cond", "{root}/bad.pt"], "--cond has last dimension 7; the model takes 6"),
    (["--cond", "{root}/rows.pt"], "--cond has 3 rows; expected 1 (shared by all samples) or one per sample (4)"),
    (["--cond", "{root}/cond.pt", "--guidance", "2"], "--guidance=2 needs --uncond"),
    (["--cond", "{root}/missing.pt"], "--cond: {root}/missing.pt is not a file"),
    (["--cond", "{root}/cond.pt", "--class", "1"], "--class applies to class-conditional models"),
])
def test_conditional_model_errors(cond_model, tmp_path, capsys, extra, message):
    torch.save(torch.zeros(COND_LEN, COND_DIM + 1), cond_model / "bad.pt")
    torch.save(torch.zeros(3, COND_LEN, COND_DIM), cond_model / "rows.pt")
    extra = [e.format(root=cond_model) for e in extra]
    line = _error(["sample", "--model", str(cond_model / "unet"), "--scheduler-config",
                   str(cond_model / "scheduler.json"), "--num", "4", *extra], capsys, tmp_path)
    assert message.format(root=cond_model) in line, line


def test_model_source_errors(pipe, tmp_path, capsys):
    line = _error(["sample", "--model", str(tmp_path / "nothing")], capsys, tmp_path)
    assert "--model" in line and "is neither 'digits', an existing folder, nor package.module:callable" in line
    tiny_unet(0).save_pretrained(tmp_path / "bare")
    line = _error(["generate", "--model", str(tmp_path / "bare"), "--out", str(tmp_path / "run")], capsys, tmp_path)
    assert "give its schedule as --scheduler-config, a diffusers scheduler config file" in line
    assert not (tmp_path / "run").exists()
    line = _error(["sample", "--scheduler-config", str(pipe / "scheduler" / "scheduler_config.json")], capsys,
                  tmp_path)
    assert "--scheduler-config applies only to diffusers folders" in line
