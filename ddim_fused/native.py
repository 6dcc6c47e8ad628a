"""The CPU kernels (`cpu_kernels.c`): the keyed noise stream and the fused float32 step.

Noise: in torch integer ops, Philox4x32-10 takes ~130 full-size int64 passes per draw,
several times the cost of `torch.randn`; in C it is a few vector instructions per counter.
The C side makes the Philox uniforms and the final radius * cos/sin products, both exactly
rounded; log, sqrt, cos and sin stay torch ops, so the normals are the same bits as those
of the torch-ops path in `ddim_fused.philox`.

Step: `ddim_update_f32` computes a float32 DDIM step (guidance, noise, pred_x0, eps) in one
pass, and `ddim_paint_f32` the same step with paint's mask blend, where torch ops take 2 to
7 passes and as many dispatches (`ddim_fused.torch_step` calls them).

The library is compiled with the system C compiler ($CC, else cc, gcc or clang; about a
second) into $XDG_CACHE_HOME/ddim-fused (default ~/.cache/ddim-fused), under a name hashed
from the source, the command and the machine, and loaded from there afterwards. With no
compiler, or DDIM_FUSED_CPU_KERNEL=0, `library()` returns None (with one warning for a
failed build) and callers use torch ops.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from .validation import check_int, check_tensor

SOURCE = Path(__file__).with_name("cpu_kernels.c")
DISABLE_ENV = "DDIM_FUSED_CPU_KERNEL"
# "-x c" last: the source is C even where $CC names a C++ driver (which would mangle the names).
FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-x", "c")
# Counters per chunk (and per torch thread): bounds the scratch planes (6 x 512 KiB) of a
# large draw; each chunk costs ~7 calls. Measured on 1M normals at 1 thread (shared CPUs):
# 64K to 256K within noise, 32K ~10% slower, 4K far slower.
CHUNK_COUNTERS = 1 << 17

_lock = threading.Lock()
_loaded: dict[str, Optional[ctypes.CDLL]] = {}


class NativeBuildError(RuntimeError):
    """The C kernel could not be compiled or loaded."""


def compiler() -> Optional[list[str]]:
    """The C compiler command: $CC (split like a shell would), else cc, gcc or clang; None if none."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def cache_dir() -> Path:
    """Where built libraries are kept: $XDG_CACHE_HOME/ddim-fused, default ~/.cache/ddim-fused."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddim-fused"


def load_library(directory: Path, command: list[str], *, shared: bool = True) -> ctypes.CDLL:
    """The C kernel from `directory`, compiled there with `command` first if not there yet.

    Args:
        directory: the cache folder (created if missing).
        command: the compiler command, e.g. ["cc"].
        shared: other processes may load from `directory` too, so the library is built
            under a private name and renamed into place; False (a folder of this process
            only) builds it in place.

    Returns:
        the loaded library with its argument types set.

    Raises:
        NativeBuildError: the compiler failed or is missing, or the library does not load.
        OSError: the folder cannot be created or written.
    """
    source = SOURCE.read_bytes()
    recipe = b"\0".join([source, *(s.encode() for s in (*command, *FLAGS, platform.machine()))])
    target = directory / f"cpu_kernels-{hashlib.sha256(recipe).hexdigest()[:16]}.so"
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        if shared:
            _compile(command, target)
        else:
            _run_compiler(command, str(target))
    try:
        return _declare(ctypes.CDLL(str(target)))
    except (OSError, AttributeError) as err:  # AttributeError: a symbol is missing
        raise NativeBuildError(f"cannot load {target}: {err}") from err


def _compile(command: list[str], target: Path) -> None:
    # Build under a private name, then rename: a concurrent process never loads a half-written file.
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".cpu_kernels-", suffix=".so")
    os.close(fd)
    try:
        _run_compiler(command, partial)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _run_compiler(command: list[str], output: str) -> None:
    try:
        done = subprocess.run([*command, *FLAGS, "-o", output, str(SOURCE)], capture_output=True, text=True,
                              timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NativeBuildError(f"cannot run the C compiler {command[0]!r}: {err}") from err
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise NativeBuildError(f"{command[0]} failed (exit {done.returncode}): {' / '.join(tail)}")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ddim_philox_uniforms.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ctypes.c_uint64, ctypes.c_int]
    lib.ddim_philox_uniforms.restype = None
    lib.ddim_box_muller_store.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64]
    lib.ddim_box_muller_store.restype = None
    f32 = ctypes.c_float
    lib.ddim_update_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, f32, f32, f32, f32, f32, f32]
    lib.ddim_update_f32.restype = None
    lib.ddim_paint_f32.argtypes = [*lib.ddim_update_f32.argtypes, ptr, i64, ptr, i64, ptr, i64, i64, i64, f32, f32]
    lib.ddim_paint_f32.restype = None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The C kernel, built or loaded on first use; None if disabled or unavailable.

    A failed build warns once (RuntimeWarning) and is not retried in this process.
    """
    if os.environ.get(DISABLE_ENV, "1").strip() == "0":
        return None
    if "lib" in _loaded:  # settled: no lock needed to read it
        return _loaded["lib"]
    with _lock:
        if "lib" not in _loaded:
            _loaded["lib"] = _build_or_warn()
        return _loaded["lib"]


def _build_or_warn() -> Optional[ctypes.CDLL]:
    command = compiler()
    if command is None:
        reason = "no C compiler found (set CC)"
    else:
        try:
            try:
                return load_library(cache_dir(), command)
            except OSError:
                # No usable cache (a read-only home, a folder that refuses renames): build for
                # this process only. A loaded library outlives its file.
                with tempfile.TemporaryDirectory(prefix="ddim-fused-") as private:
                    return load_library(Path(private), command, shared=False)
        except (NativeBuildError, OSError) as err:
            reason = str(err)
    warnings.warn(f"ddim_fused: the CPU kernels are unavailable ({reason}); keyed noise and float32 steps run "
                  f"as torch ops, slower (set {DISABLE_ENV}=0 to silence this)", RuntimeWarning, stacklevel=3)
    return None


def keyed_normal_native(lib: ctypes.CDLL, out: torch.Tensor, sample_keys: torch.Tensor, step_keys: torch.Tensor,
                        stream_id: int, seed: int, *, simd: bool = True,
                        chunk_counters: int = CHUNK_COUNTERS) -> torch.Tensor:
    """Fill `out` with the keyed stream, row r keyed by (sample_keys[r], step_keys[r]).

    Args:
        lib: from `library()`.
        out: (R, numel) float32, contiguous, on the CPU.
        sample_keys, step_keys: (R,) int64 on the CPU; their low 32 bits are the counter
            words c1 and c2.
        stream_id: a value of `ddim_fused.philox.NOISE_STREAMS`.
        seed: int in [0, 2**64).
        simd: False forces the C kernel's generic path (tests compare both).
        chunk_counters: counters per chunk, per torch thread.

    Returns:
        out: (R, numel).
    """
    # The C side writes through raw pointers: shapes, dtypes and layout are checked first.
    check_tensor("out", out, shape=(None, None), device="cpu", dtypes=(torch.float32,))
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    rows, numel = out.shape
    for name, keys in (("sample_keys", sample_keys), ("step_keys", step_keys)):
        check_tensor(name, keys, shape=(rows,), device="cpu", dtypes=(torch.int64,))
    check_int("stream_id", stream_id, 0, 2**30)
    check_int("seed", seed, 0, 2**64 - 1)
    check_int("chunk_counters", chunk_counters, 1, 2**40)
    n_counters = (numel + 3) // 4
    total = rows * n_counters
    if total == 0:
        return out
    sample_keys, step_keys = sample_keys.contiguous(), step_keys.contiguous()
    chunk = min(total, chunk_counters * max(1, torch.get_num_threads()))
    uniforms, cos_buffer = torch.empty(4 * chunk), torch.empty(2 * chunk)
    for begin in range(0, total, chunk):
        end = min(total, begin + chunk)
        planes = uniforms[: 4 * (end - begin)].view(4, end - begin)
        lib.ddim_philox_uniforms(planes.data_ptr(), begin, end, n_counters, sample_keys.data_ptr(),
                                 step_keys.data_ptr(), stream_id, seed, int(simd))
        # The same torch ops, on the same values, as the torch-ops path: identical bits.
        radius, angle = planes[:2], planes[2:]
        radius.log_().mul_(-2.0).sqrt_()
        cos_angle = torch.cos(angle, out=cos_buffer[: 2 * (end - begin)].view(2, end - begin))
        sin_angle = angle.sin_()
        lib.ddim_box_muller_store(out.data_ptr(), radius.data_ptr(), cos_angle.data_ptr(), sin_angle.data_ptr(),
                                  begin, end, n_counters, numel)
    return out
