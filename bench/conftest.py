"""pytest-benchmark setup for bench/: device choice, interpreter flag, CPU threads and allocator.

The README's test command runs `pytest bench` after the suite, as a session of its own,
since this file pins torch's threads and the allocator. `pytest bench --benchmark-only`
times the cases.
"""
import os

try:
    import torch
except ModuleNotFoundError as exc:  # pytest run outside the project's environment
    import pytest

    pytest.exit(f"{exc.name} is not installed: set up with the README's test command "
                f"(python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e '.[test]' ...)",
                returncode=4)

if not torch.cuda.is_available():
    # Triton on CPU only through the interpreter, chosen before triton is imported; the
    # Triton cases are skipped on CPU anyway (an interpreter timing means nothing).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from bench.timing import tune_malloc  # noqa: E402

    tune_malloc()  # pytest-benchmark records no environment tag, so its result is not kept

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE
