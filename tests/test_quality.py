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
