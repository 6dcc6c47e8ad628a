"""How ddim-fused commands fail: one line, the right exit status, no traceback, no partial file.

Usage errors exit 2, runtime failures 1, Ctrl-C 130; --debug adds the traceback. Every
argument is checked before the model is first called.
"""
import errno
import itertools
import os

import numpy as np
import pytest
import torch

from ddim_fused import generate as gen
from ddim_fused.atomic import TEMP_SUFFIX
from ddim_fused.cli.commands import MAX_GRID_DIGITS, main
from ddim_fused.cli.errors import Interrupted, UserError, classify, one_line
from ddim_fused.cli.options import MAX_GUIDANCE, MAX_THREADS
from ddim_fused.digits.pretrained import MODEL_FILE, DigitsModel
from ddim_fused.finite import NonFiniteError

TINY = ["--steps", "2", "--no-progress", "--threads", "1"]


def tiny(command: str, argv=()) -> list:
    """TINY for `command`, less --steps where it would be refused: invert --input generates nothing."""
    return [a for a in TINY if a not in ("--steps", "2")] if command == "invert" and "--input" in argv else TINY
PNG_COMMANDS = ("sample", "paint", "interpolate", "invert")


@pytest.fixture(autouse=True)
def keep_threads():
    # --threads sets torch's global thread count; give the rest of the session its own back.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model_calls(monkeypatch):
    """Counts calls of the digits model (they still run)."""
    calls = []
    real = DigitsModel.__call__

    def counted(self, x, t, cond):
        calls.append(x.shape[0])
        return real(self, x, t, cond)

    monkeypatch.setattr(DigitsModel, "__call__", counted)
    return calls


def fail(argv, capfd, status):
    """Run the CLI expecting SystemExit(status); returns its stderr, checked to be one error line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capfd.readouterr().err
    assert info.value.code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def temp_files(folder):
    return [p for p in folder.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Foreign and damaged inputs, one of each kind."""
    d = tmp_path_factory.mktemp("inputs")
    blob = torch.load(MODEL_FILE, map_location="cpu", weights_only=True)
    torch.save({**blob, "state_dict": {k: torch.full_like(v, float("nan")) for k, v in blob["state_dict"].items()}},
               d / "nan.pt")
    (d / "truncated.pt").write_bytes(MODEL_FILE.read_bytes()[:5000])
    # A pickle that would run a command when unpickled; weights_only refuses it.
    (d / "malicious.pt").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    torch.save([1, 2, 3], d / "list.pt")
    torch.save({"config": 5}, d / "dict.pt")
    (d / "text.pt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    np.save(d / "digits.npy", np.random.default_rng(0).uniform(-1, 1, (2, 8, 8)).astype(np.float32))
    np.savez(d / "digits.npz", digits=np.zeros((2, 8, 8)))
    (d / "empty.npy").write_bytes(b"")
    np.save(d / "complex.npy", np.zeros((2, 8, 8), dtype=complex))
    np.save(d / "bool.npy", np.zeros((2, 8, 8), dtype=bool))
    np.save(d / "none.npy", np.zeros((0, 8, 8), dtype=np.float32))
    return d


# ---------------------------------------------------------------------------- usage errors, exit 2
@pytest.mark.parametrize("name", ["truncated.pt", "malicious.pt", "list.pt", "dict.pt", "text.pt"])
def test_foreign_weights_are_one_usage_line(tmp_path, capfd, files, name):
    line = fail(["sample", *TINY, "--weights", str(files / name), "--out", str(tmp_path / "x.png")], capfd, 2)
    assert line.startswith(f"ddim-fused: error: --weights {str(files / name)!r} is not a digits model weights file")


def test_weights_outside_the_package_such_as_etc_passwd(tmp_path, capfd):
    if not os.path.isfile("/etc/passwd"):
        pytest.skip("no /etc/passwd on this system")
    line = fail(["sample", *TINY, "--weights", "/etc/passwd", "--out", str(tmp_path / "x.png")], capfd, 2)
    assert "is not a digits model weights file" in line


@pytest.mark.parametrize("command", ["paint", "invert"])
@pytest.mark.parametrize("name, message", [
    ("digits.npz", "is an .npz archive"),
    ("empty.npy", "is not a .npy file (EOFError"),
    ("complex.npy", "holds complex128 values"),
    ("bool.npy", "holds bool values"),
    ("none.npy", "holds no digits (shape (0, 8, 8))"),
])
def test_bad_input_files_are_one_usage_line(tmp_path, capfd, files, model_calls, command, name, message):
    line = fail([command, *tiny(command, ["--input"]), "--input", str(files / name), "--out", str(tmp_path / "x.png")],
                capfd, 2)
    assert message in line and f"--input {str(files / name)!r}" in line
    assert model_calls == []


@pytest.mark.parametrize("argv, message", [
    (["sample", "--class", "¹"], "unknown class '¹'"),
    (["sample", "--class", "٣"], "unknown class '٣'"),  # an Arabic-Indic 3: int() would take it
    (["sample", "--guidance", "1e308"], f"expected a scale within +-{MAX_GUIDANCE:.3g} (the float32 range"),
    (["generate", "--guidance=-1e39"], "expected a scale within"),
    (["sample", "--threads", "100000"], f"--threads must be in [0, {MAX_THREADS}]"),
    (["sample", "--num", str(MAX_GRID_DIGITS + 1)], f"--num must be at most {MAX_GRID_DIGITS}"),
    (["interpolate", "--frames", "100000000000"], f"at most {MAX_GRID_DIGITS} fit in one PNG"),
    (["interpolate", "--num", "200", "--frames", "51"], "make 10200 digits"),
    (["interpolate", "--frames", "1e11"], "argument --frames: invalid int value"),
    (["invert", "--num", "3000", "--invert-steps", "2", "3", "4"], "make 12000 digits"),
    (["paint", "--num", "3334"], "make 10002 digits"),
    (["sample", "--device", "cuda:99"], "--device 'cuda:99'"),
    (["train-digits", "--threads", "0"], f"--threads must be in [1, {MAX_THREADS}]"),
    (["sample", "--dtype", "float8"], "(see ddim-fused sample --help)"),
    (["invert", "--bogus", "1"], "unrecognized arguments: --bogus 1 (see ddim-fused invert --help)"),
    (["train-digits", "--out", ""], "--out must name a folder, got an empty path"),
    (["generate", "--out", " "], "--out must name a folder, got an empty path"),
    (["train-digits", "--seed", "99999999999999999999999"], "--seed must be in [0, 2**63)"),
    (["train-digits", "--seed", "-1"], "--seed must be in [0, 2**63)"),
    (["sample", "--clip-sample", "1e39"], "--clip-sample must be finite and in"),
    (["generate", "--clip-sample", "1e39"], "--clip-sample must be finite and in"),
    (["sample", "--model", "json:loads"], "--model 'json:loads' is not a model factory"),
    (["generate", "--shape", "1", "100000", "100000", "100000", "100000"], "--shape must be sizes >= 1 with at most"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_bad_values_are_one_usage_line(tmp_path, capfd, model_calls, argv, message):
    extra = ["--no-progress"] if argv[0] == "train-digits" else TINY + ["--out", str(tmp_path / "x.png")]
    line = fail(argv[:1] + extra + argv[1:], capfd, 2)  # after TINY, so that its --threads 1 does not win
    assert line.startswith("ddim-fused: error: ") and message in line, line
    assert model_calls == [] and list(tmp_path.iterdir()) == []


def test_out_name_too_long_for_the_file_system(tmp_path, capfd):
    line = fail(["sample", *TINY, "--out", str(tmp_path / ("a" * 300 + ".png"))], capfd, 2)
    assert "--out file name is too long: 304 bytes" in line
    # Short enough for the system but not for the temporary name written first: refused too.
    line = fail(["sample", *TINY, "--out", str(tmp_path / ("a" * 246 + ".png"))], capfd, 2)
    assert "--out file name is too long: 250 bytes" in line
    assert list(tmp_path.iterdir()) == []


def test_triton_backend_with_the_interpreter_switched_off(tmp_path, capfd, monkeypatch, model_calls):
    if torch.cuda.is_available():
        pytest.skip("with CUDA the default device runs the kernel without the interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    line = fail(["sample", *TINY, "--backend", "triton", "--out", str(tmp_path / "x.png")], capfd, 2)
    assert "needs TRITON_INTERPRET=1 (it is '0')" in line and "--backend torch" in line
    assert model_calls == []


@pytest.mark.parametrize("argv, message", [
    (["interpolate", "--guidance", "3"], "--guidance needs --class"),
    (["interpolate", "--guidance", "1"], "--guidance needs --class"),
    (["paint", "--input", "{digits}", "--num", "4"], "--num sets the digits to generate, so it cannot go with --input"),
    (["paint", "--input", "{digits}", "--class", "3"], "--class sets the digits to generate"),
    (["invert", "--input", "{digits}", "--num", "2"], "--num sets the digits to generate"),
    (["invert", "--input", "{digits}", "--class", "1"], "--class sets the digits to generate"),
    (["invert", "--input", "{digits}", "--steps", "3"], "--steps sets the generation of the digits to invert"),
    (["invert", "--input", "{digits}", "--seed", "3"], "--seed sets the generation of the digits to invert"),
], ids=lambda v: "-".join(v).replace("{digits}", "npy") if isinstance(v, list) else None)
def test_conflicting_options_are_refused(tmp_path, capfd, files, model_calls, argv, message):
    argv = [a.replace("{digits}", str(files / "digits.npy")) for a in argv]
    line = fail(argv + tiny(argv[0], argv) + ["--out", str(tmp_path / "x.png")], capfd, 2)
    assert message in line
    assert model_calls == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["invert", "--num", "2", "--invert-steps", "5", "3"],  # S=3 reaches t=1000 with uniform's +1
    ["invert", "--num", "2", "--invert-steps", "5", "0"],
    ["paint", "--num", "2", "--t-start", "3"],
    ["interpolate", "--num", "1", "--frames", "1"],
    ["invert", "--num", "2", "--input", "/nonexistent.npy"],
], ids="-".join)
def test_every_argument_is_checked_before_the_model_runs(tmp_path, capfd, model_calls, argv):
    fail(argv + TINY + ["--out", str(tmp_path / "x.png")], capfd, 2)
    assert model_calls == []


@pytest.mark.parametrize("out", ["", "   "])
def test_generate_refuses_an_empty_out(tmp_path, capfd, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    line = fail(["generate", *TINY, "--num", "2", "--out", out], capfd, 2)
    assert "--out must name a folder, got an empty path" in line
    assert list(tmp_path.iterdir()) == []


def test_generate_usage_problems_exit_2(tmp_path, capfd):
    args = ["generate", *TINY, "--num", "2", "--shard-size", "2"]
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "--out " + repr(str(a_file)) + " is a file" in fail(args + ["--out", str(a_file)], capfd, 2)
    out = tmp_path / "run"
    out.mkdir()
    with gen.run_lock(out):
        assert "is in use by another generate run" in fail(args + ["--out", str(out)], capfd, 2)
    (out / gen.RUN_FILE).write_text("{not json")
    assert "damaged or foreign run" in fail(args + ["--out", str(out)], capfd, 2)
    assert not list(out.glob("shard-*"))


def test_permission_denied_while_writing_is_a_usage_error(tmp_path, capfd, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    line = fail(["sample", *TINY, "--num", "2", "--out", str(tmp_path / "x.png")], capfd, 2)
    assert "Permission denied" in line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- runtime failures, exit 1
@pytest.mark.parametrize("argv, what", [
    (["sample", "--num", "3", "--batch-size", "2"], "sample: digits: sample 0 is not finite"),
    (["interpolate", "--num", "1", "--frames", "2"], "interpolate: digits: sample 0 is not finite"),
    (["paint", "--input", "{digits}"], "paint: painted digits: sample 0 is not finite"),
    (["invert", "--input", "{digits}", "--invert-steps", "2"], "invert S=2: inverted latents: sample 0"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_nan_output_exits_1_and_writes_nothing(tmp_path, capfd, files, argv, what):
    argv = [a.replace("{digits}", str(files / "digits.npy")) for a in argv]
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as info:
        main(argv + tiny(argv[0], argv) + ["--weights", str(files / "nan.pt"), "--out", str(out)])
    captured = capfd.readouterr()
    assert info.value.code == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ddim-fused: error: {what}"), captured.err
    assert "the model returns NaN or Inf (check --weights)" in lines[0]
    assert "nan" not in captured.out.lower()  # no RMS error of nan reported as a result
    assert list(tmp_path.iterdir()) == []


def test_generate_nan_output_exits_1(tmp_path, capfd, files):
    out = tmp_path / "run"
    line = fail(["generate", *TINY, "--num", "2", "--weights", str(files / "nan.pt"), "--out", str(out)], capfd, 1)
    assert "not finite" in line
    assert not list(out.glob("shard-*")) and not (out / gen.MANIFEST).exists()


def test_an_unforeseen_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capfd, monkeypatch):
    def broken(self, x, t, cond):
        raise RuntimeError("kernel exploded\nwith a second line of details")

    monkeypatch.setattr(DigitsModel, "__call__", broken)
    argv = ["sample", *TINY, "--num", "2", "--out", str(tmp_path / "x.png")]
    line = fail(argv, capfd, 1)
    assert line == ("ddim-fused: error: internal error: RuntimeError: kernel exploded "
                    "(rerun with --debug for the traceback)")
    for debug in (argv + ["--debug"], ["--debug"] + argv):
        with pytest.raises(SystemExit) as info:
            main(debug)
        err = capfd.readouterr().err
        assert info.value.code == 1
        assert "Traceback (most recent call last)" in err and "with a second line of details" in err
        assert err.strip().splitlines()[-1] == line


def test_debug_also_shows_usage_errors_with_their_status(tmp_path, capfd):
    with pytest.raises(SystemExit) as info:
        main(["sample", *TINY, "--class", "12", "--debug", "--out", str(tmp_path / "x.png")])
    err = capfd.readouterr().err
    assert info.value.code == 2 and "Traceback" in err and "UserError" in err


# ---------------------------------------------------------------------------- Ctrl-C, exit 130
@pytest.fixture
def interrupt_model(monkeypatch):
    """Makes the digits model raise KeyboardInterrupt once `when()` is true (default: at once)."""
    real = DigitsModel.__call__
    state = {"when": lambda: True}

    def interrupted(self, x, t, cond):
        if state["when"]():
            raise KeyboardInterrupt
        return real(self, x, t, cond)

    monkeypatch.setattr(DigitsModel, "__call__", interrupted)
    return state


@pytest.mark.parametrize("argv", [
    ["sample", "--num", "2"], ["paint", "--num", "2"], ["interpolate", "--num", "1", "--frames", "2"],
    ["invert", "--num", "2", "--invert-steps", "2"],
], ids=lambda v: v[0])
def test_ctrl_c_exits_130_with_one_line_and_no_file(tmp_path, capfd, interrupt_model, argv):
    line = fail(argv + TINY + ["--out", str(tmp_path / "x.png")], capfd, 130)
    assert line == "ddim-fused: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_writing_the_png_leaves_no_file(tmp_path, capfd, monkeypatch):
    real_replace = os.replace

    def interrupted_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_replace)
    assert fail(["sample", *TINY, "--num", "2", "--out", str(tmp_path / "x.png")], capfd, 130) == \
        "ddim-fused: interrupted"
    monkeypatch.setattr(os, "replace", real_replace)
    assert list(tmp_path.iterdir()) == []


def test_generate_ctrl_c_keeps_finished_shards_and_resumes(tmp_path, capfd, interrupt_model):
    out = tmp_path / "run"
    args = ["generate", *TINY, "--num", "16", "--shard-size", "2", "--batch-size", "2", "--out", str(out)]
    # Two steps, one (batch-doubled) model call each: call 2b is the first of batch b. Ctrl-C
    # while batch 5 is sampled: the shards of the batches finished by then (all but the
    # _FINISH_DEPTH batches still waiting for the finisher) were handed to the writer.
    calls = itertools.count()
    interrupt_model["when"] = lambda: next(calls) == 2 * 5
    line = fail(args, capfd, 130)
    assert line == (f"ddim-fused: interrupted; finished shards in {out} are kept: rerun the same command "
                    "to resume")
    # The writer thread finishes the shards queued before the interrupt, in order; the
    # interrupted shard and the ones waiting to be finished are not written.
    kept = sorted(p.name for p in out.glob("shard-*"))
    assert kept == [gen.shard_name(k) for k in range(5 - gen._FINISH_DEPTH)]
    assert not temp_files(out) and not (out / gen.MANIFEST).exists()
    interrupt_model["when"] = lambda: False
    assert main(args) == 0
    assert f"{len(kept)} complete shard(s) kept" in capfd.readouterr().out
    assert np.array_equal(gen.load_samples(out)["indices"], np.arange(16))


def test_generate_ctrl_c_in_the_middle_of_a_shard_write_leaves_no_partial_shard(tmp_path, capfd, monkeypatch):
    real_savez, calls = np.savez, []

    def savez(file, **arrays):
        calls.append(1)
        if len(calls) == 2:
            file.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt
        return real_savez(file, **arrays)

    monkeypatch.setattr(gen.np, "savez", savez)
    out = tmp_path / "run"
    fail(["generate", *TINY, "--num", "6", "--shard-size", "2", "--out", str(out)], capfd, 130)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.npz"]
    assert not temp_files(out)


# ---------------------------------------------------------------------------- the report itself
def test_warnings_print_as_one_line(tmp_path, capfd):
    out = tmp_path / "run"
    args = ["generate", *TINY, "--num", "4", "--shard-size", "2", "--out", str(out)]
    assert main(args) == 0
    shard = out / "shard-000001.npz"
    shard.write_bytes(shard.read_bytes()[:-50])
    capfd.readouterr()
    assert main(args) == 0
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddim-fused: warning: regenerating shard-000001.npz"), err


@pytest.mark.parametrize("exc, status, message", [
    (UserError("bad"), 2, "bad"),
    (gen.RunLockedError("busy"), 2, "busy"),
    (gen.OutputPathError("a file"), 2, "a file"),
    (NonFiniteError("nan"), 1, "nan"),
    (gen.RankFailedError("rank 1"), 1, "rank 1"),
    (OSError(errno.ENOSPC, "No space left on device"), 1, "[Errno 28] No space left on device"),
    (OSError(errno.EROFS, "Read-only file system", "x.png"), 2, "[Errno 30] Read-only file system: 'x.png'"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (Interrupted("interrupted; kept"), 130, "interrupted; kept"),
    (MemoryError(), 1, "out of memory; try a smaller --batch-size or --num"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: 8e11 bytes"), 1, "out of memory"),
])
def test_classify(exc, status, message):
    assert classify(exc)[0] == status and classify(exc)[1].startswith(message)


def test_one_line():
    assert one_line("a\nb\r\nc\x0cd\u2028e") == "a b c d e"
    assert len(one_line("x\x0b\x1c\x85y").splitlines()) == 1
