"""Timers, the copy-bandwidth probe, cache sizes and the run's environment tag.

CPU: time.perf_counter over repeated calls after a warm-up; each sample times
`inner` back-to-back calls so that a sample lasts at least MIN_SAMPLE_S and the
timer's own cost is negligible. GPU: triton.testing.do_bench, which flushes L2 before
each call and synchronizes.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from ddim_fused.backend import interpreter_on

QUANTILES = (0.2, 0.5, 0.8)
MIN_SAMPLE_S = 1e-3


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS (Linux CPU runs).

    With glibc's defaults every multi-MB tensor a step allocates is a fresh mmap or a
    re-grown heap, so each call pays page faults (measured here: a 1M-element step took
    ~20 ms instead of ~2 ms). Those faults are a property of the allocator, not of the
    step, and they make timings swing with the other processes' memory traffic. With the
    heap kept (as jemalloc/tcmalloc would), steady-state timings measure the arithmetic.

    Returns:
        True if both settings were applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, 2**25))
    except (OSError, AttributeError):
        return False


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_host(fn, device: torch.device, budget_s: float = 0.25, warmup: int = 2,
              min_samples: int = 7, max_samples: int = 100) -> dict:
    """Time fn() with perf_counter, synchronizing the device around each sample.

    Args:
        fn: zero-argument callable.
        device: where fn's work runs (synchronized on CUDA).
        budget_s: rough total time to spend on the timed samples.
        warmup: untimed calls first (allocator, caches, lazy init).

    Returns:
        dict with p20, p50, p80, min (seconds per call), samples, inner.
    """
    one, inner = _calibrate(fn, device, warmup)
    n = int(min(max_samples, max(min_samples, budget_s / (inner * one))))
    times = np.empty(n)
    for k in range(n):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        times[k] = (time.perf_counter() - t0) / inner
    p20, p50, p80 = np.quantile(times, QUANTILES)
    return {"p20": float(p20), "p50": float(p50), "p80": float(p80), "min": float(times.min()),
            "samples": n, "inner": inner}


def time_interleaved(fns: dict, device: torch.device, budget_s: float = 0.25, warmup: int = 2,
                     min_samples: int = 7, max_samples: int = 100) -> dict:
    """Time several callables in round-robin, so load from other processes hits all alike.

    On a shared CPU a burst of foreign load during one provider's samples would skew a
    speedup; interleaving the samples (one of each provider per round) spreads it evenly.

    Args:
        fns: {name: zero-argument callable}.
        device: where their work runs (synchronized on CUDA).
        budget_s: rough time per callable.

    Returns:
        {name: dict with p20, p50, p80, min (seconds per call), samples, inner}.
    """
    inner, one = {}, {}
    for name, fn in fns.items():
        one[name], inner[name] = _calibrate(fn, device, warmup)
    slowest = max((inner[k] * one[k] for k in fns), default=1.0)
    n = int(min(max_samples, max(min_samples, budget_s / slowest)))
    times = {name: np.empty(n) for name in fns}
    for k in range(n):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync(device)
            times[name][k] = (time.perf_counter() - t0) / inner[name]
    out = {}
    for name, t in times.items():
        p20, p50, p80 = np.quantile(t, QUANTILES)
        out[name] = {"p20": float(p20), "p50": float(p50), "p80": float(p80), "min": float(t.min()),
                     "samples": n, "inner": inner[name], "timer": "perf_counter, interleaved"}
    return out


def time_kernel(fn, device: torch.device, budget_s: float = 0.25) -> dict:
    """Time one device operation: do_bench on CUDA (L2 flushed), time_host elsewhere.

    Returns:
        dict with p20, p50, p80 (seconds per call) and the timer used.
    """
    if device.type != "cuda":
        return {**time_host(fn, device, budget_s), "timer": "perf_counter"}
    from triton.testing import do_bench  # noqa: PLC0415 - triton only where it runs natively

    rep_ms = max(10.0, 1e3 * budget_s * 0.8)
    p20, p50, p80 = do_bench(fn, warmup=max(5.0, rep_ms / 4), rep=rep_ms, quantiles=list(QUANTILES))
    return {"p20": p20 * 1e-3, "p50": p50 * 1e-3, "p80": p80 * 1e-3, "timer": "triton.testing.do_bench"}


def copy_bandwidth(device: torch.device, n_bytes: int | None = None) -> dict:
    """Bandwidth of a large same-device tensor copy, counting bytes read plus written.

    Args:
        device: the device to probe.
        n_bytes: size of the copied tensor; default 1 GiB on CUDA, 128 MiB on CPU,
            both far above the last-level cache.

    Returns:
        dict with gbs (p50, GB/s = 1e9 B/s), bytes_per_copy and the timing quantiles.
    """
    n_bytes = n_bytes or (2**30 if device.type == "cuda" else 2**27)
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_kernel(lambda: dst.copy_(src), device, budget_s=0.5)
    moved = 2 * n_bytes
    out = {"gbs": moved / t["p50"] / 1e9, "bytes_per_copy": moved, **t}
    return out


def same_size_copy(n_bytes: int, device: torch.device, budget_s: float = 0.25) -> dict:
    """Time a copy that moves n_bytes (read plus write), as `time_kernel` times a step.

    A step of n_bytes of traffic against this copy is judged without the fixed cost of a
    call (launch, ramp-up, the write-back of the L2 lines do_bench's flush left dirty),
    which a copy of 1 GiB (`copy_bandwidth`) hides and a step of 64 MB does not.

    Returns:
        dict with gbs and the timing quantiles (seconds), as `copy_bandwidth`.
    """
    src = torch.empty(max(1, n_bytes // 2), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_kernel(lambda: dst.copy_(src), device, budget_s=budget_s)
    return {"gbs": 2 * src.numel() / t["p50"] / 1e9, **t}


def cache_bytes(device: torch.device) -> int:
    """Size of the last cache between the cores and memory (L2 on CUDA, the largest CPU cache).

    Traffic below about twice this size can be served from cache, so GB/s there is not a
    memory bandwidth.
    """
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best


def device_name(device: torch.device) -> str:
    """A readable name of the device (GPU model, or the CPU model and thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} CPUs, torch threads {torch.get_num_threads()})"


def environment(device: torch.device, malloc_tuned: bool = False) -> dict:
    """Tag of a run: device, versions, commit and date.

    Args:
        device: the device the run times.
        malloc_tuned: what tune_malloc() returned for this run (False if not called).
    """
    try:
        import triton  # noqa: PLC0415

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import diffusers  # noqa: PLC0415

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    commit, dirty = source_commit()
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "diffusers": diffusers_version,
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": interpreter_on(),
        "malloc_tuned": malloc_tuned,
    }


def source_commit() -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes) of the code a run times.

    DDIM_FUSED_COMMIT, where set, names a clean checkout of that commit: a copy of the tree
    on a lent machine may carry a stale `.git` of its own, or none.
    """
    if os.environ.get("DDIM_FUSED_COMMIT"):
        return os.environ["DDIM_FUSED_COMMIT"], False
    root = Path(__file__).resolve().parent.parent
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    return _git(root, "rev-parse", "HEAD"), bool(dirty) if dirty is not None else None


def _git(root: Path, *args: str):
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _calibrate(fn, device: torch.device, warmup: int) -> tuple[float, int]:
    """Warm fn up, time one call; returns (seconds per call, calls per timed sample)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    return one, max(1, math.ceil(MIN_SAMPLE_S / one))
