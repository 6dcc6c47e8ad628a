"""Bulk generation under hostile conditions: foreign files, locks, damaged runs, NaN, bad folders."""
import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_fused import atomic
from ddim_fused import generate as gen
from ddim_fused.cli import main
from tests.helpers import holding_port, torchrun
from tests.test_generate import CONFIG, INFO, TinyModel, run

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLI_ARGS = ["--num", "6", "--shard-size", "3", "--batch-size", "3", "--steps", "4", "--seed", "5", "--no-progress"]


def own_temps(folder):
    return [p.name for p in folder.iterdir() if atomic.temp_target(p.name) is not None]


# ---------------------------------------------------------------------------- item: cleanup
def test_cleanup_removes_only_its_own_temporary_files(tmp_path):
    out = tmp_path / "u"
    out.mkdir()
    users = {".env.tmpl": "s", ".draft.tmp": "k", ".notes.txt.0123abcd.tmp": "n", ".shard-000001.npz.tmp": "x"}
    for name, text in users.items():
        (out / name).write_text(text)
    (out / ".cache.tmp.d").mkdir()
    (out / ".shard-000000.npz.0123abcd.tmp").mkdir()  # a folder, even with our name, is not ours to delete
    leftovers = [".shard-000001.npz.0123abcd.tmp", ".manifest.json.ffffffff.tmp", ".run.json.00000000.tmp",
                 ".preview.png.12345678.tmp", ".shard-000002.npz.tmp.4242", ".shard-1000000.npz.0123abcd.tmp"]
    for name in leftovers:
        (out / name).write_bytes(b"partial")
    run(out)
    for name, text in users.items():
        assert (out / name).read_text() == text
    assert (out / ".cache.tmp.d").is_dir() and (out / ".shard-000000.npz.0123abcd.tmp").is_dir()
    assert not [name for name in leftovers if (out / name).exists()]


# ---------------------------------------------------------------------------- item: exclusive temporary files
def test_every_run_file_is_written_through_an_exclusive_temporary_file(tmp_path, monkeypatch):
    created = []
    real_create = atomic._create_temp

    def spy(path):
        created.append(path.name)
        return real_create(path)

    monkeypatch.setattr(atomic, "_create_temp", spy)
    gen.run_generation(tmp_path, CONFIG, TinyModel, INFO, progress=False, preview=True)
    expected = ["run.json"] + [gen.shard_name(k) for k in range(CONFIG.n_shards)] + ["manifest.json", "preview.png"]
    assert created == expected
    assert own_temps(tmp_path) == []


# ---------------------------------------------------------------------------- item: the run lock
def test_a_second_run_into_a_locked_folder_fails_at_once_and_touches_nothing(tmp_path):
    with gen.run_lock(tmp_path):
        started = time.monotonic()
        with pytest.raises(gen.RunLockedError, match=f"in use by another generate run .*pid {os.getpid()}"):
            run(tmp_path)
        assert time.monotonic() - started < 5
        assert sorted(p.name for p in tmp_path.iterdir()) == [gen.LOCK_FILE]
    assert run(tmp_path)["samples_written"] == CONFIG.num  # released at the end of the block


def test_the_lock_of_a_killed_process_is_released(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ddim_fused.generate import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(gen.RunLockedError, match=f"pid {holder.pid}"):
            run(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run(tmp_path)["samples_written"] == CONFIG.num


def test_a_run_keeps_the_folder_locked_while_it_works(tmp_path):
    seen = []

    def factory(device):
        # Called inside the run, after the folder is prepared: a second run must be refused now.
        with pytest.raises(gen.RunLockedError):
            run(tmp_path, dataclasses.replace(CONFIG, seed=99))
        seen.append(json.loads((tmp_path / "run.json").read_text())["identity"]["config"]["seed"])
        return TinyModel(device)

    gen.run_generation(tmp_path, CONFIG, factory, INFO, progress=False)
    assert seen == [CONFIG.seed]
    assert gen.load_samples(tmp_path)["indices"].tolist() == list(range(CONFIG.num))


def test_cli_reports_a_locked_folder_in_one_line_with_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with gen.run_lock(out):
        with pytest.raises(SystemExit) as info:
            main(["generate", *CLI_ARGS, "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ddim-fused: error: ") and "in use by another generate run" in err
    assert err.count("\n") == 1


def test_torchrun_ranks_fail_together_on_a_locked_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with gen.run_lock(out), holding_port():  # another run's rendezvous on the default port
        proc = subprocess.run(
            torchrun(2, "generate", *CLI_ARGS, "--out", str(out)),
            env=ENV, capture_output=True, text=True, timeout=240,
        )
    assert proc.returncode != 0
    assert "in use by another generate run" in proc.stderr
    assert "ddim-fused: error: rank 0 could not prepare" in proc.stderr  # rank 1 was told, instead of waiting
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert not list(out.glob("shard-*")) and not (out / "run.json").exists()


# ---------------------------------------------------------------------------- item: load_samples verifies
@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    run(out)
    return out


def rewrite_manifest(out, change):
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


def resign(out, k):
    """Make the manifest's sha256 of shard k match the file, as a careless edit would."""
    rewrite_manifest(out, lambda m: m["shards"][k].update(sha256=gen.file_sha256(out / gen.shard_name(k))))


def test_a_copied_shard_fails_its_sha256(finished):
    shutil.copy(finished / "shard-000002.npz", finished / "shard-000001.npz")
    with pytest.raises(gen.CorruptRunError, match="shard-000001.npz: its sha256 differs"):
        gen.load_samples(finished)
    resign(finished, 1)  # even with a matching sha256, its indices give it away
    with pytest.raises(gen.CorruptRunError, match="shard-000001.npz does not hold indices 6..11"):
        gen.load_samples(finished)


def test_manifest_paths_cannot_leave_the_run_folder(finished, tmp_path):
    other = tmp_path / "other"
    run(other, dataclasses.replace(CONFIG, seed=8))
    rewrite_manifest(finished, lambda m: m["shards"][0].update(file="../other/shard-000000.npz"))
    with pytest.raises(gen.CorruptRunError, match="shard 0 is listed as '../other/shard-000000.npz'"):
        gen.load_samples(finished)
    rewrite_manifest(finished, lambda m: m["shards"][0].update(file="shard-000000.npz"))
    (finished / "shard-000000.npz").unlink()
    (finished / "shard-000000.npz").symlink_to(other / "shard-000000.npz")
    resign(finished, 0)
    with pytest.raises(gen.CorruptRunError, match="shard-000000.npz leads outside"):
        gen.load_samples(finished)


def test_a_shard_of_another_run_is_refused(finished, tmp_path):
    other = tmp_path / "other"
    run(other, dataclasses.replace(CONFIG, seed=8))
    shutil.copy(other / "shard-000003.npz", finished / "shard-000003.npz")
    resign(finished, 3)
    with pytest.raises(gen.CorruptRunError, match="shard-000003.npz belongs to another configuration"):
        gen.load_samples(finished)


def test_manifest_and_run_json_must_describe_the_same_run(finished, tmp_path):
    other = tmp_path / "other"
    run(other, dataclasses.replace(CONFIG, seed=8))
    shutil.copy(other / "run.json", finished / "run.json")
    with pytest.raises(gen.CorruptRunError, match="disagree on the config hash"):
        gen.load_samples(finished)


def test_a_manifest_that_drops_a_shard_is_refused(finished):
    rewrite_manifest(finished, lambda m: m["shards"].pop())
    with pytest.raises(gen.CorruptRunError, match="its shards hold 18 samples, not num_samples = 22"):
        gen.load_samples(finished)


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b"null", b"\x00\xff\xfe", b'{"shards": 3}'])
def test_a_damaged_manifest_is_a_clear_error(finished, body):
    (finished / "manifest.json").write_bytes(body)
    with pytest.raises(gen.CorruptRunError, match="manifest.json"):
        gen.load_samples(finished)


def test_an_unfinished_run_is_not_loaded(tmp_path):
    with pytest.raises(gen.CorruptRunError, match="manifest.json is missing: not a finished run"):
        gen.load_samples(tmp_path)


# ---------------------------------------------------------------------------- item: NaN is not success
class NanForClass7(TinyModel):
    def __call__(self, x, t, cond):
        eps = super().__call__(x, t, cond)
        return torch.where((cond == 7).view(-1, 1, 1, 1), torch.full_like(eps, float("nan")), eps)


def test_a_non_finite_batch_stops_the_run_and_is_never_written(tmp_path):
    config = dataclasses.replace(CONFIG, classes=(1,) * 7 + (7,), guidance=1.0)  # sample 7 (shard 1) is bad
    with pytest.raises(gen.NonFiniteError, match=r"sample 7 is not finite.*the model returns NaN or Inf"):
        gen.run_generation(tmp_path, config, NanForClass7, INFO, progress=False)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-000000.npz"]
    assert not (tmp_path / "manifest.json").exists() and own_temps(tmp_path) == []


def test_a_shard_with_non_finite_samples_is_regenerated(finished):
    path = finished / "shard-000001.npz"
    shard = gen.read_shard(path)
    shard["samples"][2, 0, 0, 0] = np.inf
    gen.write_shard(path, shard["samples"], shard["indices"], shard["labels"], CONFIG.seed, str(shard["config_hash"]))
    with pytest.warns(UserWarning, match="shard-000001.npz holds non-finite samples"):
        assert run(finished)["samples_written"] == 6
    assert np.isfinite(gen.load_samples(finished)["samples"]).all()


def test_cli_huge_guidance_exits_1_naming_the_cause(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        # On the CPU, where this scale overflows; a GPU's fused multiply-adds may keep it finite.
        main(["generate", *CLI_ARGS, "--device", "cpu", "--guidance", "1e30", "--out", str(out)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("ddim-fused: error: generated samples: sample 0 is not finite") and err.count("\n") == 1
    assert "guidance scale 1e+30 is far too large" in err
    assert not list(out.glob("shard-*"))


# ---------------------------------------------------------------------------- item: any read error is corruption
def flip_offsets(data: bytes) -> list[int]:
    """Bytes whose flipped bit 0 makes zipfile raise things other than BadZipFile (found by flipping every byte)."""
    central = data.rindex(b"PK\x01\x02")  # the last member's central directory header
    local = data.index(b"PK\x03\x04")
    return [0, local + 6, local + 8, len(data) // 2, central + 8, central + 10, central + 28, len(data) - 2]


def test_flipped_bits_make_a_shard_corrupt_never_a_crash(finished):
    path = finished / "shard-000001.npz"
    original = path.read_bytes()
    reference = gen.load_samples(finished)["samples"]
    kinds = set()
    for offset in flip_offsets(original):
        flipped = bytearray(original)
        flipped[offset] ^= 1
        path.write_bytes(bytes(flipped))
        try:
            gen.read_shard(path, (6, 12))
        except gen.ShardError as exc:  # anything else fails the test
            kinds.add(str(exc).split("(")[-1].split(":")[0])
        with pytest.raises(gen.CorruptRunError, match="shard-000001.npz"):
            gen.load_samples(finished)
        path.write_bytes(bytes(flipped))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "regenerating ...", checked elsewhere
            run(finished)  # resume: regenerated (or kept, if the flip hit no checked byte)
        np.testing.assert_array_equal(gen.load_samples(finished)["samples"], reference)
        path.write_bytes(original)
    # The flips reached the readers' stranger failures, not only BadZipFile.
    assert {"RuntimeError", "NotImplementedError"} <= kinds, kinds


# ---------------------------------------------------------------------------- item: damaged run.json
@pytest.mark.parametrize("body", [b"", b"{", b"[]", b"null", b"\x00\xff\xfe\x80", b'{"config_hash": 5}'])
def test_a_damaged_run_json_is_a_clear_mismatch(finished, body):
    (finished / "run.json").write_bytes(body)
    with pytest.raises(gen.RunMismatchError, match="holds a damaged or foreign run: run.json"):
        run(finished)


def test_an_edited_config_hash_is_reported_as_damage_not_an_empty_difference(finished):
    record = json.loads((finished / "run.json").read_text())
    record["config_hash"] = "0" * 16
    (finished / "run.json").write_text(json.dumps(record))
    with pytest.raises(gen.RunMismatchError, match="config_hash that does not match its identity"):
        run(finished)


def test_a_difference_only_in_value_types_is_still_named(finished):
    record = json.loads((finished / "run.json").read_text())
    record["identity"]["config"]["guidance"] = 2  # int where the run has 2.0
    record["config_hash"] = gen.config_hash(record["identity"])
    (finished / "run.json").write_text(json.dumps(record))
    with pytest.raises(gen.RunMismatchError, match=r"config.guidance: 2 there, 2.0 now"):
        run(finished)


def test_cli_damaged_run_json_exits_2_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("[]")
    with pytest.raises(SystemExit) as info:
        main(["generate", *CLI_ARGS, "--out", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "damaged or foreign run" in err


# ---------------------------------------------------------------------------- item: preview on a full disk
def test_cli_full_disk_while_writing_the_preview_exits_1_and_keeps_the_run(tmp_path, capsys, monkeypatch):
    def save_half(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save_half)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["generate", *CLI_ARGS, "--out", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1 and "No space left on device" in err
    assert not (out / "preview.png").exists() and own_temps(out) == []
    assert gen.load_samples(out)["indices"].tolist() == list(range(6))


# ---------------------------------------------------------------------------- items: bad output folders
def test_output_folder_that_is_a_file_empty_or_read_only(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    with pytest.raises(gen.OutputPathError, match="is a file, not a folder"):
        run(blocker)
    for empty in ("", " "):
        with pytest.raises(gen.OutputPathError, match="empty path"):
            run(empty)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(read_only) else real_access(p, mode))
    with pytest.raises(gen.OutputPathError, match="is not writable"):
        run(read_only)
    assert blocker.read_text() == "keep" and not list(read_only.iterdir())


def test_cli_out_that_is_a_file_or_read_only_exits_2(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(read_only) else real_access(p, mode))
    for out, message in ((blocker, "is a file, not a folder"), (read_only, "is not writable")):
        with pytest.raises(SystemExit) as info:
            main(["generate", *CLI_ARGS, "--out", str(out)])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and message in err and "rerun" not in err


def test_cli_empty_out_is_refused_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["generate", *CLI_ARGS, "--out", ""])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "empty path" in err
    assert list(tmp_path.iterdir()) == []
