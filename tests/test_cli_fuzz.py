"""Property-based fuzz test of the command line: random argument lists for every command.

Whatever the arguments, a command ends with status 0, 1 or 2; stderr holds only
`ddim-fused: ...` lines (no traceback, no internal error); nothing is written outside the
example's own temporary folder; no temporary file is left behind; and a PNG command that
fails leaves no PNG.

Arguments are drawn from a vocabulary per option (valid small values, edge values, junk,
random text) after a prefix of cheap settings that the drawn options override, so a run
that is accepted stays tiny. Commands run in-process through `ddim_fused.cli.main`.
`train-digits` checks its arguments for real but trains nothing (training takes minutes;
tests/test_digits_train.py covers it). DDIM_FUSED_FUZZ_EXAMPLES sets the examples per
command (default 10, about 1.5 minutes for all six on 2 busy cores).
"""
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# hypothesis is in the test extra; the lent GPU machines run the suite without it.
pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install 'ddim-fused[test]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ddim_fused.cli import commands as cli
from ddim_fused.atomic import temp_target
from ddim_fused.digits.pretrained import MODEL_FILE
from ddim_fused.digits.train import weights_dir

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("DDIM_FUSED_FUZZ_EXAMPLES", "10"))
# Folders of the checkout that tools write to while the tests run.
# By name anywhere, or by path from the root: bench/results is where bench/gpu.sh writes
# its logs while this test runs.
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "bench/results"}

# ---------------------------------------------------------------------------- vocabulary
# No NUL (an argv cannot hold one), no lone surrogates (nor can a decoded argv), no "/" (a
# random path could leave the temporary folder: absolute paths are the vocabulary's own).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"), max_size=8)
INTS = st.sampled_from(["-1", "0", "1", "2", "3", "10000000000000000000000", "1.5", "x", "", "¹", "0x10"])
SEEDS = st.sampled_from(["0", "7", "-1", str(2**63 - 1), str(2**63), "x"])
ETAS = st.sampled_from(["0", "0.5", "1", "-1", "nan", "inf", "1e308", "sigma_hat", "x", ""])
GUIDANCE = st.sampled_from(["0", "1", "3", "-2", "nan", "-inf", "1e308", "1e30", "-3.5e38", "x"])
CLASS = st.one_of(st.sampled_from(["0", "3", "9", "10", "-1", "a", "1,2", ",", "¹", ""]), TEXT)
THREADS = st.sampled_from(["0", "1", "2", "-1", "100000", "x"])
PNG_OUT = st.one_of(
    st.sampled_from(["out.png", "OUT.PNG", "sub/out.png", "", "x.jpg", "/dev/null", "adir.png", "afile/x.png",
                     "a" * 300 + ".png", "a" * 250 + ".png"]),
    TEXT.map(lambda t: t + ".png"),
)
DIR_OUT = st.one_of(
    st.sampled_from(["run", "", " ", ".", "afile", "a" * 300, "/dev/null", "run/sub"]),
    TEXT.filter(lambda t: t.strip() != ".."),  # ".." is the folder above: a legitimate place to write
)
INPUT = st.sampled_from(["{digits}", "{empty}", "{npz}", "{complex}", "{text}", "missing.npy", "adir.png", ""])
WEIGHTS = st.sampled_from(["{shipped}", "{nan}", "{junk}", "{text}", "missing.pt", ""])
# --model sources that load nothing heavy: the digits model, folders that are not models,
# callables that are not factories of a sampler-protocol model, unimportable names.
MODELS = st.sampled_from(["digits", "missing-folder", "adir.png", "os:getcwd", "math:pi", "nosuchpkg.mod:f",
                          "x:", ":", ""])
TENSOR_FILE = st.sampled_from(["{cond}", "{digits}", "{text}", "{empty}", "missing.pt", ""])
SHAPES = st.sampled_from([["1", "8", "8"], ["3", "8", "8"], ["1", "4", "4"], ["0"], ["x"], ["-1", "8", "8"]])


def one(values):
    return values.map(lambda v: [v])


def some(values, low=1, high=3):
    return st.lists(values, min_size=low, max_size=high)


SAMPLER_OPTIONS = {
    "--steps": one(INTS), "--discretize": one(st.sampled_from(["uniform", "quad", "leading", "linspace", "cubic"])),
    "--guidance": one(GUIDANCE), "--seed": one(SEEDS), "--num": one(INTS), "--batch-size": one(INTS),
    "--device": one(st.sampled_from(["cpu", "auto", "cuda", "cuda:1", "meta", "foo", "", "cpu:0"])),
    "--dtype": one(st.sampled_from(["float32", "float16", "bfloat16", "float64", "int8"])),
    "--backend": one(st.sampled_from(["torch", "auto", "triton", "cuda"])),
    "--weights": one(WEIGHTS), "--threads": one(THREADS), "--class": some(CLASS),
    "--model": one(MODELS), "--cond": one(TENSOR_FILE), "--uncond": one(TENSOR_FILE), "--shape": SHAPES,
    "--scheduler-config": one(st.sampled_from(["{text}", "missing.json", ""])),
    "--prediction-type": one(st.sampled_from(["epsilon", "v_prediction", "sample", "x"])),
    "--clip-sample": one(st.sampled_from(["off", "1", "0.5", "0", "-1", "nan", "x"])),
    "--channels-last": st.just([]),
}
OPTIONS = {
    "sample": {**SAMPLER_OPTIONS, "--eta": one(ETAS), "--out": one(PNG_OUT)},
    "paint": {**SAMPLER_OPTIONS, "--input": one(INPUT), "--paint-class": some(CLASS), "--out": one(PNG_OUT),
              "--region": one(st.sampled_from(["top", "bottom", "left", "right", "middle"])),
              "--blend": one(st.sampled_from(["alpha", "alpha_prev", "seed"])), "--t-start": one(INTS)},
    "interpolate": {**SAMPLER_OPTIONS, "--frames": one(INTS), "--out": one(PNG_OUT)},
    "invert": {**SAMPLER_OPTIONS, "--input": one(INPUT), "--invert-steps": some(INTS), "--out": one(PNG_OUT)},
    "generate": {**SAMPLER_OPTIONS, "--eta": one(ETAS), "--shard-size": one(INTS), "--out": one(DIR_OUT),
                 "--format": one(st.sampled_from(["npz", "png", "webdataset", "tar", ""])),
                 "--overwrite-mismatched": st.just([])},
    "train-digits": {"--out": one(DIR_OUT), "--replace-shipped": st.just([]), "--epochs": one(INTS),
                     "--seed": one(SEEDS), "--threads": one(THREADS)},
}
# Cheap settings first: the drawn options come after them and win.
PREFIX = {
    "sample": ["--num", "2", "--steps", "2"],
    "paint": ["--steps", "2"],  # --num stays unset: it conflicts with --input
    "interpolate": ["--num", "1", "--frames", "2", "--steps", "2"],
    "invert": ["--steps", "2", "--invert-steps", "2"],
    "generate": ["--num", "2", "--shard-size", "2", "--steps", "2", "--out", "run"],
    "train-digits": [],
}
JUNK = st.one_of(st.sampled_from(["--nope", "-x", "extra", "--help", "--num", "--"]), TEXT)
PNG_COMMANDS = {"sample", "paint", "interpolate", "invert"}


def argument_lists(command):
    option = st.sampled_from(sorted(OPTIONS[command])).flatmap(lambda f: OPTIONS[command][f].map(lambda v: [f, *v]))
    pieces = st.lists(st.one_of(option, option, option, JUNK.map(lambda j: [j])), max_size=5)
    return pieces.map(lambda ps: [command, *PREFIX[command], "--no-progress"] + [a for p in ps for a in p])


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Files the arguments may name (read only): valid, damaged and foreign inputs and weights."""
    d = tmp_path_factory.mktemp("fuzz-inputs")
    np.save(d / "digits.npy", np.random.default_rng(0).uniform(-1, 1, (2, 8, 8)).astype(np.float32))
    (d / "empty.npy").write_bytes(b"")
    np.savez(d / "digits.npz", a=np.zeros((2, 8, 8)))
    np.save(d / "complex.npy", np.zeros((2, 8, 8), dtype=complex))
    torch.save(torch.zeros(4, 8), d / "cond.pt")
    (d / "text.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (d / "junk.pt").write_bytes(MODEL_FILE.read_bytes()[:3000])
    blob = torch.load(MODEL_FILE, map_location="cpu", weights_only=True)
    torch.save({**blob, "state_dict": {k: torch.full_like(v, float("nan")) for k, v in blob["state_dict"].items()}},
               d / "nan.pt")
    names = {"digits": "digits.npy", "empty": "empty.npy", "npz": "digits.npz", "complex": "complex.npy",
             "text": "text.txt", "junk": "junk.pt", "nan": "nan.pt", "cond": "cond.pt"}
    return {"{%s}" % k: str(d / v) for k, v in names.items()} | {"{shipped}": str(MODEL_FILE)}


@pytest.fixture
def no_training(monkeypatch):
    """train-digits checks its output folder as it would, then stops short of training."""
    def check_only(out_dir=None, *, replace_shipped=False, **settings):
        return {"out_dir": weights_dir(out_dir, replace_shipped)}

    monkeypatch.setattr(cli, "train_digits", check_only)


def tree(folder: Path, skip=frozenset()) -> dict:
    """{relative path: (size, mtime_ns)} of the files under folder, folders in `skip` (a name,
    or a path relative to folder) left out."""
    found = {}
    for here, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in skip and Path(here, d).relative_to(folder).as_posix() not in skip
                   and not d.endswith(".egg-info")]
        for name in names:
            path = Path(here, name)
            st_ = path.lstat()
            found[str(path.relative_to(folder))] = (st_.st_size, st_.st_mtime_ns)
    return found


# ---------------------------------------------------------------------------- the property
@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_random_arguments_end_cleanly(command, inputs, no_training, capfd, tmp_path):
    threads = torch.get_num_threads()
    repo_before, inputs_dir = tree(ROOT, SKIPPED_DIRS), Path(inputs["{digits}"]).parent
    inputs_before = tree(inputs_dir)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(argument_lists(command))
    def check(argv):
        argv = [inputs.get(a, a) for a in argv]
        work = Path(tempfile.mkdtemp(dir=tmp_path))
        (work / "adir.png").mkdir()
        (work / "afile").write_text("")
        before = set(tree(work))
        cwd = os.getcwd()
        capfd.readouterr()
        try:
            os.chdir(work)
            try:
                status = cli.main(argv)
            except SystemExit as exc:
                status = exc.code
        finally:
            os.chdir(cwd)
            torch.set_num_threads(threads)
        out, err = capfd.readouterr()
        shown = f"argv={argv!r}\nstatus={status!r}\nstderr:\n{err}"
        assert status in (0, 1, 2), shown
        assert "Traceback" not in err and "internal error" not in err, shown
        lines = [line for line in err.splitlines() if line.strip()]
        assert all(line.startswith("ddim-fused: ") for line in lines), shown
        if status != 0:
            assert lines and lines[-1].startswith("ddim-fused: error: "), shown
        written = set(tree(work)) - before
        assert not [p for p in written if temp_target(Path(p).name)], shown
        if status != 0 and command in PNG_COMMANDS:
            assert not [p for p in written if p.lower().endswith(".png")], shown
        assert tree(ROOT, SKIPPED_DIRS) == repo_before, shown
        assert tree(inputs_dir) == inputs_before, shown
        shutil.rmtree(work)

    check()
