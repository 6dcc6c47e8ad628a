"""Where the Triton kernel runs in this test run: one decision, one fixture.

- CUDA present: tests of the Triton backend take CUDA tensors (the real compiler).
- No CUDA: TRITON_INTERPRET=1 (set here unless the caller set it; it must be set before
  triton is imported, hence here, before any test module imports ddim_fused.kernels)
  runs the same kernel on CPU tensors through Triton's interpreter.
- No CUDA and TRITON_INTERPRET set to anything but 1 (a GPU-style run without a GPU,
  e.g. `TRITON_INTERPRET=0 pytest`): the kernel has nowhere to run, so every test of
  the Triton backend skips, with that reason, instead of failing on CPU tensors.

Every test that runs the Triton backend takes its tensors from `device` (or from
`backend_device` when it is parametrized over backends).
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
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ddim_fused import native as native_module  # noqa: E402 - imports no triton


def _triton_route() -> tuple[torch.device | None, str]:
    if torch.cuda.is_available():
        return torch.device("cuda"), ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu"), ""
    return None, (f"the Triton kernel cannot run here: no CUDA device, and TRITON_INTERPRET="
                  f"{os.environ.get('TRITON_INTERPRET')!r} is not '1' (the CPU interpreter is off)")


TRITON_DEVICE, NO_TRITON_REASON = _triton_route()


@pytest.fixture
def device() -> torch.device:
    """The device of every tensor a Triton-backend test makes: CUDA if present, else the
    CPU under the interpreter; the test skips when neither is available."""
    if TRITON_DEVICE is None:
        pytest.skip(NO_TRITON_REASON)
    return TRITON_DEVICE


@pytest.fixture
def backend_device(backend) -> torch.device:
    """For tests parametrized over `backend`: the Triton device for "triton" (skipping
    where there is none), the CPU for "torch" and "auto"."""
    if backend == "triton":
        if TRITON_DEVICE is None:
            pytest.skip(NO_TRITON_REASON)
        return TRITON_DEVICE
    return torch.device("cpu")


@pytest.fixture
def restore_threads():
    """For tests whose CLI runs set torch's global thread count (--threads): the session gets its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cpu_lib():
    """The CPU C kernels (ddim_fused.native); skipped (not passed) without a C compiler."""
    if native_module.compiler() is None:
        pytest.skip("no C compiler: the CPU kernels cannot be built here")
    lib = native_module.library()
    assert lib is not None, "a C compiler exists but the CPU kernels did not build"
    return lib


def _kernels_from_the_checkout() -> None:
    """Make `ddim_fused.kernels` importable from a checkout that was never pip-installed
    (test modules import it directly); `ddim_fused.backend.kernels` owns how. Installed
    packages, as the README's commands make, never take this path."""
    import importlib.util  # noqa: PLC0415 - only for this fallback

    if importlib.util.find_spec("ddim_fused.kernels") is None:
        from ddim_fused.backend import kernels  # noqa: PLC0415

        kernels()


_kernels_from_the_checkout()
