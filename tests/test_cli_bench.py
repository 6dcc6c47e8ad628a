"""`python -m bench` refuses bad arguments before any work, and skips the plot without matplotlib."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from bench import run

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv, message", [
    (["--device", "foo"], "argument --device: 'foo' is not a torch device"),
    (["--device", "meta"], "only cpu and cuda are supported"),
    (["--device", "cuda:99"], "argument --device: 'cuda:99'"),
    (["--threads", "0"], "argument --threads: expected 1 to"),
    (["--threads", "100000"], "argument --threads: expected 1 to"),
    (["--budget", "0"], "argument --budget: expected a positive number"),
    (["--budget", "nan"], "argument --budget: expected a positive number"),
    (["--providers", "foo"], "argument --providers: expected a comma-separated subset of"),
    (["--providers", "torch,foo"], "got 'torch,foo'"),
    (["--providers", ","], "argument --providers"),
    (["--out-dir", ""], "argument --out-dir: expected a folder, got an empty path"),
    (["--out-dir", "{file}"], "is a file, not a folder"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_bad_arguments_exit_2_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    a_file = tmp_path / "results"
    a_file.write_text("")
    monkeypatch.setattr(run, "_run", lambda *args: pytest.fail("the benchmark started"))
    with pytest.raises(SystemExit) as info:
        run.main([a.replace("{file}", str(a_file)) for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert message in err.strip().splitlines()[-1], err
    assert [p.name for p in tmp_path.iterdir()] == ["results"]


def test_good_arguments_reach_the_run(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(run, "_run", lambda args, device, tuned: seen.update(args=args, device=device) or 0)
    monkeypatch.setattr(run, "tune_malloc", lambda: False)
    out = tmp_path / "new" / "results"
    assert run.main(["--device", "cpu", "--providers", " torch,labml,torch ", "--out-dir", str(out),
                     "--threads", str(run.torch.get_num_threads()), "--no-malloc-tuning"]) == 0
    assert seen["device"].type == "cpu" and seen["args"].providers == ["torch", "labml"] and out.is_dir()


def test_the_plot_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert run.draw_plot(tmp_path) == "skipped: matplotlib is not installed (pip install 'ddim-fused[plots]')"
    assert list(tmp_path.iterdir()) == []


def test_module_entry_point_error_is_clean():
    proc = subprocess.run([sys.executable, "-m", "bench", "--threads", "0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --threads" in proc.stderr
