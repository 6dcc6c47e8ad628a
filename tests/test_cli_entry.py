"""The ddim-fused process as a user runs it: Ctrl-C while torch imports, a stdout pipe closed early.

Each test starts `python -m ddim_fused` in a subprocess (a few seconds each: torch's import).
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# Stalls the first `import torch` of the process until SIGINT arrives, after saying so in
# a file: the interrupt then lands inside that import, whoever runs it.
SLOW_TORCH_IMPORT = '''
import builtins, os, sys, time
_import = builtins.__import__

def _slow_torch(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules:
        open(os.environ["DDIM_TEST_IMPORTING_TORCH"], "w").close()
        time.sleep(60)
    return _import(name, *args, **kwargs)

builtins.__import__ = _slow_torch
'''


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env


def _start(args, env, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ddim_fused", *args], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_ctrl_c_while_torch_imports_exits_130_without_a_traceback(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SLOW_TORCH_IMPORT)
    marker = tmp_path / "importing-torch"
    env = _env(DDIM_TEST_IMPORTING_TORCH=str(marker))
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    proc = _start(["sample", "--num", "1", "--steps", "1", "--out", str(tmp_path / "x.png")], env,
                  stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "torch's import never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == "ddim-fused: interrupted", err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
def test_a_closed_stdout_pipe_still_writes_the_png(tmp_path, unbuffered):
    # The pipe's reader is gone before the command prints anything (as `| head -1` is after
    # its line): every status line meets a closed pipe.
    read_end, write_end = os.pipe()
    os.close(read_end)
    out = tmp_path / "e.png"
    env = _env()
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:  # each print meets the closed pipe at once, not at exit
        env["PYTHONUNBUFFERED"] = "1"
    try:
        proc = _start(["invert", "--num", "2", "--steps", "2", "--invert-steps", "2", "--device", "cpu",
                       "--no-progress", "--threads", "1", "--out", str(out)], env, stdout=write_end)
    finally:
        os.close(write_end)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and err == "", err
    with Image.open(out) as image:
        assert image.format == "PNG"
