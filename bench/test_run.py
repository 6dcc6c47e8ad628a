"""Imports of the runner: no Triton kernel defined before TRITON_INTERPRET is set.

Import cycles among bench modules are checked with the whole project in tests/test_architecture.py.

Plain tests (no benchmark fixture): run with `pytest bench/test_run.py`.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A fresh interpreter, so that nothing this test session imported counts.
PROBE = """
import sys
import bench.run
assert "ddim_fused.kernels" not in sys.modules, "importing bench.run defines the Triton kernels"
print("ok")
"""


def test_runner_does_not_import_the_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
