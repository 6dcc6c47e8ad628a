"""bench.sd on the tiny pipeline: every row it can run here agrees with diffusers' images and is timed."""
import json

import pytest
import torch

from bench import sd
from tests.sd_models import needs_sd

pytestmark = [needs_sd, pytest.mark.usefixtures("restore_threads", "restore_library_logging")]


@pytest.fixture
def restore_library_logging():
    """bench.sd turns diffusers' and transformers' logs and progress bars off for its process;
    the tests after these (the CLI's own log handling) need them as they were."""
    from diffusers.utils import logging as diffusers_logging  # noqa: PLC0415 - needs_sd: both are installed
    from transformers.utils import logging as transformers_logging  # noqa: PLC0415

    libraries = (diffusers_logging, transformers_logging)
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    yield
    for lib, (verbosity, bars) in zip(libraries, before):
        lib.set_verbosity(verbosity)
        (lib.enable_progress_bar if bars else lib.disable_progress_bar)()


def test_tiny_rows_check_against_diffusers_and_report(tmp_path, capsys):
    assert sd.main(["--tiny", "--rows", "ade", "--batches", "2", "--steps", "2", "--repeats", "1", "--device", "cpu",
                    "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "sd.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == set("ade") and result["settings"]["config"] == "tiny"
    for letter in "ad":
        assert rows[letter]["check"]["passed"] and rows[letter]["check"]["max"] <= 1, rows[letter]
        assert rows[letter]["images_per_s"] > 0 and rows[letter]["ms_per_step"] > 0
    assert "needs CUDA" in rows["e"]["skipped"]
    # A line per row as it finished, then the summary; the same rows in sd.jsonl.
    assert printed.count("(d) B=2") == 2 and "(d) vs (a) at B=2:" in printed
    assert len((tmp_path / "sd.jsonl").read_text().splitlines()) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: row e captures a CUDA graph")
def test_tiny_cuda_graph_rows_give_diffusers_images(tmp_path, capsys):
    assert sd.main(["--tiny", "--rows", "ade", "--batches", "1", "3", "--steps", "3", "--repeats", "1",
                    "--device", "cuda", "--dtype", "float32", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "sd.json").read_text())["rows"]
    assert len(rows) == 6
    for row in rows:
        assert "error" not in row and row["check"]["passed"], row


def test_bad_rows_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        sd.main(["--tiny", "--rows", "ax", "--out", str(tmp_path)])
    assert info.value.code == 2 and "--rows must be letters of abcdef" in capsys.readouterr().err
