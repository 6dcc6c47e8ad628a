"""The fused step kernel against the update it defines, computed in float64."""
import pytest
import torch

import functools

from ddim_fused.masks import mask_layout
from ddim_fused.ops import ddim_step as checked_step
from ddim_fused.philox import keyed_normal_torch
from tests.helpers import assert_close, nan_like

ddim_step = functools.partial(checked_step, backend="triton")

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


@pytest.mark.parametrize("repeat", [False, True], ids=["per-sample", "repeat_noise"])
def test_in_kernel_noise_matches_the_keyed_stream(repeat, device):
    shape = (3, 2, 9, 11)
    x, eps = randn(shape, torch.float32, device, 0), randn(shape, torch.float32, device, 1)
    out = ddim_step(x, eps, noise_coef=0.25, seed=1234, step_key=6, sample_offset=10, repeat_noise=repeat,
                    x_coef=COEFS["x_coef"], eps_coef=COEFS["eps_coef"])
    noise = keyed_normal_torch(3, 198, 1234, 6, "step", 10, repeat=repeat, device=device).view(shape)
    want, _, _ = expected_step(x, eps, noise_coef=0.25, noise=noise)
    assert_close(out, want, rtol=1e-6)
    drawn = (out.double() - (COEFS["x_coef"] * x.double() + COEFS["eps_coef"] * eps.double())) / 0.25
    if repeat:
        assert torch.allclose(drawn[0], drawn[1], atol=1e-4) and torch.allclose(drawn[0], drawn[2], atol=1e-4)
    else:
        assert not torch.allclose(drawn[0], drawn[1], atol=1e-2)


def test_noise_tensor_with_batch_one_is_shared(device):
    x, eps = randn((3, 40), torch.float32, device, 0), randn((3, 40), torch.float32, device, 1)
    noise = randn((1, 40), torch.float32, device, 2)
    out = ddim_step(x, eps, noise_coef=0.5, noise=noise, x_coef=COEFS["x_coef"], eps_coef=COEFS["eps_coef"])
    want, _, _ = expected_step(x, eps, noise_coef=0.5, noise=noise.expand(3, 40))
    assert_close(out, want, rtol=1e-6)


MASKS = {
    "mask-B1HW": (2, 1, 9, 10),
    "mask-11HW": (1, 1, 9, 10),
    "mask-BC11": (2, 3, 1, 1),
    "mask-B1H1": (2, 1, 9, 1),  # two broadcast runs: expanded once on the host
    "mask-HW": (9, 10),
    "mask-full": (2, 3, 9, 10),
}


@pytest.mark.parametrize("orig_batch", [2, 1], ids=["origB", "orig1"])
@pytest.mark.parametrize("mask_shape", MASKS.values(), ids=MASKS.keys())
def test_paint_blend_with_broadcast_masks(mask_shape, orig_batch, device):
    shape = (2, 3, 9, 10)
    x, eps = randn(shape, torch.float32, device, 0), randn(shape, torch.float32, device, 1)
    orig = randn((orig_batch,) + shape[1:], torch.float32, device, 3)
    orig_noise = randn(shape, torch.float32, device, 4)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(mask_shape, generator=g).to(device)
    out = ddim_step(x, eps, out=nan_like(x), mask=mask, orig=orig, orig_coef=0.8, orig_noise_coef=0.6,
                    orig_noise=orig_noise, x_coef=COEFS["x_coef"], eps_coef=COEFS["eps_coef"])
    want, _, _ = expected_step(x, eps, mask=mask, orig=orig.expand(shape), orig_coef=0.8, orig_noise_coef=0.6,
                               orig_noise=orig_noise)
    assert_close(out, want, rtol=1e-6)


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
