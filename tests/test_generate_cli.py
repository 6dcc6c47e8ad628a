"""`ddim-fused generate` end to end: processes, batch sizes, kill -9 and resume, bad input."""
import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ddim_fused import generate as gen
from ddim_fused.cli import main
from tests.helpers import holding_port, torchrun

ARGS = ["--num", "24", "--shard-size", "5", "--steps", "8", "--eta", "0.5", "--guidance", "2", "--seed", "11",
        "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores: no oversubscription
# The digits UNet's CPU convolutions are not bitwise batch-invariant, so runs with another
# batch size or process count agree to float rounding (measured max difference ~5e-6).
ATOL = 1e-4


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ddim_fused", "generate", *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_one_process_two_processes_and_another_batch_size_agree(tmp_path):
    one = cli(*ARGS, "--batch-size", "4", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    assert "generated 24 samples" in one.stdout and (tmp_path / "one" / "preview.png").exists()
    other = cli(*ARGS, "--batch-size", "7", "--out", str(tmp_path / "bs7"))
    assert other.returncode == 0, other.stderr
    with holding_port():  # as another worker's run would: the rendezvous takes a free port
        two = subprocess.run(
            torchrun(2, "generate", *ARGS, "--batch-size", "4", "--out", str(tmp_path / "two")),
            env=ENV, capture_output=True, text=True, timeout=300,
        )
    assert two.returncode == 0, two.stderr
    assert "2 process(es)" in two.stdout
    ref = gen.load_samples(tmp_path / "one")
    for name in ("bs7", "two"):
        got = gen.load_samples(tmp_path / name)
        assert np.array_equal(got["indices"], np.arange(24)) and np.array_equal(got["labels"], ref["labels"])
        np.testing.assert_allclose(got["samples"], ref["samples"], rtol=0, atol=ATOL)


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    args = ["--num", "150", "--shard-size", "5", "--batch-size", "5", "--steps", "20", "--seed", "2", "--no-progress"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ddim_fused", "generate", *args, "--out", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.npz"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    killed_with = len(list(out.glob("shard-*.npz")))
    assert 3 <= killed_with < 30
    resumed = cli(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{killed_with} complete shard(s) kept" in resumed.stdout
    whole = cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    a, b = gen.load_samples(out), gen.load_samples(tmp_path / "whole")
    assert np.array_equal(a["indices"], np.arange(150))
    assert np.array_equal(a["samples"], b["samples"])  # same batch size and threads: bitwise
    assert not [p for p in out.iterdir() if gen.TMP_MARK in p.name]


def test_ctrl_c_exits_130_with_one_line_and_keeps_whole_shards_only(tmp_path):
    args = ["--num", "150", "--shard-size", "5", "--batch-size", "5", "--steps", "20", "--seed", "2", "--no-progress"]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ddim_fused", "generate", *args, "--out", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.npz"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert not (out / "manifest.json").exists(), "the run finished before it could be interrupted"
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        f"ddim-fused: interrupted; finished shards in {out} are kept: rerun the same command to resume"]
    assert not [p for p in out.iterdir() if gen.TMP_MARK in p.name]
    for shard in out.glob("shard-*.npz"):
        gen.read_shard(shard)  # whole and verified, or it raises


def test_corrupt_shard_is_regenerated_with_a_warning(tmp_path):
    out = tmp_path / "run"
    assert cli(*ARGS, "--out", str(out)).returncode == 0
    before = gen.load_samples(out)["samples"]
    shard = out / "shard-000002.npz"
    shard.write_bytes(shard.read_bytes()[:-100])
    again = cli(*ARGS, "--out", str(out))
    assert again.returncode == 0 and "regenerating shard-000002.npz" in again.stderr
    assert "4 complete shard(s) kept" in again.stdout
    np.testing.assert_array_equal(gen.load_samples(out)["samples"], before)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--num", "0"], "--num must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--shard-size", "-2"], "--shard-size must be >= 1"),
        (["--steps", "5000"], "--steps"),
        (["--eta", "-0.5"], "--eta"),
        (["--class", "12"], "unknown class"),
        (["--cuda-graph", "--device", "cpu"], "--cuda-graph needs a CUDA device"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        main(["generate", *ARGS, "--out", str(tmp_path / "x"), *extra])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_config_mismatch_and_unwritable_dir(tmp_path, capsys):
    out = tmp_path / "run"
    main(["generate", *ARGS, "--out", str(out)])
    with pytest.raises(SystemExit) as info:
        main(["generate", *ARGS[:-3], "--seed", "12", "--no-progress", "--out", str(out)])
    assert info.value.code == 2 and "different configuration" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as info:
        main(["generate", *ARGS, "--out", str(blocker / "sub")])
    assert info.value.code == 2 and "cannot create --out" in capsys.readouterr().err


def test_full_disk_exits_non_zero_and_keeps_finished_shards(tmp_path, capsys, monkeypatch):
    real_savez, calls = np.savez, []

    def savez(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(*args, **kwargs)

    monkeypatch.setattr(gen.np, "savez", savez)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["generate", *ARGS, "--out", str(out)])
    assert info.value.code == 1
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.npz", "shard-000001.npz"]
    monkeypatch.setattr(gen.np, "savez", real_savez)
    main(["generate", *ARGS, "--out", str(out)])
    assert "2 complete shard(s) kept" in capsys.readouterr().out


def test_cuda_graph_is_part_of_the_run_identity_only_when_on():
    # Runs made before the option existed (no cuda_graph field) keep their config hash.
    plain = gen.GenerateConfig(num=10, shard_size=5)
    graphed = gen.GenerateConfig(num=10, shard_size=5, cuda_graph=True)
    assert "cuda_graph" not in plain.identity() and graphed.identity()["cuda_graph"] is True
    assert gen.config_hash(plain.identity()) != gen.config_hash(graphed.identity())
    assert plain.identity() == {k: v for k, v in graphed.identity().items() if k != "cuda_graph"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: --cuda-graph captures a CUDA graph")
def test_cuda_graph_run_equals_an_uncaptured_run_and_keeps_its_choice(tmp_path, capsys):
    args = [*ARGS, "--device", "cuda", "--batch-size", "4"]
    main(["generate", *args, "--out", str(tmp_path / "plain")])
    main(["generate", *args, "--cuda-graph", "--out", str(tmp_path / "graph")])
    plain, graphed = (gen.load_samples(tmp_path / name)["samples"] for name in ("plain", "graph"))
    # Bit for bit: the captured loop draws the step kernel's own normals into a buffer and
    # scales them as the step does (tests/test_graph.py checks that on CPU too), and the
    # model runs the same convolutions in and out of the graph. Any one-rounding difference
    # would show here at ~1e-3, amplified by cuDNN's TF32 convolutions (docs/testing.md).
    np.testing.assert_array_equal(graphed, plain)
    with pytest.raises(SystemExit) as info:  # resuming without the flag is another configuration
        main(["generate", *args, "--out", str(tmp_path / "graph")])
    assert info.value.code == 2 and "different configuration" in capsys.readouterr().err
