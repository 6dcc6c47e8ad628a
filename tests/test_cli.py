"""End-to-end tests of the ddim-fused command line on tiny settings."""
import argparse
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_fused.cli import main
from ddim_fused.cli.commands import _region_mask, build_parser
from tests.helpers import PAD, SCALE, grid_size

pytestmark = pytest.mark.usefixtures("restore_threads")  # --threads 1 sets torch's global count


def run(argv, capsys):
    assert main(argv + ["--threads", "1", "--no-progress"]) == 0
    return capsys.readouterr().out


def tiles(pixels, nrows, ncols):
    """The (nrows, ncols, 8, 8) source digits of a CLI grid image."""
    src = pixels[::SCALE, ::SCALE].astype(int)
    return np.stack([np.stack([src[PAD + r * (8 + PAD):][:8, PAD + c * (8 + PAD):][:, :8] for c in range(ncols)])
                     for r in range(nrows)])


def open_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size, np.asarray(image)


def test_sample_writes_grid(tmp_path, capsys):
    out = tmp_path / "s.png"
    text = run(["sample", "--num", "12", "--steps", "5", "--out", str(out)], capsys)
    size, pixels = open_png(out)
    assert size == grid_size(10, 2)
    assert pixels.std() > 10  # digits, not a blank canvas
    assert "ms per step" in text and "5 DDIM steps" in text


def test_sample_classes_and_options(tmp_path, capsys):
    out = tmp_path / "s.png"
    run(["sample", "--num", "6", "--steps", "4", "--class", "3,7", "--eta", "1", "--discretize", "quad",
         "--batch-size", "4", "--dtype", "bfloat16", "--guidance", "2", "--out", str(out)], capsys)
    assert open_png(out)[0] == grid_size(2, 3)


def test_sample_same_seed_same_image_across_batch_sizes(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    run(["sample", "--num", "5", "--steps", "4", "--seed", "7", "--out", str(a)], capsys)
    run(["sample", "--num", "5", "--steps", "4", "--seed", "7", "--batch-size", "2", "--out", str(b)], capsys)
    pa, pb = open_png(a)[1].astype(int), open_png(b)[1].astype(int)
    # Philox noise is keyed by sample index; batched matmuls may round differently by a grey level.
    assert np.abs(pa - pb).max() <= 2


@pytest.mark.parametrize("command", [["paint"], ["invert", "--invert-steps", "4"]])
def test_paint_and_invert_keep_to_the_batch_size(tmp_path, capsys, monkeypatch, command):
    from ddim_fused.digits.pretrained import DigitsModel

    calls, real = [], DigitsModel.__call__
    monkeypatch.setattr(DigitsModel, "__call__", lambda self, x, t, c: calls.append(x.shape[0]) or real(self, x, t, c))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    run(command + ["--num", "5", "--steps", "4", "--guidance", "1", "--out", str(a)], capsys)
    assert max(calls) == 5
    calls.clear()
    run(command + ["--num", "5", "--steps", "4", "--guidance", "1", "--batch-size", "2", "--out", str(b)], capsys)
    assert calls and max(calls) == 2  # every model call, generation, paint / inversion and reconstruction
    pa, pb = open_png(a)[1].astype(int), open_png(b)[1].astype(int)
    # Noise is keyed by sample index; batched matmuls may round differently by a grey level.
    assert np.abs(pa - pb).max() <= 2


@pytest.mark.parametrize("blend", ["alpha", "alpha_prev"])
def test_paint_writes_before_mask_after(tmp_path, capsys, blend):
    out = tmp_path / "p.png"
    text = run(["paint", "--num", "4", "--steps", "5", "--blend", blend, "--region", "top", "--out", str(out)],
               capsys)
    size, pixels = open_png(out)
    assert size == grid_size(4, 3)
    assert "rows: before, mask, after" in text
    before, masked, after = tiles(pixels, 3, 4)
    # The kept bottom half ends re-noised to alpha_bar[1] (alpha) or alpha_bar[0] (alpha_prev): noise std
    # <= 0.02, about 2.5 grey levels, so 16 levels is a > 6-sigma bound on any pixel.
    assert np.abs(after[..., 4:, :] - before[..., 4:, :]).max() <= 16
    assert (masked[..., :4, :] == 128).all() and (masked[..., 4:, :] == before[..., 4:, :]).all()


@pytest.mark.parametrize("region, zeros", [("top", (slice(0, 3), slice(None))), ("bottom", (slice(3, 7), slice(None))),
                                           ("left", (slice(None), slice(0, 2))), ("right", (slice(None), slice(2, 5)))])
def test_paint_regions_mark_their_half_for_repainting(region, zeros):
    # 7 x 5 samples: an odd height and width, so each half's size shows which side is which.
    mask = _region_mask(region, (2, 1, 7, 5), "cpu", torch.float32)
    want = torch.ones(2, 1, 7, 5)
    want[(slice(None), slice(None)) + zeros] = 0
    assert torch.equal(mask, want)


def test_paint_from_npy(tmp_path, capsys):
    digits = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8)).astype(np.float32)
    npy, out = tmp_path / "d.npy", tmp_path / "p.png"
    np.save(npy, digits)
    run(["paint", "--input", str(npy), "--steps", "6", "--t-start", "3", "--region", "left", "--out", str(out)],
        capsys)
    assert open_png(out)[0] == grid_size(3, 3)


def test_interpolate_writes_strip(tmp_path, capsys):
    out = tmp_path / "i.png"
    run(["interpolate", "--num", "1", "--frames", "5", "--steps", "5", "--out", str(out)], capsys)
    assert open_png(out)[0] == grid_size(5, 1)


def test_invert_prints_errors_per_step_count(tmp_path, capsys):
    out = tmp_path / "v.png"
    text = run(["invert", "--num", "3", "--steps", "5", "--invert-steps", "4", "8", "--out", str(out)], capsys)
    assert open_png(out)[0] == grid_size(3, 3)
    rows = [line.split() for line in text.splitlines() if line.split() and line.split()[0] in ("4", "8")]
    assert [r[0] for r in rows] == ["4", "8"]
    assert all(np.isfinite(float(r[1])) for r in rows)


# Sampler arguments are checked by DDIMSampler; the CLI only renames them to flags, so these
# cases look for the flag and the bad value rather than the sampler's exact wording.
@pytest.mark.parametrize("argv, message", [
    (["sample", "--class", "11"], ("unknown class '11'",)),
    (["sample", "--class", "seven"], ("unknown class 'seven'",)),
    (["sample", "--steps", "0"], ("--steps", "0")),
    (["sample", "--steps", "1001"], ("--steps", "1001")),
    (["sample", "--seed", "-1"], ("--seed", "-1")),
    (["sample", "--num", "0"], ("--num must be >= 1",)),
    (["sample", "--out", "/nonexistent-dir/x.png"], ("does not exist",)),
    (["sample", "--out", "x.jpg"], ("must name a .png file",)),
    (["sample", "--dtype", "float8"], ("argument --dtype: invalid choice",)),
    (["sample", "--device", "nonsense"], ("is not a torch device",)),
    (["sample", "--eta", "-1"], ("--eta", "-1")),
    (["sample", "--eta", "x"], ("argument --eta",)),
    (["sample", "--guidance", "nan"], ("argument --guidance", "finite")),
    (["paint", "--steps", "10", "--t-start", "11"], ("--t-start", "11")),
    (["paint", "--blend", "seed"], ("argument --blend: invalid choice",)),
    (["paint", "--input", "/nonexistent.npy"], ("cannot read --input",)),
    (["invert", "--invert-steps", "4", "2000"], ("--invert-steps", "2000")),
    (["interpolate", "--frames", "1"], ("--frames must be >= 2",)),
    (["train-digits", "--epochs", "0"], ("--epochs must be >= 1",)),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_bad_arguments_exit_with_one_line(tmp_path, capsys, argv, message):
    argv = argv if "--out" in argv else argv + ["--out", str(tmp_path / "x.png")]
    extra = [] if argv[0] == "train-digits" else ["--no-progress"]
    with pytest.raises(SystemExit) as info:
        main(argv + extra)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # no usage block above it
    line = lines[0]
    assert line.startswith("ddim-fused: error: ")
    assert all(part in line for part in message), line
    assert not re.search(r"\b(n_steps|ddim_\w+|uncond_scale|t_start|paint_blend)\b", line), line
    assert not (tmp_path / "x.png").exists()


def test_sample_and_generate_report_a_bad_step_count_alike(tmp_path, capsys):
    errors = []
    for argv in (["sample", "--out", str(tmp_path / "x.png")], ["generate", "--out", str(tmp_path / "run")]):
        with pytest.raises(SystemExit) as info:
            main(argv + ["--steps", "5000", "--no-progress"])
        assert info.value.code == 2
        errors.append(capsys.readouterr().err.strip())
    assert errors[0] == errors[1]
    assert errors[0].startswith("ddim-fused: error: --steps") and "5000" in errors[0]
    assert not (tmp_path / "run").exists()


def test_bench_is_not_a_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--quick"])
    assert info.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err


def test_unwritable_out_file_is_a_runtime_error(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.png"

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ddim_fused.cli.options.os.replace", refuse)
    with pytest.raises(SystemExit) as info:
        main(["sample", "--num", "2", "--steps", "2", "--threads", "1", "--no-progress", "--out", str(out)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "ddim-fused: error: [Errno 28] No space left on device"
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_foreign_weights_file_is_one_line(tmp_path, capsys):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not a torch file")
    with pytest.raises(SystemExit) as info:
        main(["sample", "--weights", str(weights), "--out", str(tmp_path / "x.png")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"ddim-fused: error: --weights {str(weights)!r} is not a digits model weights file")


def test_bad_npy_shape(tmp_path, capsys):
    npy = tmp_path / "d.npy"
    np.save(npy, np.zeros((2, 7, 8), dtype=np.float32))
    with pytest.raises(SystemExit):
        main(["invert", "--input", str(npy), "--out", str(tmp_path / "x.png")])
    assert "expected (N, 8, 8) or (N, 1, 8, 8)" in capsys.readouterr().err


def test_module_entry_point_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddim_fused", "sample", "--class", "12",
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "ddim-fused: error: unknown class '12': the digits model knows classes 0 to 9"
    assert "Traceback" not in proc.stderr


def test_every_option_with_a_default_says_it_in_its_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [(name, action.option_strings[0]) for name, command in commands.items() for action in command._actions
              if action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
              and action.help is not None and "default" not in action.help]
    assert silent == []


def test_help_explains_options():
    proc = subprocess.run([sys.executable, "-m", "ddim_fused", "sample", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for option in ("--steps", "--eta", "--discretize", "--guidance", "--class", "--seed", "--batch-size", "--num",
                   "--device", "--dtype", "--backend", "--out"):
        assert option in proc.stdout
