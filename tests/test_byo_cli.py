"""sample, paint, interpolate and invert with --model; flags that do not fit the model are one-line errors."""
import json
import re
import shutil

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


def _edited_pipeline(pipe, tmp_path, scheduler=None):
    """A copy of the pipeline folder whose scheduler config has the given entries."""
    folder = tmp_path / "edited"
    shutil.copytree(pipe, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(scheduler if isinstance(scheduler, str)
                           else json.dumps({**json.loads(config_file.read_text()), **(scheduler or {})}))
    return folder


@pytest.mark.parametrize("command", ["sample", "generate"])
@pytest.mark.parametrize("edit, extra, message", [
    ({"num_train_timesteps": -5}, [], "is not a scheduler config DDIM accepts: num_train_timesteps must be >= 1"),
    ({"beta_end": 2.0}, [], "its betas give alphas_cumprod outside (0, 1]"),
    (None, ["--shape", "3", "7", "9"], "--shape (3, 7, 9) does not fit the UNet: its down-sampling needs a height "
                                       "and width that are multiples of 2"),
    (None, ["--shape", "3", "8"], "--shape (3, 8) must be (channels, height, width)"),
], ids=["negative-timesteps", "betas-above-1", "shape-not-down-sampled", "shape-not-2d"])
def test_bad_model_folders_exit_2_before_any_work(pipe, tmp_path, capsys, command, edit, extra, message):
    folder = _edited_pipeline(pipe, tmp_path, edit) if edit else pipe
    run_dir = tmp_path / "run"
    argv = [command, "--model", str(folder), "--steps", "2", "--num", "2", *extra]
    line = _error(argv + (["--out", str(run_dir)] if command == "generate" else []), capsys, tmp_path)
    assert line.startswith("ddim-fused: error: ") and message in line, line
    assert not run_dir.exists()  # no run.json, no lock file: nothing was started


def test_messages_keep_file_names_and_other_libraries_text(pipe, tmp_path, capsys):
    folder = _edited_pipeline(pipe, tmp_path, "not json")
    line = _error(["sample", "--model", str(folder)], capsys, tmp_path)
    assert f"cannot read '{folder}/scheduler/scheduler_config.json': 'Expecting value" in line, line
    shutil.copy(folder / "scheduler" / "scheduler_config.json", tmp_path)  # keep a bad config out of the way
    shutil.copytree(pipe / "scheduler", folder / "scheduler", dirs_exist_ok=True)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\0" * 64)
    line = _error(["sample", "--model", str(folder)], capsys, tmp_path)
    assert "cannot load the UNet2DModel in" in line and "--weights" not in line, line
    assert "weights" in line.split(": ", 2)[2], line  # diffusers' own text, as it wrote it


def test_a_folder_with_bin_weights_loads_with_nothing_on_stderr(pipe, tmp_path, capsys):
    folder = tmp_path / "bin"
    shutil.copytree(pipe, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    tiny_unet(0).save_pretrained(folder / "unet", safe_serialization=False)
    assert [p.name for p in (folder / "unet").iterdir() if p.suffix != ".json"] == ["diffusion_pytorch_model.bin"]
    assert main(["sample", "--model", str(folder), "--num", "1", "--steps", "2", "--out", str(tmp_path / "b.png"),
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and captured.err == "", captured.err


LOGGING_MODEL = """
import logging
import torch
from ddim_fused.schedules import make_betas

LOG = logging.getLogger("diffusers.models.byo_logging_model")


class Model:
    betas = make_betas("linear", 100)
    sample_shape = (1, 4, 4)

    def __call__(self, x, t, cond):
        LOG.info("a note from the library")
        LOG.warning("a warning\\nover two lines")
        return torch.tanh(x)


def make():
    return Model()
"""


def test_library_logs_are_one_line_warnings_and_debug_only_with_debug(tmp_path, capsys, monkeypatch):
    (tmp_path / "byo_logging_model.py").write_text(LOGGING_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["generate", "--model", "byo_logging_model:make", "--num", "1", "--steps", "1"]
    assert main(args + ["--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert set(capsys.readouterr().err.splitlines()) == {"ddim-fused: warning: a warning over two lines"}
    assert main(args + ["--out", str(tmp_path / "b"), "--no-progress", "--debug"]) == 0
    assert set(capsys.readouterr().err.splitlines()) == {"ddim-fused: warning: a warning over two lines",
                                                         "ddim-fused: debug: a note from the library"}


def test_uncond_without_guidance_is_refused(cond_model, tmp_path, capsys):
    line = _error(["sample", "--model", str(cond_model / "unet"), "--scheduler-config",
                   str(cond_model / "scheduler.json"), "--cond", str(cond_model / "cond.pt"), "--uncond",
                   str(cond_model / "uncond.pt"), "--num", "2"], capsys, tmp_path)
    assert "--uncond is used only with --guidance other than 1" in line, line
