"""quality.py writes its table, data and plot whole or not at all."""
import errno
import json
import os
from pathlib import Path

import pytest

from ddim_fused import quality
from ddim_fused.atomic import TEMP_SUFFIX

DATA = json.loads((Path(__file__).resolve().parent.parent / "docs" / "quality.json").read_text())


def fail_rename(monkeypatch):
    def refuse(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)


def test_plot_writes_a_png_and_a_failed_write_keeps_the_old_one(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="the plot needs the [plots] extra")
    png = tmp_path / "quality.png"
    quality.plot(DATA, png)
    first = png.read_bytes()
    assert first.startswith(b"\x89PNG\r\n\x1a\n")
    fail_rename(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        quality.plot(DATA, png)
    assert png.read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["quality.png"]


def test_text_files_are_replaced_whole(tmp_path, monkeypatch):
    table = tmp_path / "quality_table.md"
    quality._write_text(table, quality.markdown_table(DATA))
    assert table.read_text() == quality.markdown_table(DATA)
    fail_rename(monkeypatch)
    with pytest.raises(OSError):
        quality._write_text(table, "half")
    assert table.read_text() == quality.markdown_table(DATA)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]


@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1"])
def test_a_seed_out_of_range_is_a_usage_error_before_the_folder_is_made(tmp_path, capsys, seed):
    out = tmp_path / "q"
    with pytest.raises(SystemExit) as info:
        quality.main(["--seed", seed, "--out-dir", str(out)])
    assert info.value.code == 2 and "--seed must be in [0, 2**62)" in capsys.readouterr().err
    assert not out.exists()
