"""The backend policy: which step function runs, and CPU paths that never import triton."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ddim_fused import backend
from ddim_fused.torch_step import torch_ddim_step


def test_auto_uses_torch_ops_off_cuda_and_for_float64():
    assert backend.step_function("auto", "cpu", torch.float32) is torch_ddim_step
    assert backend.step_function("auto", "cuda", torch.float64) is torch_ddim_step
    assert backend.step_function("torch", "cpu", torch.float16) is torch_ddim_step


def test_triton_refuses_float64_by_name():
    with pytest.raises(TypeError, match="triton backend"):
        backend.step_function("triton", "cpu", torch.float64)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.check_backend("cuda")


def test_triton_on_cpu_runs_the_kernel_under_the_interpreter():
    if not backend.interpreter_on():
        pytest.skip("TRITON_INTERPRET is not set in this run (a GPU run): the CPU kernel path does not exist")
    assert backend.step_function("triton", "cpu", torch.float32) is backend.kernels().launch_step


def test_sample_and_masked_paint_work_without_triton():
    # setup.py installs triton on Linux only: on other platforms the torch backend, masks
    # included, must never import it.
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        from ddim_fused import DDIMSampler
        s = DDIMSampler(lambda x, t, c: torch.tanh(x), 4, alpha_bar="linear", ddim_eta=0.5, backend="torch", seed=3)
        x = s.sample((2, 3, 4, 4), None)
        mask = torch.zeros(2, 1, 4, 4)
        mask[..., :2] = 1
        y = s.paint(x, None, 3, orig=x, mask=mask)
        assert torch.isfinite(x).all() and torch.isfinite(y).all()
        assert "ddim_fused.kernels" not in sys.modules
        print("OK", tuple(y.shape))
    """)
    env_free = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env_free)
    assert out.returncode == 0, out.stderr
    assert "OK (2, 3, 4, 4)" in out.stdout
