"""Without CUDA, run the Triton kernels through Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is imported, so it happens here, before
any test module imports ddim_fused.kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE
