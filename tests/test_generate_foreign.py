"""A run folder that holds another run, a shard linked out of it, a planted lock: refused or repaired,
never silently replaced."""
import dataclasses
import shutil

import numpy as np
import pytest

from ddim_fused import generate as gen
from ddim_fused.cli import main
from ddim_fused.shards import FORMAT
from tests.test_generate import CONFIG, INFO, TinyModel, run
from tests.test_generate_formats import FORMATS, SMALL, snapshot
from tests.test_generate_reliability import CLI_ARGS

OTHER = dataclasses.replace(CONFIG, seed=1)


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    run(out)
    return out


def without(files: dict, *names) -> dict:
    return {k: v for k, v in files.items() if k not in names}


# ---------------------------------------------------------------------------- a run without run.json
def test_without_run_json_another_configuration_is_refused_and_nothing_is_replaced(finished):
    reference = gen.load_samples(finished)["samples"]
    (finished / "run.json").unlink()
    before = snapshot(finished)
    with pytest.raises(gen.RunMismatchError, match="no run.json, and a manifest.json of another configuration"):
        run(finished, OTHER)
    # Without the manifest too, each shard's own config hash is the evidence.
    (finished / "manifest.json").unlink()
    with pytest.raises(gen.RunMismatchError, match="no run.json, and shard-000000.npz belongs to another config"):
        run(finished, OTHER)
    assert snapshot(finished) == without(before, "manifest.json")  # no run.json written, no shard touched
    # The run itself resumes: every shard kept, run.json and the manifest written again.
    assert run(finished)["samples_written"] == 0
    assert np.array_equal(gen.load_samples(finished)["samples"], reference)


def test_damaged_shards_of_another_configuration_prove_nothing(finished):
    (finished / "run.json").unlink()
    (finished / "manifest.json").unlink()
    for k in range(CONFIG.n_shards):  # every shard truncated: nothing left to tell whose it was
        path = finished / gen.shard_name(k)
        path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="regenerating"):
        assert run(finished, OTHER)["samples_written"] == OTHER.num
    assert gen.load_samples(finished)["indices"].tolist() == list(range(OTHER.num))


def test_a_shard_of_another_run_is_refused_unless_overwrite_is_asked(finished, tmp_path):
    reference = gen.load_samples(finished)["samples"]
    other = tmp_path / "other"
    run(other, OTHER)
    shutil.copy(other / "shard-000001.npz", finished / "shard-000001.npz")
    before = snapshot(finished)
    with pytest.raises(gen.RunMismatchError, match="shard-000001.npz belongs to another configuration; .*"
                                                   "--overwrite-mismatched"):
        run(finished)
    assert snapshot(finished) == before
    with pytest.warns(UserWarning, match=r"replacing 1 shard\(s\) of another configuration \(shard-000001.npz;"):
        summary = gen.run_generation(finished, CONFIG, TinyModel, INFO, progress=False, overwrite_mismatched=True)
    assert summary["samples_written"] == 6
    assert np.array_equal(gen.load_samples(finished)["samples"], reference)


def test_overwrite_mismatched_replaces_a_whole_run_of_another_configuration(finished, tmp_path):
    with pytest.warns(UserWarning) as caught:
        gen.run_generation(finished, OTHER, TinyModel, INFO, progress=False, overwrite_mismatched=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert messages[0].endswith("holds a run with a different configuration (config.seed: 3 there, 1 now): "
                                "replacing it (overwrite_mismatched)")
    assert messages[1] == ("replacing 4 shard(s) of another configuration (shard-000000.npz, shard-000001.npz, "
                           "shard-000002.npz, ...; overwrite_mismatched)")
    fresh = tmp_path / "fresh"
    run(fresh, OTHER)
    assert np.array_equal(gen.load_samples(finished)["samples"], gen.load_samples(fresh)["samples"])


def test_overwrite_mismatched_rewrites_a_damaged_run_json_and_keeps_the_run(finished):
    reference = gen.load_samples(finished)["samples"]
    (finished / "run.json").write_text("{")
    with pytest.raises(gen.RunMismatchError, match="damaged or foreign run"):
        run(finished)
    with pytest.warns(UserWarning, match="holds a damaged run.json .*: replacing it"):
        summary = gen.run_generation(finished, CONFIG, TinyModel, INFO, progress=False, overwrite_mismatched=True)
    assert summary["samples_written"] == 0
    assert np.array_equal(gen.load_samples(finished)["samples"], reference)


def test_cli_refuses_a_folder_of_another_configuration_with_exit_2(tmp_path, capsys):
    out = tmp_path / "rj"
    assert main(["generate", *CLI_ARGS, "--out", str(out)]) == 0
    (out / "run.json").unlink()
    before = snapshot(out)
    with pytest.raises(SystemExit) as info:
        main(["generate", *CLI_ARGS, "--seed", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "--overwrite-mismatched" in err, err
    assert snapshot(out) == before
    assert main(["generate", *CLI_ARGS, "--seed", "1", "--overwrite-mismatched", "--out", str(out)]) == 0
    assert "ddim-fused: warning: " in capsys.readouterr().err
    assert gen.load_samples(out)["metadata"][0]["seed"] == 1


# ---------------------------------------------------------------------------- a shard linked out of the folder
@pytest.mark.parametrize("output_format", FORMATS)
def test_a_shard_linked_out_of_the_folder_is_refused_by_load_and_replaced_by_resume(tmp_path, output_format):
    config = dataclasses.replace(SMALL, format=output_format)
    ref, sym = tmp_path / "ref1", tmp_path / "sym1"
    gen.run_generation(ref, config, TinyModel, INFO, progress=False)
    shutil.copytree(ref, sym, symlinks=True)
    name = FORMAT[output_format].shard_name(1)
    (shutil.rmtree if (sym / name).is_dir() else lambda p: p.unlink())(sym / name)
    (sym / name).symlink_to(f"../ref1/{name}")
    ref_files = snapshot(ref)
    with pytest.raises(gen.CorruptRunError, match=f"{name} leads outside"):
        gen.load_samples(sym)
    with pytest.warns(UserWarning, match=f"regenerating {name} leads outside"):
        assert gen.run_generation(sym, config, TinyModel, INFO, progress=False)["samples_written"] == 4
    assert not (sym / name).is_symlink() and snapshot(ref) == ref_files
    assert np.array_equal(gen.load_samples(sym)["samples"], gen.load_samples(ref)["samples"])


# ---------------------------------------------------------------------------- a planted lock
def test_a_symlinked_lock_exits_2_naming_the_file_every_time(tmp_path, capsys):
    out, target = tmp_path / "run", tmp_path / "elsewhere"
    out.mkdir()
    target.write_text("theirs")
    (out / gen.LOCK_FILE).symlink_to(target)
    for _ in range(2):  # a rerun is refused the same way: the message never says to rerun as is
        with pytest.raises(SystemExit) as info:
            main(["generate", *CLI_ARGS, "--out", str(out)])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1, err
        assert f"{out / gen.LOCK_FILE} is a symlink" in err and "rerun the same command" not in err
    assert target.read_text() == "theirs" and sorted(p.name for p in out.iterdir()) == [gen.LOCK_FILE]


def test_a_lock_that_is_not_a_file_is_refused(tmp_path):
    (tmp_path / gen.LOCK_FILE).mkdir()
    with pytest.raises(gen.OutputPathError, match="is not a regular file"):
        run(tmp_path)


# ---------------------------------------------------------------------------- found by tests/test_generate_faults.py
@pytest.mark.parametrize("name", ["manifest.json", "shard-000001.npz"])
def test_a_folder_where_the_run_writes_a_file_is_refused_before_any_work(finished, name):
    (finished / "shard-000002.npz").unlink()  # work the run would do
    remove = shutil.rmtree if (finished / name).is_dir() else lambda p: p.unlink()
    remove(finished / name)
    (finished / name).mkdir()
    before = snapshot(finished)
    with pytest.raises(gen.OutputPathError, match=f"{name} is a folder where the run writes a file"):
        run(finished)
    assert snapshot(finished) == before and (finished / name).is_dir()


def test_a_preview_that_is_a_folder_is_left_alone(finished):
    (finished / "preview.png").mkdir()  # the finished run has no preview yet
    with pytest.warns(UserWarning, match="preview.png is a folder: no preview written"):
        gen.run_generation(finished, CONFIG, TinyModel, INFO, progress=False, preview=True)
    assert (finished / "preview.png").is_dir()


def test_load_samples_checks_run_json_as_a_resume_does(finished):
    shutil.copy(finished / "manifest.json", finished / "run.json")  # the same config hash, not a run.json
    with pytest.raises(gen.CorruptRunError, match="run.json does not hold a config_hash and an identity"):
        gen.load_samples(finished)
    with pytest.raises(gen.RunMismatchError, match="run.json does not hold a config_hash and an identity"):
        run(finished)
