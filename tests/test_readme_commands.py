"""CI runs the README's set-up commands verbatim, and the test command works as written.

.ci/run pulls its two commands out of README.md; if the README's section or comments
change shape, these tests fail instead of CI silently running something else.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import env_without_checkout

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECTION = "## Set up and run"


def _ci_commands(readme: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-commands", str(readme)],
                          capture_output=True, text=True, timeout=60)


def _readme_block(text: str) -> list[str]:
    """Lines of the first ```bash block under SECTION (read here independently of .ci/run)."""
    section = text.split("\n" + SECTION + "\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```bash\n(.*?)^```", section, re.S | re.M)
    assert block, f"no ```bash block under {SECTION!r}"
    return block.group(1).splitlines()


def _after(lines: list[str], label: str) -> list[str]:
    """The line after each comment that starts with `# label` as a whole word."""
    return [lines[i + 1] for i, line in enumerate(lines[:-1]) if re.match(rf"# {label}\b", line)]


def test_ci_extracts_exactly_the_readme_commands():
    done = _ci_commands(README)
    assert done.returncode == 0, done.stderr
    lines = _readme_block(README.read_text(encoding="utf-8"))
    main_jobs, tests = _after(lines, "main job"), _after(lines, "tests")
    assert len(main_jobs) == 1 and len(tests) == 1, lines
    assert done.stdout.splitlines() == [main_jobs[0], tests[0]]


def test_the_commands_ci_runs_are_the_documented_set_up():
    main_job, tests = _ci_commands(README).stdout.splitlines()
    for command in (main_job, tests):
        steps = command.split(" && ")
        assert steps[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"], command
        # torch pinned and first: pip then takes the local CPU build, not a CUDA download.
        assert steps[2].startswith("pip install torch==2.13.0 -e "), command
    # .ci/run checks the PNG named by --out, and treats pytest's exit 5 (no tests) as failure.
    assert re.fullmatch(r"ddim-fused sample .*--out \S+\.png", main_job.split(" && ")[-1]), main_job
    # The test suite, then the benchmarks' own tests (their conftest pins threads and the
    # allocator, so they run as a session of their own).
    assert tests.split(" && ")[-2:] == ["pytest", "pytest bench"], tests


@pytest.mark.parametrize(
    "edit",
    [("## Set up and run", "## Installation"), ("# tests (", "# test suite ("), ("# main job:", "# demo:")],
    ids=["section-renamed", "tests-comment-renamed", "main-job-comment-renamed"],
)
def test_ci_refuses_a_readme_without_the_commands(tmp_path, edit):
    text = README.read_text(encoding="utf-8")
    assert edit[0] in text
    changed = tmp_path / "README.md"
    changed.write_text(text.replace(edit[0], edit[1]), encoding="utf-8")
    done = _ci_commands(changed)
    assert done.returncode != 0 and done.stdout == ""
    assert "CI runs exactly those commands" in done.stderr


def _collect_from_elsewhere(ini: Path, cwd: Path, target: Path) -> subprocess.CompletedProcess:
    """pytest --collect-only of target, run from cwd with the given ini file.

    The package is importable there (linked into a folder on PYTHONPATH, as an install
    would make it, also where the checkout was never installed); `tests` is not.
    """
    site = cwd / "site"
    site.mkdir(exist_ok=True)
    if not (site / "ddim_fused").exists():
        (site / "ddim_fused").symlink_to(ROOT / "ddim_fused", target_is_directory=True)
    env = env_without_checkout()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env["PYTHONPATH"]) if p)
    code = ("import sys, pytest; sys.exit(pytest.main(['-c', sys.argv[1], '--rootdir', sys.argv[2], "
            "'--collect-only', '-q', '-p', 'no:cacheprovider', sys.argv[3]]))")
    return subprocess.run([sys.executable, "-c", code, str(ini), str(ROOT), str(target)],
                          cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_bare_pytest_imports_the_shared_test_helpers(tmp_path):
    # A bare `pytest` does not put the repository root on sys.path (python -m pytest and
    # python -c would, through the working directory), so run pytest from another folder
    # on a module that imports tests.helpers.
    target = ROOT / "tests" / "test_interpolation.py"
    assert "from tests.helpers import" in target.read_text(encoding="utf-8")
    done = _collect_from_elsewhere(ROOT / "pytest.ini", tmp_path, target)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\d+ tests? collected", done.stdout), done.stdout[-3000:]
    # Control: without the ini's pythonpath the same collection fails, so the check above
    # is really about sys.path and not about something else that happens to import `tests`.
    ini = (ROOT / "pytest.ini").read_text(encoding="utf-8")
    assert re.search(r"^pythonpath\s*=", ini, re.M)
    bare_ini = tmp_path / "pytest.ini"
    bare_ini.write_text(re.sub(r"^pythonpath\s*=.*$", "", ini, flags=re.M), encoding="utf-8")
    control = _collect_from_elsewhere(bare_ini, tmp_path, target)
    assert control.returncode != 0 and "No module named 'tests'" in control.stdout, control.stdout[-3000:]
