"""The fused step kernel against the update it defines, computed in float64."""
import functools
import struct

import pytest
import torch

from ddim_fused.backend import kernels
from ddim_fused.masks import mask_layout
from ddim_fused.ops import ddim_step as checked_step
from ddim_fused.philox import keyed_normal_torch
from ddim_fused.step_args import StepArgs
from tests.helpers import assert_close, nan_like

ddim_step = functools.partial(checked_step, backend="triton")
NOISE_ATOL = kernels().noise.NOISE_ATOL[kernels().noise.FAST_MATH]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHAPES = {
    "B1-C3-H17-W23": (1, 3, 17, 23),
    "B3-C2-F5-H6-W7": (3, 2, 5, 6, 7),
    "B2-N77-D9": (2, 77, 9),
    "B2-N5003": (2, 5003),  # more than one block, not a multiple of it
}
COEFS = dict(x_coef=1.37, eps_coef=-0.41, x0_coefs=(2.1, -1.3))


def rtol_for(dtype):
    return 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps


def randn(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def expected_step(x, model_out, guidance=None, noise_coef=0.0, noise=None, mask=None, orig=None,
                  orig_coef=0.0, orig_noise_coef=0.0, orig_noise=None):
    x, model_out = x.double(), model_out.double()
    B = x.shape[0]
    eps = model_out[:B] + guidance * (model_out[B:] - model_out[:B]) if guidance is not None else model_out
    out = COEFS["x_coef"] * x + COEFS["eps_coef"] * eps
    if noise is not None:
        out = out + noise_coef * noise.double()
    if mask is not None:
        orig_t = orig_coef * orig.double() + orig_noise_coef * orig_noise.double()
        m = mask.double()
        out = orig_t * m + out * (1 - m)
    x0 = COEFS["x0_coefs"][0] * x + COEFS["x0_coefs"][1] * eps
    return out, x0, eps


@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg3.5"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_step_with_noise_tensor(shape, dtype, cfg, device):
    B = shape[0]
    x = randn(shape, dtype, device, 0)
    model_out = randn((2 * B if cfg else B,) + shape[1:], dtype, device, 1)
    noise = randn(shape, dtype, device, 2)
    out, x0_out, eps_out = nan_like(x), nan_like(x), nan_like(x)
    guidance = 3.5 if cfg else None
    ddim_step(x, model_out, out=out, guidance=guidance, noise_coef=0.3, noise=noise,
              x0_out=x0_out, eps_out=eps_out, **COEFS)
    want, want_x0, want_eps = expected_step(x, model_out, guidance, 0.3, noise)
    rtol = rtol_for(dtype)
    assert_close(out, want, rtol=rtol, name="x_prev")
    assert_close(x0_out, want_x0, rtol=rtol, name="pred_x0")
    assert_close(eps_out, want_eps, rtol=rtol, name="eps")
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("repeat", [False, True], ids=["per-sample", "repeat_noise"])
@pytest.mark.parametrize("shape", [(3, 2, 9, 11), (3, 4, 8, 8)], ids=["N198", "N256"])
def test_in_kernel_noise_matches_the_keyed_stream(shape, repeat, dtype, device):
    # N = 198: one Philox call per element; N = 256: four elements per call, laid out
    # per thread as fp32 (runs of 4) or fp16 (runs of 8) accesses are.
    x, eps = randn(shape, dtype, device, 0), randn(shape, dtype, device, 1)
    out = ddim_step(x, eps, noise_coef=0.25, seed=1234, step_key=6, sample_offset=10, repeat_noise=repeat,
                    x_coef=COEFS["x_coef"], eps_coef=COEFS["eps_coef"])
    numel = x[0].numel()
    noise = keyed_normal_torch(3, numel, 1234, 6, "step", 10, repeat=repeat, device=device).view(shape)
    want, _, _ = expected_step(x, eps, noise_coef=0.25, noise=noise)
    assert_close(out, want, rtol=rtol_for(dtype), atol=0.25 * NOISE_ATOL)
    drawn = (out.double() - (COEFS["x_coef"] * x.double() + COEFS["eps_coef"] * eps.double())) / 0.25
    if repeat:
        assert torch.allclose(drawn[0], drawn[1], atol=1e-2) and torch.allclose(drawn[0], drawn[2], atol=1e-2)
    else:
        assert not torch.allclose(drawn[0], drawn[1], atol=0.1)


def test_in_kernel_orig_noise_draws_the_orig_stream(device):
    # Everything kept (mask 1) and orig_coef 0: x_prev is orig's noise alone, which the
    # kernel draws from the "orig" stream, x's from the "step" one (the test above).
    shape = (2, 3, 8, 8)
    x, eps = randn(shape, torch.float32, device, 0), randn(shape, torch.float32, device, 1)
    out = ddim_step(x, eps, mask=torch.ones((1, 1, 8, 8), device=device), orig=torch.zeros_like(x), orig_coef=0.0,
                    orig_noise_coef=1.0, seed=99, step_key=4, sample_offset=3, **COEFS)
    want = keyed_normal_torch(2, 192, 99, 4, "orig", 3, device=device).view(shape)
    assert_close(out, want, rtol=1e-6, atol=NOISE_ATOL)
    assert not torch.allclose(want, keyed_normal_torch(2, 192, 99, 4, "step", 3, device=device).view(shape), atol=0.1)


def test_noise_tensor_with_batch_one_is_shared(device):
    x, eps = randn((3, 40), torch.float32, device, 0), randn((3, 40), torch.float32, device, 1)
    noise = randn((1, 40), torch.float32, device, 2)
    out = ddim_step(x, eps, noise_coef=0.5, noise=noise, x_coef=COEFS["x_coef"], eps_coef=COEFS["eps_coef"])
    want, _, _ = expected_step(x, eps, noise_coef=0.5, noise=noise.expand(3, 40))
    assert_close(out, want, rtol=1e-6)


# Mask shapes for x of shape (B, C, H, W).
MASKS = {
    "mask-B1HW": lambda B, C, H, W: (B, 1, H, W),
    "mask-11HW": lambda B, C, H, W: (1, 1, H, W),
    "mask-BC11": lambda B, C, H, W: (B, C, 1, 1),
    "mask-1C11": lambda B, C, H, W: (1, C, 1, 1),
    "mask-B1H1": lambda B, C, H, W: (B, 1, H, 1),  # two broadcast runs: expanded once on the host
    "mask-HW": lambda B, C, H, W: (H, W),
    "mask-full": lambda B, C, H, W: (B, C, H, W),
}


@pytest.mark.parametrize("orig_batch", ["B", 1], ids=["origB", "orig1"])
@pytest.mark.parametrize("mask_of", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("shape", [(2, 3, 9, 10), (2, 4, 8, 8)], ids=["N270", "N256"])
def test_paint_blend_with_broadcast_masks(shape, mask_of, orig_batch, device):
    # N = 256 gathers the broadcast inputs and the mask per chunk of 4 elements; N = 270 per element.
    x, eps = randn(shape, torch.float32, device, 0), randn(shape, torch.float32, device, 1)
    orig = randn((shape[0] if orig_batch == "B" else 1,) + shape[1:], torch.float32, device, 3)
    orig_noise = randn(shape, torch.float32, device, 4)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(mask_of(*shape), generator=g).to(device)
    out = ddim_step(x, eps, out=nan_like(x), mask=mask, orig=orig, orig_coef=0.8, orig_noise_coef=0.6,
                    orig_noise=orig_noise, x_coef=COEFS["x_coef"], eps_coef=COEFS["eps_coef"])
    want, _, _ = expected_step(x, eps, mask=mask, orig=orig.expand(shape), orig_coef=0.8, orig_noise_coef=0.6,
                               orig_noise=orig_noise)
    assert_close(out, want, rtol=1e-6)


@pytest.mark.parametrize("mask_name", ["mask-B1HW", "mask-11HW", "mask-1C11", "mask-full"])
def test_half_precision_paint_gathers_batch_one_inputs(mask_name, device):
    # fp16 gathers go per chunk of 8 elements; noise, orig and orig_noise hold one sample.
    shape = (3, 4, 8, 8)
    x, eps = randn(shape, torch.float16, device, 0), randn(shape, torch.float16, device, 1)
    noise, orig, orig_noise = (randn((1,) + shape[1:], torch.float16, device, s) for s in (2, 3, 4))
    mask = torch.rand(MASKS[mask_name](*shape), generator=torch.Generator().manual_seed(5)).to(device) > 0.5
    out = ddim_step(x, eps, out=nan_like(x), noise_coef=0.3, noise=noise, mask=mask, orig=orig, orig_coef=0.8,
                    orig_noise_coef=0.6, orig_noise=orig_noise, x_coef=COEFS["x_coef"], eps_coef=COEFS["eps_coef"])
    want, _, _ = expected_step(x, eps, noise_coef=0.3, noise=noise.expand(shape), mask=mask, orig=orig.expand(shape),
                               orig_coef=0.8, orig_noise_coef=0.6, orig_noise=orig_noise.expand(shape))
    assert_close(out, want, rtol=rtol_for(torch.float16))


def _launch_with(launch, **changes):
    kwargs = {**launch.kwargs, **changes}
    launch.kernel[launch.grid](*launch.args, **kwargs)


@pytest.mark.parametrize("mask_kind", ["runB", "run1", "dense1"])
def test_every_coordinate_mode_gives_the_same_step(mask_kind, device):
    # Large launches switch to int64 block bases ("base") or, for samples of about
    # 2**31 elements, to a two-sample split ("split", where the launcher makes run
    # masks dense); each runs here on a small batch whose samples exceed one
    # interpreter block, as SPLIT assumes.
    shape = (3, 2, 41, 52)  # N = 4264
    x, eps = randn(shape, torch.float32, device, 0), randn(shape, torch.float32, device, 1)
    orig = randn((1,) + shape[1:], torch.float32, device, 3)
    mask_shape = {"runB": (3, 1, 41, 52), "run1": (1, 1, 41, 52), "dense1": (1,) + shape[1:]}[mask_kind]
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(5)).to(device)
    step = StepArgs(x_coef=1.1, eps_coef=-0.4, noise_coef=0.3, seed=77, step_key=3, sample_offset=5,
                    mask=mask_layout(mask, shape), orig=orig, orig_coef=0.8, orig_noise_coef=0.6)
    modes = ["direct", "base"] + (["split"] if mask_kind == "dense1" else [])
    outs = []
    for mode in modes:
        out = nan_like(x)
        _launch_with(kernels().ddim_step.step_launch(x, eps, out, step), COORDS=mode)
        outs.append(out)
    assert torch.isfinite(outs[0]).all()
    assert all(torch.equal(outs[0], other) for other in outs[1:])
    reference = checked_step(x, eps, backend="torch", mask=mask, x_coef=1.1, eps_coef=-0.4, noise_coef=0.3, seed=77,
                             step_key=3, sample_offset=5, orig=orig, orig_coef=0.8, orig_noise_coef=0.6)
    assert_close(outs[0], reference, rtol=1e-6, atol=NOISE_ATOL)


def test_run_masks_of_huge_samples_are_expanded_once():
    # Samples of 2**31 elements index in int64; their run masks become dense (no division per element).
    x = torch.empty(2, 2**31 + 16, dtype=torch.float16, device="meta")
    mask = torch.empty(1, 1, dtype=torch.float16, device="meta")
    step = StepArgs(x_coef=1.0, eps_coef=0.5, mask=mask_layout(mask, tuple(x.shape)), orig=x, orig_coef=0.5)
    launch = kernels().ddim_step.step_launch(x, x, x, step)
    assert launch.kwargs["COORDS"] == "split"
    assert launch.kwargs["MASK_MODE"] == "sample"
    assert tuple(launch.args[9].shape) == (1, 2**31 + 16)


def test_batch_above_the_grid_y_limit(device):
    # 70,000 samples: a 2-D grid with one row per sample could not launch (grid-y <= 65,535).
    shape = (70000, 2)
    x, eps = randn(shape, torch.float32, device, 0), randn(shape, torch.float32, device, 1)
    fields = dict(x_coef=0.9, eps_coef=0.2, noise_coef=0.5, seed=9, step_key=1, sample_offset=100)
    out = ddim_step(x, eps, **fields)
    reference = checked_step(x, eps, backend="torch", **fields)
    assert_close(out, reference, rtol=1e-6, atol=0.5 * NOISE_ATOL)


def test_bool_mask_and_in_kernel_orig_noise(device):
    shape = (2, 3, 8, 8)
    x, eps = randn(shape, torch.float32, device, 0), randn(shape, torch.float32, device, 1)
    orig = randn(shape, torch.float32, device, 3)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool, device=device)
    mask[:, :, :4] = True
    out = ddim_step(x, eps, mask=mask, orig=orig, orig_coef=0.8, orig_noise_coef=0.6, seed=21, step_key=4,
                    x_coef=COEFS["x_coef"], eps_coef=COEFS["eps_coef"])
    orig_noise = keyed_normal_torch(2, 192, 21, 4, "orig", device=device).view(shape)
    want, _, _ = expected_step(x, eps, mask=mask, orig=orig, orig_coef=0.8, orig_noise_coef=0.6, orig_noise=orig_noise)
    assert_close(out, want, rtol=1e-6)
    # Where the mask is 1 the output is exactly the noised original.
    assert_close(out[:, :, :4], (0.8 * orig + 0.6 * orig_noise)[:, :, :4], rtol=1e-6)


def test_in_place_into_x(device):
    x = randn((2, 3, 17, 23), torch.float32, device, 0)
    eps = randn((2, 3, 17, 23), torch.float32, device, 1)
    want, _, _ = expected_step(x, eps)
    result = ddim_step(x, eps, out=x, x_coef=COEFS["x_coef"], eps_coef=COEFS["eps_coef"])
    assert result.data_ptr() == x.data_ptr()
    assert_close(x, want, rtol=1e-6)


def test_inputs_are_not_modified(device):
    x, eps = randn((2, 50), torch.float32, device, 0), randn((4, 50), torch.float32, device, 1)
    x_copy, eps_copy = x.clone(), eps.clone()
    ddim_step(x, eps, guidance=2.0, noise_coef=0.1, seed=3, x_coef=1.0, eps_coef=0.5)
    assert torch.equal(x, x_copy) and torch.equal(eps, eps_copy)


def test_mask_layout_collapses_one_broadcast_run():
    layout = mask_layout(torch.ones(2, 1, 9, 10), (2, 3, 9, 10))
    assert (layout.batch_stride, layout.mid, layout.inner) == (90, 3, 90)
    layout = mask_layout(torch.ones(1, 3, 1, 1), (2, 3, 9, 10))
    assert (layout.batch_stride, layout.mid, layout.inner) == (0, 90, 1)
    layout = mask_layout(torch.ones(2, 1, 9, 1), (2, 3, 9, 10))
    assert (layout.mask.shape, layout.batch_stride, layout.mid, layout.inner) == ((2, 3, 9, 10), 270, 1, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs > 2**31 elements on a GPU; the interpreter is too slow")
def test_more_than_2_to_the_31_elements():
    # The output (0.5 * 1 + 0.5 * 2 = 1.5) differs from the input it overwrites, so an
    # element the kernel never reaches (an int32 offset wrapping past 2**31) keeps 1.0.
    n = 2**31 + 4099
    x = torch.ones((1, n), device="cuda", dtype=torch.float16)
    eps = torch.full((1, n), 2.0, device="cuda", dtype=torch.float16)
    ddim_step(x, eps, out=x, x_coef=0.5, eps_coef=0.5)
    for name, part in (("head", x[0, :4099]), ("around 2**31", x[0, 2**31 - 4099 : 2**31 + 4099]),
                       ("tail", x[0, -4099:])):
        assert bool(part.eq(1.5).all()), f"{name}: {int(part.ne(1.5).sum())} elements not written"
    assert bool(x.eq(1.5).all()), f"{int(x.ne(1.5).sum())} of {n} elements not written"


def test_bf16_store_rounds_to_nearest_even(device):
    x = randn((1, 4096), torch.bfloat16, device, 0)
    out = ddim_step(x, torch.zeros_like(x), x_coef=1.0 / 3.0, eps_coef=0.0)
    want = (x.float() * torch.tensor(1.0 / 3.0, dtype=torch.float32)).to(torch.bfloat16)
    assert torch.equal(out, want)


def _from_bits(*patterns: int) -> torch.Tensor:
    return torch.tensor([struct.unpack("<f", struct.pack("<I", p))[0] for p in patterns], dtype=torch.float32)


# 0x7FFFFFFF is the GPU's canonical NaN: rounding it to bf16 by adding 0x7FFF carries
# into the sign bit and gives -0.0 unless NaN is handled on its own.
SPECIALS = _from_bits(0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x3F800000)


@pytest.mark.parametrize("out_dtype", DTYPES.values(), ids=DTYPES.keys())
def test_nan_and_inf_survive_every_store_dtype(out_dtype, device):
    special = SPECIALS.repeat(2, 4).to(device)  # (2, 32): the bulk of a block, no tail
    zeros = torch.zeros_like(special)
    stored = {}
    # The specials pass through x (x_prev, pred_x0), then through the model output (all three).
    for label, x, eps, coefs in (("x", special, zeros, (1.0, 0.0)), ("eps", zeros, special, (0.0, 1.0))):
        out, x0_out, eps_out = (torch.empty(special.shape, dtype=out_dtype, device=device) for _ in range(3))
        ddim_step(x, eps, out=out, x0_out=x0_out, eps_out=eps_out, x_coef=coefs[0], eps_coef=coefs[1], x0_coefs=coefs)
        stored.update({f"x_prev via {label}": out, f"pred_x0 via {label}": x0_out})
        if label == "eps":
            stored["eps"] = eps_out
    want = special.cpu()
    for name, got in stored.items():
        got = got.float().cpu()
        assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN lost or made, {got}"
        # The rest, +-Inf included, rounds as torch rounds it (fp32 max becomes +Inf in fp16 and bf16).
        kept = ~want.isnan()
        assert torch.equal(got[kept], want[kept].to(out_dtype).float()), f"{name}: {got}"


def test_bf16_rounding_by_hand_keeps_nan_in_the_tail(device):
    # 5 elements: all in the masked scalar tail, a separate code path.
    x = _from_bits(0x7FFFFFFF, 0xFFFFFFFF, 0x7F800000, 0xFF800000, 0x40490FDB).view(1, 5).to(device)
    out = ddim_step(x, torch.zeros_like(x), out=torch.empty(1, 5, dtype=torch.bfloat16, device=device),
                    x_coef=1.0, eps_coef=0.0).float().cpu()
    assert out[0, :2].isnan().all() and out[0, 2].item() == float("inf") and out[0, 3].item() == float("-inf")
    assert out[0, 4].item() == torch.tensor(3.1415927).to(torch.bfloat16).item()


NOISE_KEYS = [
    (dict(sample_offset=2**32), ValueError, "sample_offset"),
    (dict(sample_offset=2**32 - 1), ValueError, "sample_offset"),  # sample 1 would get key 2**32
    (dict(sample_offset=-1), ValueError, "sample_offset"),
    (dict(step_key=2**32), ValueError, "step_key"),
    (dict(seed=2**63), ValueError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.7), TypeError, "seed"),
    (dict(step_key=2.0), TypeError, "step_key"),
    (dict(sample_offset=True), TypeError, "sample_offset"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("keys,error,name", NOISE_KEYS, ids=[str(k) for k, _, _ in NOISE_KEYS])
def test_noise_keys_outside_their_words_are_refused(keys, error, name, backend, device):
    x = torch.zeros(2, 8, device=device)
    fields = {**dict(x_coef=1.0, eps_coef=0.5, noise_coef=0.1, seed=3), **keys}
    with pytest.raises(error, match=name):
        checked_step(x, x, backend=backend, **fields)


def test_the_largest_keys_are_accepted_and_distinct(device):
    x = torch.zeros(2, 8, device=device)
    top = ddim_step(x, x, x_coef=1.0, eps_coef=0.0, noise_coef=1.0, seed=2**63 - 1, step_key=2**32 - 1,
                    sample_offset=2**32 - 2)
    low = ddim_step(x, x, x_coef=1.0, eps_coef=0.0, noise_coef=1.0, seed=2**63 - 1, step_key=0, sample_offset=0)
    assert torch.isfinite(top).all() and not torch.equal(top, low)


def test_the_launcher_refuses_wrapping_keys_too():
    x = torch.zeros(2, 8)
    step = StepArgs(x_coef=1.0, eps_coef=0.0, noise_coef=1.0, seed=1, sample_offset=2**32 - 1)
    with pytest.raises(ValueError, match="sample_offset"):
        kernels().launch_ddim_step(x, x, torch.empty_like(x), step)


def test_every_launch_sets_fp_fusion_explicitly():
    # Triton 3.10 flips the default; the kernels' results must not change with it.
    x = torch.empty(2, 64, device="meta")
    plain = kernels().ddim_step.step_launch(x, x, x, StepArgs(x_coef=1.0, eps_coef=0.5))
    noisy = kernels().ddim_step.step_launch(x, x, x, StepArgs(x_coef=1.0, eps_coef=0.5, noise_coef=0.1, seed=1))
    normals = kernels().noise.noise_launch(x, 1, 0, 0, 0)
    assert all(launch.kwargs["enable_fp_fusion"] is True for launch in (plain, noisy, normals))
