"""The checkout shadows no other distribution's top-level name.

Hugging Face's `kernels` distribution (which transformers >= 5 imports) is the case that
broke: a top-level `kernels/` package in the checkout root came first on sys.path (the
working directory, pytest.ini's `pythonpath = .`), so `import kernels` found it. Each test
puts a stand-in `kernels` distribution on the path and checks that it, not the checkout,
answers, from the checkout root.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_STAND_IN_INIT = "CUDAProperties = 'stand-in'\n"
# An egg_info writer, as setuptools loads it from every distribution on the path while it
# writes a package's metadata (pip install --no-build-isolation -e . runs that step).
_STAND_IN_WRITER = (
    "import os\n"
    "def write(cmd, basename, filename):\n"
    "    open(os.environ['STAND_IN_MARK'], 'w').write('ran')\n"
)


def _stand_in(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(_STAND_IN_INIT)
    (site / "kernels" / "_internals.py").write_text(_STAND_IN_WRITER)
    info = site / "kernels-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[egg_info.writers]\nstand_in.txt = kernels._internals:write\n")
    (info / "top_level.txt").write_text("kernels\n")
    return site


def _run(args, site: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1", STAND_IN_MARK=str(tmp_path / "mark"))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_from_the_checkout_root_finds_the_installed_kernels(tmp_path):
    site = _stand_in(tmp_path)
    code = ("import kernels, ddim_fused.kernels as k; "
            "print(kernels.CUDAProperties); print(kernels.__file__); print(k.__file__)")
    run = _run(["-c", code], site, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    value, theirs, ours = run.stdout.split()
    assert value == "stand-in"
    assert Path(theirs).is_relative_to(site)
    assert Path(ours).is_relative_to(ROOT / "ddim_fused")


def test_pytest_from_the_checkout_root_finds_the_installed_kernels(tmp_path):
    # pytest.ini's `pythonpath = .` puts the checkout first; a test module importing
    # `kernels` (as diffusers does through transformers) must still get the distribution.
    site = _stand_in(tmp_path)
    probe = tmp_path / "test_probe.py"
    probe.write_text("import kernels\n\ndef test_probe():\n    assert kernels.CUDAProperties == 'stand-in'\n")
    run = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pytest.ini"),
                "--rootdir", str(ROOT), str(probe)], site, tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout


def test_package_metadata_step_runs_the_installed_kernels_entry_points(tmp_path):
    site = _stand_in(tmp_path)
    run = _run(["setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], site, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "mark").read_text() == "ran"  # the stand-in's writer, not a failed import
    assert (tmp_path / "ddim_fused.egg-info" / "top_level.txt").read_text().split() == ["ddim_fused"]
