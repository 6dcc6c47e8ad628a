"""bench/gpu.sh, the one command a lent GPU machine runs: every stage it offers can start."""
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu.sh"


def test_every_stage_calls_functions_the_script_defines():
    text = SCRIPT.read_text(encoding="utf-8")
    case = text[text.index('case "$STAGE" in\n    smoke)'):]
    case = case[: case.index("esac")]
    called = set(re.findall(r"\b(run_\w+)", case))
    defined = set(re.findall(r"^(run_\w+)\(\)", text, flags=re.M))
    assert {"run_sd", "run_session", "run_smoke"} <= called
    assert called <= defined, f"stages call undefined functions: {sorted(called - defined)}"


def test_an_unknown_stage_is_a_usage_error():
    run = subprocess.run(["bash", str(SCRIPT), "--stage", "nope"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--stage must be" in run.stderr
