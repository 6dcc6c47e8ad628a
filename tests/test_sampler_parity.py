"""DDIMSampler (Triton kernel and torch path) against the eager reference, step by step and over whole loops.

Two noise set-ups, both exact: under noise_source="torch" both samplers draw torch.randn
in the same order, so with one torch seed they see identical noise; under the default
keyed Philox noise the reference is fed the very keyed tensors the fused sampler draws
(`keyed_noise`). Either way they must agree to rounding.

Tests of the Triton backend take their tensors from the `backend_device` /
`device` fixtures (tests/conftest.py): CUDA on a GPU, else the CPU interpreter.
"""
import numpy as np
import pytest
import torch

from ddim_fused import DDIMSampler, ReferenceDDIMSampler, native
from ddim_fused.philox import keyed_normal_torch
from tests.helpers import ToyModel, assert_close, error_vs

BACKENDS = ["torch", "triton"]
SHAPE = (2, 3, 7, 9)


def make_pair(backend, n_steps=6, discretize="uniform", eta=0.0, device=None, noise_source="torch", **kw):
    model = ToyModel(device=device)
    ref = ReferenceDDIMSampler(model, n_steps, discretize, eta, **{k: v for k, v in kw.items() if k != "seed"})
    fused = DDIMSampler(model, n_steps, discretize, eta, backend=backend, noise_source=noise_source, **kw)
    return ref, fused


def keyed_noise(shape, seed, stream, device, sample_offset=0, repeat=False):
    """index -> the (B, *s) keyed Philox noise DDIMSampler draws at that DDIM index."""
    numel = int(np.prod(shape[1:]))

    def at(index):
        return keyed_normal_torch(shape[0], numel, seed, index, stream, sample_offset, repeat=repeat,
                                  device=device).view(shape)

    return at


def randn(shape, seed, device):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def run_both(ref_fn, fused_fn, seed=0):
    torch.manual_seed(seed)
    want = ref_fn()
    torch.manual_seed(seed)
    got = fused_fn()
    return got, want


def conds(batch=SHAPE[0], device="cpu"):
    return torch.linspace(-1, 1, batch, device=device), torch.zeros(batch, device=device)


SAMPLE_CASES = {
    "uniform-eta0": dict(discretize="uniform", eta=0.0),
    "quad-eta0.5-temp0.7": dict(discretize="quad", eta=0.5, temperature=0.7),
    "leading-eta1-cfg3": dict(discretize="leading", eta=1.0, cfg=3.0, set_alpha_to_one=True),
    "trailing-sigmahat": dict(discretize="trailing", eta="sigma_hat"),
    "linspace-eta0.3-repeat": dict(discretize="linspace", eta=0.3, repeat_noise=True),
    "uniform-eta0.5-xlast-skip2-cfg7.5": dict(discretize="uniform", eta=0.5, x_last=True, skip_steps=2, cfg=7.5),
    "list-eta0.2": dict(discretize=[3, 150, 400, 650, 999], eta=0.2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SAMPLE_CASES.values(), ids=SAMPLE_CASES.keys())
def test_sample_loop_matches_reference(case, backend, backend_device):
    case = dict(case)
    cfg = case.pop("cfg", None)
    kw = {k: case.pop(k) for k in ("set_alpha_to_one",) if k in case}
    ref, fused = make_pair(backend, 6, case.pop("discretize"), case.pop("eta"), device=backend_device, **kw)
    cond, uncond = conds(device=backend_device)
    x_last = randn(SHAPE, 9, backend_device) if case.pop("x_last", False) else None
    args = dict(x_last=x_last, **case)
    if cfg is not None:
        args.update(uncond_scale=cfg, uncond_cond=uncond)
    got, want = run_both(lambda: ref.sample(SHAPE, cond, **args), lambda: fused.sample(SHAPE, cond, **args))
    assert_close(got, want, name="x0")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [None, 4.0], ids=["nocfg", "cfg4"])
@pytest.mark.parametrize("eta", [0.0, 0.6], ids=["eta0", "eta0.6"])
def test_p_sample_returns_what_the_reference_returns(backend, cfg, eta, backend_device):
    ref, fused = make_pair(backend, 8, "quad", eta, device=backend_device)
    cond, uncond = conds(device=backend_device)
    x = randn(SHAPE, 3, backend_device)
    noise = randn(SHAPE, 4, backend_device)
    t = torch.full((SHAPE[0],), int(ref.time_steps[5]), device=backend_device)
    kw = dict(temperature=0.9, noise=noise)
    if cfg:
        kw.update(uncond_scale=cfg, uncond_cond=uncond)
    want = ref.p_sample(x, cond, t, int(t[0]), 5, **kw)
    got = fused.p_sample(x, cond, t, int(t[0]), 5, **kw)
    for g, w, name in zip(got, want, ("x_prev", "pred_x0", "e_t")):
        assert_close(g, w, name=name)


def paint_inputs(case, device):
    """x, orig, mask (case["mask"] shape, 0/1) and orig_noise (None unless case["orig_noise"])."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(SHAPE, generator=g).to(device)
    orig = torch.randn(SHAPE, generator=g).to(device)
    mask = (torch.rand(case["mask"], generator=g) > 0.5).float().to(device)
    orig_noise = torch.randn(SHAPE, generator=g).to(device) if case.get("orig_noise") else None
    return x, orig, mask, orig_noise


PAINT_CASES = {
    "alpha-blend-B1HW-given-noise": dict(blend="alpha", mask=(2, 1, 7, 9), orig_noise=True),
    "alpha-blend-11HW-drawn-noise-eta0.4": dict(blend="alpha", mask=(1, 1, 7, 9), eta=0.4),
    "alpha_prev-blend-B1HW-cfg2": dict(blend="alpha_prev", mask=(2, 1, 7, 9), cfg=2.0),
    "alpha_prev-blend-BCHW-tstart3": dict(blend="alpha_prev", mask=(2, 3, 7, 9), t_start=3, orig_noise=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PAINT_CASES.values(), ids=PAINT_CASES.keys())
def test_paint_loop_matches_reference(case, backend, backend_device):
    _check_paint_loop(case, backend, backend_device)


@pytest.mark.parametrize("case", PAINT_CASES.values(), ids=PAINT_CASES.keys())
def test_paint_loop_in_torch_ops_matches_reference(case, monkeypatch):
    # Where the C step does not run (fp16/bf16/fp64, no C compiler) torch ops paint.
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    _check_paint_loop(case, "torch", "cpu")


def _check_paint_loop(case, backend, device):
    ref, fused = make_pair(backend, 6, "uniform", case.get("eta", 0.0), device=device, paint_blend=case["blend"])
    cond, uncond = conds(device=device)
    x, orig, mask, orig_noise = paint_inputs(case, device)
    kw = dict(orig=orig, mask=mask, orig_noise=orig_noise)
    if case.get("cfg"):
        kw.update(uncond_scale=case["cfg"], uncond_cond=uncond)
    t_start = case.get("t_start", 6)
    got, want = run_both(lambda: ref.paint(x, cond, t_start, **kw), lambda: fused.paint(x, cond, t_start, **kw))
    assert_close(got, want, name="painted")


def test_prev_blend_returns_the_clean_original_where_masked():
    _, fused = make_pair("torch", 5, "uniform", 0.5, paint_blend="alpha_prev")
    x, orig = torch.randn(SHAPE), torch.randn(SHAPE)
    mask = torch.zeros(1, 1, 7, 9)
    mask[..., :3, :] = 1
    out = fused.paint(x, conds()[0], 5, orig=orig, mask=mask)
    assert torch.equal(out[..., :3, :], orig[..., :3, :])


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_sample_matches_reference(backend, backend_device):
    ref, fused = make_pair(backend, 6, device=backend_device)
    x0, noise = randn(SHAPE, 1, backend_device), randn(SHAPE, 2, backend_device)
    assert_close(fused.q_sample(x0, 4, noise), ref.q_sample(x0, 4, noise))
    got, want = run_both(lambda: ref.q_sample(x0, 2), lambda: fused.q_sample(x0, 2))
    assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_loop_is_no_worse_than_eager(dtype, backend, backend_device):
    """Fused error vs a float64 reference must be <= 2x the eager same-dtype error (+ tiny atol)."""
    ref, fused = make_pair(backend, 6, "uniform", 0.5, device=backend_device)
    cond, uncond = conds(device=backend_device)
    x_last = randn(SHAPE, 5, backend_device)
    args = dict(uncond_scale=3.0, uncond_cond=uncond)
    torch.manual_seed(1)
    exact = ref.sample(SHAPE, cond, x_last=x_last.double(), **args)
    torch.manual_seed(1)
    eager = ref.sample(SHAPE, cond, x_last=x_last.to(dtype), **args)
    torch.manual_seed(1)
    got = fused.sample(SHAPE, cond, x_last=x_last.to(dtype), **args)
    assert got.dtype == dtype
    err_fused, err_eager = error_vs(got, exact), error_vs(eager, exact)
    assert err_fused <= 2 * err_eager + 1e-4, f"fused {err_fused:.2e} vs eager {err_eager:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 4, 3, 5, 6), (3, 11, 8)], ids=["video-B2-C4-F3-H5-W6", "seq-B3-N11-D8"])
def test_any_rank_latents(shape, backend, backend_device):
    ref, fused = make_pair(backend, 4, "uniform", 0.5, device=backend_device)
    cond = torch.zeros(shape[0], device=backend_device)
    got, want = run_both(lambda: ref.sample(shape, cond), lambda: fused.sample(shape, cond))
    assert_close(got, want)


def test_float64_on_the_torch_backend_matches_reference_tightly():
    ref, fused = make_pair("torch", 6, "quad", 0.5)
    x_last = torch.randn(SHAPE, dtype=torch.float64)
    got, want = run_both(lambda: ref.sample(SHAPE, None, x_last=x_last), lambda: fused.sample(SHAPE, None, x_last=x_last))
    assert got.dtype == torch.float64
    assert_close(got, want, rtol=1e-12)


def test_callback_sees_every_step_in_order_with_pred_x0():
    ref, fused = make_pair("torch", 5, "uniform", 0.0)
    seen = []
    x_last = torch.randn(SHAPE)
    fused.sample(SHAPE, None, x_last=x_last, callback=lambda s: seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}))
    assert [s["index"] for s in seen] == [4, 3, 2, 1, 0]
    assert [s["t"] for s in seen] == list(reversed(fused.time_steps.tolist()))
    # The first step's pred_x0 is the reference's pred_x0 at the first step.
    t = torch.full((SHAPE[0],), seen[0]["t"])
    _, want_x0, _ = ref.p_sample(x_last, None, t, seen[0]["t"], 4)
    assert_close(seen[0]["pred_x0"], want_x0)
    assert_close(seen[-1]["x"], fused.sample(SHAPE, None, x_last=x_last))


class TestPhiloxNoise:
    """The default noise source: keyed by (seed, global sample index, step)."""

    def test_triton_and_torch_backends_agree(self, device):
        a = DDIMSampler(ToyModel(device=device), 5, "uniform", 0.7, backend="triton", seed=42)
        b = DDIMSampler(ToyModel(), 5, "uniform", 0.7, backend="torch", seed=42)
        assert_close(a.sample(SHAPE, conds()[0]), b.sample(SHAPE, conds()[0]), rtol=2e-6)

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_samples_do_not_depend_on_the_batch(self, backend, backend_device):
        sampler = DDIMSampler(ToyModel(device=backend_device), 5, "uniform", 0.7, backend=backend, seed=7)
        cond = torch.linspace(-1, 1, 4)
        whole = sampler.sample((4, 3, 5, 6), cond)
        halves = [sampler.sample((2, 3, 5, 6), cond[i : i + 2], sample_offset=i) for i in (0, 2)]
        single = sampler.sample((1, 3, 5, 6), cond[3:], sample_offset=3)
        assert torch.equal(torch.cat(halves), whole)
        assert torch.equal(single[0], whole[3])

    def test_torch_manual_seed_controls_unseeded_runs(self):
        sampler = DDIMSampler(ToyModel(), 4, "uniform", 1.0, backend="torch")
        torch.manual_seed(3)
        a = sampler.sample(SHAPE, None)
        torch.manual_seed(3)
        b = sampler.sample(SHAPE, None)
        torch.manual_seed(4)
        c = sampler.sample(SHAPE, None)
        assert torch.equal(a, b) and not torch.allclose(a, c)

    def test_repeat_noise_shares_one_noise_image(self):
        sampler = DDIMSampler(ToyModel(), 4, "uniform", 1.0, backend="torch", seed=5)
        x_last = torch.randn(1, 3, 5, 6).expand(3, 3, 5, 6)
        out = sampler.sample((3, 3, 5, 6), torch.zeros(3), repeat_noise=True, x_last=x_last)
        assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
        independent = sampler.sample((3, 3, 5, 6), torch.zeros(3), x_last=x_last)
        assert not torch.allclose(independent[0], independent[1])


# The default noise source against the reference: the reference is fed the keyed Philox
# tensors (initial latent from stream "initial", step i's noise from "step" at key i,
# paint's and q_sample's from "orig" at key i), so any change to how much keyed noise a
# step adds, or from which stream and key, shows up as a mismatch.
KEYED_SEED = 2024
KEYED_CASES = {
    "uniform-eta0.5": dict(discretize="uniform", eta=0.5),
    "quad-eta1-temp0.7-offset3": dict(discretize="quad", eta=1.0, temperature=0.7, sample_offset=3),
    "trailing-sigmahat-cfg3": dict(discretize="trailing", eta="sigma_hat", cfg=3.0),
    "linspace-eta0.3-repeat": dict(discretize="linspace", eta=0.3, repeat_noise=True),
    "uniform-eta0.8-skip2-offset5": dict(discretize="uniform", eta=0.8, skip_steps=2, sample_offset=5),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", KEYED_CASES.values(), ids=KEYED_CASES.keys())
def test_sample_with_default_keyed_noise_matches_reference(case, backend, backend_device):
    case = dict(case)
    cfg, offset = case.pop("cfg", None), case.pop("sample_offset", 0)
    ref, fused = make_pair(backend, 6, case.pop("discretize"), case.pop("eta"), device=backend_device,
                           noise_source="philox", seed=KEYED_SEED)
    assert fused.noise_source == DDIMSampler(ToyModel(), 6).noise_source  # the default is what is tested
    cond, uncond = conds(device=backend_device)
    if cfg is not None:
        case.update(uncond_scale=cfg, uncond_cond=uncond)
    x_T = keyed_noise(SHAPE, KEYED_SEED, "initial", backend_device, offset)(0)
    step_noise = keyed_noise(SHAPE, KEYED_SEED, "step", backend_device, offset, case.get("repeat_noise", False))
    want = ref.sample(SHAPE, cond, x_last=x_T, step_noise=step_noise, **case)
    got = fused.sample(SHAPE, cond, sample_offset=offset, **case)
    assert_close(got, want, name="x0")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blend", ["alpha", "alpha_prev"])
def test_paint_with_default_keyed_noise_matches_reference(blend, backend, backend_device):
    ref, fused = make_pair(backend, 6, "uniform", 0.4, device=backend_device, noise_source="philox",
                           seed=KEYED_SEED, paint_blend=blend)
    x, orig, mask, _ = paint_inputs(dict(mask=(2, 1, 7, 9)), backend_device)
    cond = conds(device=backend_device)[0]
    want = ref.paint(x, cond, 5, orig=orig, mask=mask,
                     orig_noise=keyed_noise(SHAPE, KEYED_SEED, "orig", backend_device, 4),
                     step_noise=keyed_noise(SHAPE, KEYED_SEED, "step", backend_device, 4))
    got = fused.paint(x, cond, 5, orig=orig, mask=mask, sample_offset=4)
    assert_close(got, want, name="painted")


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_steps_with_default_keyed_noise_match_reference(backend, backend_device):
    ref, fused = make_pair(backend, 8, "quad", 0.6, device=backend_device, noise_source="philox", seed=KEYED_SEED)
    cond = conds(device=backend_device)[0]
    x = randn(SHAPE, 3, backend_device)
    index = 5
    t = torch.full((SHAPE[0],), int(ref.time_steps[index]), device=backend_device)
    noise = keyed_noise(SHAPE, 77, "step", backend_device, 2)(index)
    want = ref.p_sample(x, cond, t, int(t[0]), index, temperature=0.9, noise=noise)
    got = fused.p_sample(x, cond, t, int(t[0]), index, temperature=0.9, seed=77, sample_offset=2)
    for g, w, name in zip(got, want, ("x_prev", "pred_x0", "e_t")):
        assert_close(g, w, name=name)
    e_t = want[2]
    got = fused.get_x_prev_and_pred_x0(e_t, index, x, temperature=0.9, seed=77, sample_offset=2)
    want = ref.get_x_prev_and_pred_x0(e_t, index, x, temperature=0.9, repeat_noise=False, noise=noise)
    for g, w, name in zip(got, want, ("x_prev", "pred_x0")):
        assert_close(g, w, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_sample_draws_the_orig_stream(backend, backend_device):
    # paint re-noises the original with the "orig" stream at the step's key; q_sample
    # draws that same noise, so q_sample(x0, i) is the original paint blends in at step i.
    ref, fused = make_pair(backend, 6, device=backend_device, noise_source="philox", seed=KEYED_SEED)
    x0 = randn(SHAPE, 1, backend_device)
    for index, offset in ((2, 0), (5, 7)):
        want = ref.q_sample(x0, index, noise=keyed_noise(SHAPE, 31, "orig", backend_device, offset)(index))
        assert_close(fused.q_sample(x0, index, seed=31, sample_offset=offset), want, name=f"q_sample index {index}")


@pytest.mark.parametrize("scale", [1.0, 0.0, 3.5])
def test_get_eps_is_the_guided_model_output(scale):
    model = ToyModel()
    sampler = DDIMSampler(model, 6, backend="torch")
    x, t = randn(SHAPE, 1, "cpu"), torch.tensor([900, 10])
    cond, uncond = conds()
    eps_c, eps_u = model(x, t, cond), model(x, t, uncond)
    got = sampler.get_eps(x, t, cond, uncond_scale=scale, uncond_cond=uncond)
    assert_close(got, eps_u + scale * (eps_c - eps_u), name=f"get_eps at scale {scale}")
    assert not torch.allclose(eps_c, eps_u)  # the halves differ, so swapping them would show
