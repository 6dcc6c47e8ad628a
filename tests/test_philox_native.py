"""The CPU noise kernel: both of its code paths, chunking, counters past 2**32, build and cache."""
import warnings

import pytest
import torch

from ddim_fused import philox_native
from ddim_fused.philox import philox4x32

TWO_PI_F32 = torch.tensor(6.283185307179586, dtype=torch.float32)


@pytest.fixture
def native():
    """The C kernel; skipped (not passed) where no C compiler can build it."""
    if philox_native.compiler() is None:
        pytest.skip("no C compiler: the CPU noise kernel cannot be built here")
    lib = philox_native.library()
    assert lib is not None, "a C compiler exists but the CPU noise kernel did not build"
    return lib


def planes_from_torch(counters, sample_key, step_key, stream, seed):
    """The four planes ddim_philox_uniforms writes, from philox4x32 (int64 torch ops)."""
    c3 = (counters >> 32) * 4 + stream
    r0, r1, r2, r3 = philox4x32(counters & 0xFFFFFFFF, torch.full_like(counters, sample_key),
                                torch.full_like(counters, step_key), c3, seed)
    u0, u1, u2, u3 = (((r >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0) for r in (r0, r1, r2, r3))
    return torch.stack([u0, u2, u1 * TWO_PI_F32, u3 * TWO_PI_F32])


@pytest.mark.parametrize("simd", [True, False])
def test_counters_past_2_32_carry_into_the_fourth_word(native, simd):
    # 19 counters across the 2**32 boundary: vector groups with mixed high words, then a scalar tail.
    first, count, n_counters = 2**32 - 9, 19, 2**33
    sample_keys, step_keys = torch.tensor([0, 77]), torch.tensor([0, 5])
    out = torch.full((4, count), float("nan"))
    native.ddim_philox_uniforms(out.data_ptr(), n_counters + first, n_counters + first + count, n_counters,
                                sample_keys.data_ptr(), step_keys.data_ptr(), 2, 2**63 + 12345, int(simd))
    want = planes_from_torch(torch.arange(first, first + count), 77, 5, 2, 2**63 + 12345)
    assert torch.equal(out, want)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunks_and_code_paths_do_not_change_the_bits(native, chunk):
    # Rows of 10 counters (numel 37: a partial last counter), chunks that split rows anywhere.
    rows, numel = 5, 37
    sample_keys, step_keys = torch.arange(rows) + 3, torch.arange(rows) * 2
    whole = philox_native.keyed_normal_native(native, torch.empty(rows, numel), sample_keys, step_keys, 1, 99,
                                              chunk_counters=10**6)
    for simd in (True, False):
        out = torch.full((rows, numel), float("nan"))
        philox_native.keyed_normal_native(native, out, sample_keys, step_keys, 1, 99, simd=simd,
                                          chunk_counters=chunk)
        assert torch.equal(out, whole), simd


def test_a_built_library_is_loaded_from_the_cache(native, tmp_path, monkeypatch):
    command = philox_native.compiler()
    philox_native.load_library(tmp_path, command)
    built = list(tmp_path.glob("philox_cpu-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob(".philox_cpu-*"))

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again although the library was cached")

    monkeypatch.setattr(philox_native.subprocess, "run", no_compiler)
    lib = philox_native.load_library(tmp_path, command)
    assert hasattr(lib, "ddim_box_muller_store")


@pytest.mark.parametrize("command, message", [(["false"], "failed"), (["/nonexistent/cc"], "cannot run")])
def test_a_failed_build_says_why_and_leaves_nothing_behind(tmp_path, command, message):
    with pytest.raises(philox_native.NativeBuildError, match=message):
        philox_native.load_library(tmp_path, command)
    assert not list(tmp_path.iterdir())


def test_without_a_working_compiler_the_stream_falls_back_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(philox_native, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="CPU noise kernel is unavailable"):
        assert philox_native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second build attempt would warn again
        assert philox_native.library() is None


def test_cc_may_carry_flags(monkeypatch):
    monkeypatch.setenv("CC", "ccache gcc -m64")
    assert philox_native.compiler() == ["ccache", "gcc", "-m64"]


@pytest.mark.parametrize("change, error, name", [
    (dict(out=torch.empty(3, 8, dtype=torch.float64)), TypeError, "out"),
    (dict(out=torch.empty(8, 3).t()), ValueError, "contiguous"),
    (dict(out=torch.empty(24)), ValueError, "out"),
    (dict(sample_keys=torch.zeros(2, dtype=torch.int64)), ValueError, "sample_keys"),
    (dict(step_keys=torch.zeros(3, dtype=torch.int32)), TypeError, "step_keys"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(chunk_counters=0), ValueError, "chunk_counters"),
])
def test_the_kernel_wrapper_checks_what_it_hands_to_c(native, change, error, name):
    args = dict(out=torch.empty(3, 8), sample_keys=torch.zeros(3, dtype=torch.int64),
                step_keys=torch.zeros(3, dtype=torch.int64), stream_id=0, seed=1, chunk_counters=4) | change
    with pytest.raises(error, match=name):
        philox_native.keyed_normal_native(native, **args)
