"""Crash-safe writes: exclusive temporary files, no partial targets, no leftovers, output folder checks."""
import errno
import os
import stat

import pytest

from ddim_fused import atomic


def temps(folder):
    return [p.name for p in folder.iterdir() if atomic.temp_target(p.name) is not None]


def test_write_replaces_the_target_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    atomic.atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"
    assert temps(tmp_path) == []


def test_a_failing_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def half_then_full_disk(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic.atomic_write(target, half_then_full_disk)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_symlink_planted_at_the_temporary_name_is_not_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    planted = tmp_path / ".out.bin.0123abcd.tmp"
    planted.symlink_to(victim)
    names = iter(["0123abcd", "89abcdef"])  # the first name is taken by the symlink
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(names))
    atomic.atomic_write(tmp_path / "out.bin", lambda f: f.write(b"data"))
    assert victim.read_text() == "precious"
    assert (tmp_path / "out.bin").read_bytes() == b"data" and not (tmp_path / "out.bin").is_symlink()
    assert planted.is_symlink()  # not ours: left alone


def test_new_files_get_the_umask_permissions_of_a_plain_open(tmp_path):
    mask = os.umask(0o027)
    try:
        atomic.atomic_write(tmp_path / "a", lambda f: f.write(b"x"))
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o640


def test_write_all_replaces_nothing_unless_every_file_was_written(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"old 1")
    second.write_bytes(b"old 2")

    def fails(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic.atomic_write_all([(first, lambda f: f.write(b"new 1")), (second, fails)])
    assert (first.read_bytes(), second.read_bytes()) == (b"old 1", b"old 2")
    assert temps(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write_all([(first, lambda f: f.write(b"new 1")), (second, _interrupt)])
    assert (first.read_bytes(), second.read_bytes()) == (b"old 1", b"old 2") and temps(tmp_path) == []
    atomic.atomic_write_all([(first, lambda f: f.write(b"new 1")), (second, lambda f: f.write(b"new 2"))])
    assert (first.read_bytes(), second.read_bytes()) == (b"new 1", b"new 2")


def _interrupt(f):
    raise KeyboardInterrupt


@pytest.mark.parametrize("name,target", [
    (".shard-000001.npz.0123abcd.tmp", "shard-000001.npz"),
    (".run.json.ffffffff.tmp", "run.json"),
    (".draft.tmp", None),
    (".env.tmpl", None),
    (".shard-000001.npz.tmp.123", None),
    (".a.0123abcd.tmp.bak", None),
    ("shard-000001.npz.0123abcd.tmp", None),
    (".a.0123ABCD.tmp", None),
])
def test_temp_target_recognises_exactly_its_own_names(name, target):
    assert atomic.temp_target(name) == target


def test_check_output_dir(tmp_path, monkeypatch):
    made = atomic.check_output_dir(tmp_path / "a" / "b", "--out")
    assert made.is_dir()
    for empty in ("", "  ", None):
        with pytest.raises(atomic.OutputPathError, match="--out must name a folder, got an empty path"):
            atomic.check_output_dir(empty, "--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(atomic.OutputPathError, match="is a file, not a folder"):
        atomic.check_output_dir(tmp_path / "file", "--out")
    with pytest.raises(atomic.OutputPathError, match="cannot create --out .*Not a directory"):
        atomic.check_output_dir(tmp_path / "file" / "sub", "--out")
    # A read-only folder (simulated: the tests may run as root, who may write anywhere).
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(made) else real_access(p, mode))
    with pytest.raises(atomic.OutputPathError, match="is not writable"):
        atomic.check_output_dir(made, "--out")


def test_a_full_disk_while_creating_the_folder_is_a_runtime_error(tmp_path, monkeypatch):
    def mkdir_fails(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.Path, "mkdir", mkdir_fails)
    with pytest.raises(OSError) as info:
        atomic.check_output_dir(tmp_path / "new")
    assert not isinstance(info.value, atomic.OutputPathError) and info.value.errno == errno.ENOSPC


@pytest.fixture
def fsyncs(monkeypatch):
    """(is a folder, inode) of every fsync, in order."""
    synced, real = [], os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append((stat.S_ISDIR(st.st_mode), st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced


def test_write_fsyncs_the_file_itself_then_its_folder(tmp_path, fsyncs):
    target = tmp_path / "out.bin"
    atomic.atomic_write(target, lambda f: f.write(b"new"))
    # The temporary file keeps its inode through the rename: that inode is the file's.
    assert fsyncs == [(False, target.stat().st_ino), (True, tmp_path.stat().st_ino)]


def test_write_dir_fsyncs_each_file_its_folder_then_the_parent(tmp_path, fsyncs):
    target = tmp_path / "shard"
    target.mkdir()
    (target / "old.png").write_bytes(b"old")  # an earlier folder: replaced whole

    def fill(folder):
        for name in ("a.png", "b.png", "metadata.jsonl"):
            (folder / name).write_bytes(name.encode())

    atomic.atomic_write_dir(target, fill)
    assert sorted(p.name for p in target.iterdir()) == ["a.png", "b.png", "metadata.jsonl"]
    files = {(target / name).stat().st_ino for name in ("a.png", "b.png", "metadata.jsonl")}
    assert {ino for is_dir, ino in fsyncs[:3] if not is_dir} == files
    assert fsyncs[3:] == [(True, target.stat().st_ino), (True, tmp_path.stat().st_ino)]
    assert temps(tmp_path) == []


def test_write_dir_replaces_a_symlink_without_following_it(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard").symlink_to(elsewhere)
    atomic.atomic_write_dir(out / "shard", lambda folder: (folder / "new.png").write_bytes(b"new"))
    assert not (out / "shard").is_symlink() and [p.name for p in (out / "shard").iterdir()] == ["new.png"]
    assert (elsewhere / "keep.png").read_bytes() == b"keep" and temps(out) == []


def test_a_failing_fill_keeps_the_old_folder_and_removes_its_temporary(tmp_path):
    target = tmp_path / "shard"
    target.mkdir()
    (target / "old.png").write_bytes(b"old")

    def half_then_full_disk(folder):
        (folder / "a.png").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic.atomic_write_dir(target, half_then_full_disk)
    assert [p.name for p in target.iterdir()] == ["old.png"] and temps(tmp_path) == []
