"""The CPU kernels: the noise stream (both code paths, chunking, counters past 2**32), the fused
float32 update against a float32 numpy oracle, and the build and cache."""
import warnings

import numpy as np

import pytest
import torch

from ddim_fused import native
from ddim_fused.philox import philox4x32
from ddim_fused.step_args import StepArgs
from ddim_fused.torch_step import torch_ddim_step

TWO_PI_F32 = torch.tensor(6.283185307179586, dtype=torch.float32)


def planes_from_torch(counters, sample_key, step_key, stream, seed):
    """The four planes ddim_philox_uniforms writes, from philox4x32 (int64 torch ops)."""
    c3 = (counters >> 32) * 4 + stream
    r0, r1, r2, r3 = philox4x32(counters & 0xFFFFFFFF, torch.full_like(counters, sample_key),
                                torch.full_like(counters, step_key), c3, seed)
    u0, u1, u2, u3 = (((r >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0) for r in (r0, r1, r2, r3))
    return torch.stack([u0, u2, u1 * TWO_PI_F32, u3 * TWO_PI_F32])


@pytest.mark.parametrize("simd", [True, False])
def test_counters_past_2_32_carry_into_the_fourth_word(cpu_lib, simd):
    # 19 counters across the 2**32 boundary: vector groups with mixed high words, then a scalar tail.
    first, count, n_counters = 2**32 - 9, 19, 2**33
    sample_keys, step_keys = torch.tensor([0, 77]), torch.tensor([0, 5])
    out = torch.full((4, count), float("nan"))
    cpu_lib.ddim_philox_uniforms(out.data_ptr(), n_counters + first, n_counters + first + count, n_counters,
                                 sample_keys.data_ptr(), step_keys.data_ptr(), 2, 2**63 + 12345, int(simd))
    want = planes_from_torch(torch.arange(first, first + count), 77, 5, 2, 2**63 + 12345)
    assert torch.equal(out, want)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunks_and_code_paths_do_not_change_the_bits(cpu_lib, chunk):
    # Rows of 10 counters (numel 37: a partial last counter), chunks that split rows anywhere.
    rows, numel = 5, 37
    sample_keys, step_keys = torch.arange(rows) + 3, torch.arange(rows) * 2
    whole = native.keyed_normal_native(cpu_lib, torch.empty(rows, numel), sample_keys, step_keys, 1, 99,
                                              chunk_counters=10**6)
    for simd in (True, False):
        out = torch.full((rows, numel), float("nan"))
        native.keyed_normal_native(cpu_lib, out, sample_keys, step_keys, 1, 99, simd=simd,
                                          chunk_counters=chunk)
        assert torch.equal(out, whole), simd


def test_a_built_library_is_loaded_from_the_cache(cpu_lib, tmp_path, monkeypatch):
    command = native.compiler()
    native.load_library(tmp_path, command)
    built = list(tmp_path.glob("cpu_kernels-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob(".cpu_kernels-*"))

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again although the library was cached")

    monkeypatch.setattr(native.subprocess, "run", no_compiler)
    lib = native.load_library(tmp_path, command)
    assert hasattr(lib, "ddim_box_muller_store")


@pytest.mark.parametrize("command, message", [(["false"], "failed"), (["/nonexistent/cc"], "cannot run")])
def test_a_failed_build_says_why_and_leaves_nothing_behind(tmp_path, command, message):
    with pytest.raises(native.NativeBuildError, match=message):
        native.load_library(tmp_path, command)
    assert not list(tmp_path.iterdir())


def test_without_a_working_compiler_the_stream_falls_back_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="CPU kernels are unavailable"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second build attempt would warn again
        assert native.library() is None


def test_a_cache_that_refuses_renames_builds_privately_without_a_warning(cpu_lib, tmp_path, monkeypatch):
    # A folder that lets files be created but not renamed into place (as an unwritable
    # output folder does under tests/test_cli_errors.py): the private build needs no rename.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(native.os, "replace", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib = native.library()
    assert lib is not None and hasattr(lib, "ddim_update_f32")
    assert not list((tmp_path / "ddim-fused").glob("*.so"))  # nothing half-published in the shared cache


def test_cc_may_carry_flags(monkeypatch):
    monkeypatch.setenv("CC", "ccache gcc -m64")
    assert native.compiler() == ["ccache", "gcc", "-m64"]


@pytest.mark.parametrize("change, error, name", [
    (dict(out=torch.empty(3, 8, dtype=torch.float64)), TypeError, "out"),
    (dict(out=torch.empty(8, 3).t()), ValueError, "contiguous"),
    (dict(out=torch.empty(24)), ValueError, "out"),
    (dict(sample_keys=torch.zeros(2, dtype=torch.int64)), ValueError, "sample_keys"),
    (dict(step_keys=torch.zeros(3, dtype=torch.int32)), TypeError, "step_keys"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(chunk_counters=0), ValueError, "chunk_counters"),
])
def test_the_kernel_wrapper_checks_what_it_hands_to_c(cpu_lib, change, error, name):
    args = dict(out=torch.empty(3, 8), sample_keys=torch.zeros(3, dtype=torch.int64),
                step_keys=torch.zeros(3, dtype=torch.int64), stream_id=0, seed=1, chunk_counters=4) | change
    with pytest.raises(error, match=name):
        native.keyed_normal_native(cpu_lib, **args)


# ---------------------------------------------------------------- ddim_update_f32
def update_oracle(x, eps, eps_c, noise, x_coef, eps_coef, guidance, noise_coef, x0_x, x0_eps):
    """ddim_update_f32's documented arithmetic in numpy float32, one rounding per operation."""
    f = np.float32
    x, e = x.numpy(), eps.numpy()
    if eps_c is not None:
        e = e + f(guidance) * (eps_c.numpy() - e)
    x0 = f(x0_x) * x + f(x0_eps) * e
    acc = f(x_coef) * x + f(eps_coef) * e
    if noise is not None:
        acc = acc + f(noise_coef) * noise.numpy()
    return torch.from_numpy(acc), torch.from_numpy(x0), torch.from_numpy(np.ascontiguousarray(e))


def f32(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("noise_rows", [0, 1, 3], ids=["no-noise", "one-row", "per-sample"])
def test_fused_update_is_the_documented_float32_arithmetic(cpu_lib, guided, noise_rows):
    shape = (3, 2, 5, 7)
    x, eps, eps_c = f32(shape, 1), f32(shape, 2), f32(shape, 3) if guided else None
    noise = f32((noise_rows,) + shape[1:], 4) if noise_rows else None
    coefs = dict(x_coef=1.0137, eps_coef=-0.4129, guidance=7.5 if guided else 0.0, noise_coef=0.3311,
                 x0_x=2.0917, x0_eps=-1.7703)
    model_out = torch.cat([eps, eps_c]) if guided else eps
    out, x0, eps_out = (torch.full(shape, float("nan")) for _ in range(3))
    cpu_lib.ddim_update_f32(out.data_ptr(), x0.data_ptr(), eps_out.data_ptr(), x.data_ptr(), model_out.data_ptr(),
                            model_out[3:].data_ptr() if guided else None,
                            None if noise is None else noise.data_ptr(), 3, 70, noise_rows, *coefs.values())
    want, want_x0, want_eps = update_oracle(x, eps, eps_c, noise, *coefs.values())
    assert torch.equal(out, want) and torch.equal(x0, want_x0) and torch.equal(eps_out, want_eps)


def test_fused_update_may_write_over_its_x_or_its_noise(cpu_lib):
    shape = (2, 3, 4)
    x, eps, noise = f32(shape, 1), f32(shape, 2), f32(shape, 3)
    want, _, _ = update_oracle(x, eps, None, noise, 0.9, 0.2, 0.0, 0.5, 0.0, 0.0)
    for target in ("x", "noise"):
        xs, ns = x.clone(), noise.clone()
        out = xs if target == "x" else ns
        cpu_lib.ddim_update_f32(out.data_ptr(), None, None, xs.data_ptr(), eps.data_ptr(), None, ns.data_ptr(), 2, 12,
                                2, 0.9, 0.2, 0.0, 0.5, 0.0, 0.0)
        assert torch.equal(out, want), target


@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("noise", ["none", "given", "keyed"])
def test_torch_step_with_and_without_the_c_kernel(cpu_lib, monkeypatch, guidance, noise):
    """The C pass and the torch ops compute the same step, to float32 rounding (a few units in the last place)."""
    shape = (2, 3, 4, 5)
    x = f32(shape, 1)
    model_out = f32(((2 if guidance else 1) * 2,) + shape[1:], 2)
    fields = dict(x_coef=1.01, eps_coef=-0.3, x0_coefs=(1.7, -0.9), guidance=guidance)
    if noise != "none":
        fields.update(noise_coef=0.4, seed=5, step_key=2, noise=f32(shape, 3) if noise == "given" else None)
    step = StepArgs(**fields)
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv(native.DISABLE_ENV, enabled)
        outs = [torch.empty(shape) for _ in range(3)]  # x_prev, pred_x0, guided eps
        torch_ddim_step(x, model_out, outs[0], step, outs[1], outs[2])
        results.append(outs)
    for c_kernel, torch_ops in zip(*results):
        torch.testing.assert_close(c_kernel, torch_ops, rtol=3e-6, atol=3e-6)


# ---------------------------------------------------------------- ddim_paint_f32
PAINT_SHAPE = (3, 2, 5, 7)  # 70 elements per sample: no multiple of a vector or of a block
MASKS = {  # mask shape -> how it lies against PAINT_SHAPE (ddim_fused.masks)
    "B1HW-run": (3, 1, 5, 7),  # mid C, inner H * W
    "11HW-shared": (1, 1, 5, 7),
    "BC11-inner1": (3, 2, 1, 1),  # one value per run of H * W elements
    "HW-no-batch-dim": (5, 7),
    "BCHW-dense": (3, 2, 5, 7),
    "1CHW-dense-shared": (1, 2, 5, 7),
    "B1H1-expanded": (3, 1, 5, 1),  # two broadcast runs: mask_layout expands it to a dense copy
}


def paint_oracle(acc, orig, orig_noise, mask, orig_coef, orig_noise_coef):
    """ddim_paint_f32's documented blend in numpy float32, one rounding per operation."""
    f = np.float32
    t = f(orig_coef) * orig.numpy()
    if orig_noise is not None:
        t = t + f(orig_noise_coef) * orig_noise.numpy()
    m = np.broadcast_to(mask.to(torch.float32).numpy(), acc.shape)
    return torch.from_numpy(m * t + (acc.numpy() - m * acc.numpy()))


def spy(monkeypatch, lib, name):
    calls, real = [], getattr(lib, name)
    monkeypatch.setattr(lib, name, lambda *args: calls.append(1) or real(*args))
    return calls


# Runs longer than the C side's chunk (BLEND_CHUNK, 512) and no multiple of it: 3 x 37 x 41.
LONG_RUNS = {"B1HW-run-long": ((2, 3, 37, 41), (2, 1, 37, 41)), "BCHW-dense-long": ((2, 3, 37, 41), (2, 3, 37, 41)),
             "BC11-inner1-long": ((2, 3, 37, 41), (2, 3, 1, 1))}
PAINT_CASES = {**{k: (PAINT_SHAPE, m) for k, m in MASKS.items()}, **LONG_RUNS}


@pytest.mark.parametrize("shape,mask_shape", PAINT_CASES.values(), ids=PAINT_CASES.keys())
@pytest.mark.parametrize("orig_rows,orig_noise_rows", [("B", "B"), (1, 0), ("B", 1)],
                         ids=["per-sample", "shared-no-noise", "shared-noise"])
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_paint_step_is_one_c_pass_of_the_documented_float32_arithmetic(cpu_lib, monkeypatch, shape, mask_shape,
                                                                      orig_rows, orig_noise_rows, guided):
    from ddim_fused.masks import mask_layout  # noqa: PLC0415

    orig_rows, orig_noise_rows = (shape[0] if r == "B" else r for r in (orig_rows, orig_noise_rows))
    x, eps, eps_c, noise = f32(shape, 1), f32(shape, 2), f32(shape, 3), f32(shape, 4)
    orig = f32((orig_rows,) + shape[1:], 5)
    orig_noise = f32((orig_noise_rows,) + shape[1:], 6) if orig_noise_rows else None
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(7))  # fractional: both terms count
    mask.view(-1)[:2] = torch.tensor([0.0, 1.0])  # and the exact ends
    model_out = torch.cat([eps, eps_c]) if guided else eps
    coefs = dict(x_coef=1.0137, eps_coef=-0.4129, guidance=7.5 if guided else None, noise_coef=0.3311,
                 x0_coefs=(2.0917, -1.7703))
    step = StepArgs(**coefs, noise=noise, mask=mask_layout(mask, shape), orig=orig, orig_coef=0.8123,
                    orig_noise=orig_noise, orig_noise_coef=0.5861 if orig_noise is not None else 0.0)
    calls = spy(monkeypatch, cpu_lib, "ddim_paint_f32")
    out, x0 = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    torch_ddim_step(x, model_out, out, step, x0)
    assert calls == [1]
    acc, want_x0, _ = update_oracle(x, eps, eps_c if guided else None, noise, coefs["x_coef"], coefs["eps_coef"],
                                    7.5 if guided else 0.0, coefs["noise_coef"], *coefs["x0_coefs"])
    want = paint_oracle(acc, orig, orig_noise, mask.reshape((1,) * (len(shape) - mask.dim()) + mask.shape),
                        step.orig_coef, step.orig_noise_coef)
    assert torch.equal(out, want) and torch.equal(x0, want_x0)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool], ids=["float", "bool"])
@pytest.mark.parametrize("orig_noise", ["given", "keyed"])
def test_paint_step_with_and_without_the_c_kernel(cpu_lib, monkeypatch, mask_dtype, orig_noise):
    """The C pass and the torch ops (lerp) paint alike, to float32 rounding."""
    from ddim_fused.masks import mask_layout  # noqa: PLC0415

    shape = (2, 3, 4, 5)
    mask = torch.rand((2, 1, 4, 5), generator=torch.Generator().manual_seed(3)) > 0.5
    step = StepArgs(x_coef=1.01, eps_coef=-0.3, x0_coefs=(1.7, -0.9), noise_coef=0.4, seed=5, step_key=2,
                    mask=mask_layout(mask.to(mask_dtype), shape), orig=f32(shape, 4), orig_coef=0.7,
                    orig_noise=f32(shape, 5) if orig_noise == "given" else None, orig_noise_coef=0.6)
    calls = spy(monkeypatch, cpu_lib, "ddim_paint_f32")
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv(native.DISABLE_ENV, enabled)
        results.append(torch_ddim_step(f32(shape, 1), f32(shape, 2), torch.empty(shape), step))
    assert calls == [1]
    torch.testing.assert_close(results[0], results[1], rtol=3e-6, atol=3e-6)


def test_paint_step_of_empty_samples_writes_nothing(cpu_lib):
    from ddim_fused.masks import mask_layout  # noqa: PLC0415

    shape = (2, 0, 4)
    step = StepArgs(x_coef=1.0, eps_coef=0.5, mask=mask_layout(torch.ones(2, 1, 4), shape), orig=torch.empty(shape),
                    orig_coef=0.7)
    assert torch_ddim_step(torch.empty(shape), torch.empty(shape), torch.empty(shape), step).shape == shape
