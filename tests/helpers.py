"""Shared test utilities: one comparison helper, toy models, dtype tolerances."""
from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import sys
from pathlib import Path

import torch

from ddim_fused.metrics import relative_rms_error
from ddim_fused.schedules import make_alpha_bar

# Relative RMS tolerance of fp32 results against the reference.
FP32_RTOL = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = FP32_RTOL, atol: float = 0.0, name: str = "") -> None:
    """Fail with max abs error, relative RMS error, mismatch count and first bad indices.

    actual and expected are tensors of one shape (any). Passes when no value is NaN/Inf
    where expected is finite, relative_rms_error(actual, expected) <= rtol, and every
    element is within atol + rtol * max|expected|.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad_finite = torch.isfinite(e) & ~torch.isfinite(a)
    assert not bad_finite.any(), f"{name}: {int(bad_finite.sum())} NaN/Inf values, first at {_first(bad_finite)}"
    err = (a - e).abs()
    scale = e.abs().max().item() or 1.0
    rel_rms = relative_rms_error(a, e)
    bad = err > atol + rtol * scale
    msg = (f"{name}: max abs err {err.max().item():.3e}, rel RMS err {rel_rms:.3e} (rtol {rtol:.1e}), "
           f"{int(bad.sum())}/{a.numel()} beyond atol {atol:.1e} + rtol * {scale:.3e}, first at {_first(bad)}")
    assert rel_rms <= rtol and not bad.any(), msg


def error_vs(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """relative_rms_error of actual (any shape) against exact (same shape), both finite.

    Non-finite values fail here, not in the caller's comparison: relative_rms_error gives
    inf for them, which would satisfy a check such as `error_vs(x, x0) > 0.5`.
    """
    err = relative_rms_error(actual, exact)
    assert math.isfinite(err), "relative RMS error is not finite: NaN/Inf in either input, or exact is all 0"
    return err


def _first(mask: torch.Tensor, k: int = 3):
    return [tuple(i.tolist()) for i in mask.nonzero()[:k]]


class ToyModel:
    """A cheap nonlinear eps-model following labml's protocol, conditioned by a scalar per sample.

    `device` (None: the CPU) is where the samplers draw a latent when none is given;
    conditioning may be a host tensor, the model moves it to x's device. `times` records
    the (B,) time steps of every call, as host lists.
    """

    n_steps = 1000

    def __init__(self, schedule: str = "linear", device=None):
        self.alpha_bar = torch.from_numpy(make_alpha_bar(schedule, self.n_steps))
        self.device = device
        self.calls = 0
        self.times = []

    def __call__(self, x, t, cond):
        self.calls += 1
        self.times.append(t.tolist())
        view = (-1,) + (1,) * (x.dim() - 1)
        t = (t.to(torch.float64) / self.n_steps).view(view)
        c = cond.to(x.device, torch.float64).view(view) if cond is not None else 0.0
        h = torch.tanh(0.6 * x.to(torch.float64) + t + 0.5 * c)
        return h.to(x.dtype)


def torchrun(nproc: int, *args: str) -> list[str]:
    """The command that runs `python -m ddim_fused ARGS` in `nproc` processes through torchrun.

    --standalone: the rendezvous listens on a free port of its own, so runs started at
    once (pytest-xdist workers) never collide, as they did on the default port 29500 of
    torch 2.11's torchrun (torch 2.13's picks a free port by itself).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "ddim_fused", "--", *args]


@contextlib.contextmanager
def holding_port(port: int = 29500):
    """Keep a TCP port (default torchrun's) bound for the block, as a parallel run would.

    If something else holds it already, the block runs with it held by that.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
            sock.listen(1)
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
        yield


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


def env_without_checkout(**extra: str) -> dict:
    """os.environ for a child process, with this checkout taken off PYTHONPATH (where a
    GPU run puts it) and the other entries (e.g. carried packages) kept, plus `extra`."""
    root = Path(__file__).resolve().parent.parent
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != root]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(kept), **extra}


# The CLI's image grids: 8x8 samples upscaled SCALE times, PAD source pixels between them.
SCALE, PAD = 8, 1


def grid_size(ncols: int, nrows: int) -> tuple[int, int]:
    """(width, height) in pixels of a CLI grid of ncols x nrows 8x8 samples."""
    return ((ncols * (8 + PAD) + PAD) * SCALE, (nrows * (8 + PAD) + PAD) * SCALE)


def scheduler_dummy_sample(flip: bool = False) -> torch.Tensor:
    """(4, 3, 8, 8) deterministic sample of diffusers' scheduler tests (rebuilt here), for their published sums."""
    n = 4 * 3 * 8 * 8
    values = torch.arange(n).flip(-1) if flip else torch.arange(n)
    return (values.reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def scheduler_dummy_model(sample: torch.Tensor, t) -> torch.Tensor:
    """The dummy eps-model of diffusers' scheduler tests: sample * t / (t + 1)."""
    t = t.reshape(-1, 1, 1, 1).to(sample.dtype)
    return sample * t / (t + 1)
