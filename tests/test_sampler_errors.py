"""Bad input meets a clear ValueError/TypeError before any work (the model is never called)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddim_fused import DDIMSampler
from ddim_fused.ops import ddim_step
from tests.helpers import ToyModel

SHAPE = (2, 3, 4, 5)


@pytest.fixture
def model():
    return ToyModel()


def sampler(model, **kw):
    return DDIMSampler(model, kw.pop("n_steps", 5), kw.pop("discretize", "uniform"), kw.pop("eta", 0.0), **kw)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(n_steps=0), ValueError, "n_steps"),
        (dict(n_steps=2000), ValueError, "exceeds"),
        (dict(n_steps=5.5), TypeError, "n_steps"),
        (dict(eta=-0.5), ValueError, "eta"),
        (dict(eta=float("nan")), ValueError, "eta"),
        (dict(eta=5.0), ValueError, "smaller eta"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(noise_source="numpy"), ValueError, "noise_source"),
        (dict(paint_blend="middle"), ValueError, "paint_blend"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(discretize="cubic"), ValueError, "discretize"),
        (dict(eta=10**400), ValueError, "eta must be finite"),
        (dict(set_alpha_to_one="no"), TypeError, "set_alpha_to_one must be a bool"),
        (dict(clip_sample=True, clip_sample_range=1e39), ValueError, "clip_sample_range"),
        (dict(clip_sample=True, clip_sample_range=10**400), ValueError, "clip_sample_range"),
        (dict(thresholding=True, sample_max_value=1e39), ValueError, "sample_max_value"),
    ],
)
def test_constructor_errors(model, kwargs, err, match):
    with pytest.raises(err, match=match):
        sampler(model, **kwargs)


def test_model_protocol_errors():
    with pytest.raises(ValueError, match="alpha_bar"):
        DDIMSampler(lambda x, t, c: x, 5)
    with pytest.raises(TypeError, match="callable"):
        DDIMSampler(object(), 5, alpha_bar="linear")
    with pytest.raises(ValueError, match="unknown schedule"):
        DDIMSampler(lambda x, t, c: x, 5, alpha_bar="exponential")
    bad = np.linspace(0.99, 0.01, 1000)
    bad[500] = 1.5
    with pytest.raises(ValueError, match=r"alpha_bar\[500\]"):
        DDIMSampler(lambda x, t, c: x, 5, alpha_bar=bad)


def test_a_plain_callable_with_a_named_schedule_samples():
    s = DDIMSampler(lambda x, t, c: torch.tanh(x), 5, alpha_bar="cosine", backend="torch", seed=1)
    out = s.sample((1, 2, 3), None)
    assert out.shape == (1, 2, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(shape=(2, 0, 4)), ValueError, "shape"),
        (dict(shape="2x3"), TypeError, "shape"),
        (dict(x_last=torch.zeros(2, 3, 4, 6)), ValueError, r"x_last has shape \(2, 3, 4, 6\), expected \(2, 3, 4, 5\)"),
        (dict(x_last=torch.zeros(SHAPE, dtype=torch.int64)), TypeError, "x_last has dtype"),
        (dict(skip_steps=5), ValueError, "skip_steps"),
        (dict(skip_steps=-1), ValueError, "skip_steps"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(uncond_scale=7.5), ValueError, "needs uncond_cond"),
        (dict(uncond_scale=7.5, uncond_cond=torch.zeros(3)), ValueError, "batch 2"),
        (dict(sample_offset=-1), ValueError, "sample_offset"),
        (dict(seed=2**63), ValueError, "seed"),
        (dict(temperature=10**400), ValueError, "temperature must be finite"),
        (dict(temperature=1e39), ValueError, "temperature"),
        (dict(uncond_scale=1e300, uncond_cond=torch.zeros(2)), ValueError, "uncond_scale"),
        (dict(repeat_noise="no"), TypeError, "repeat_noise must be a bool"),
        (dict(callback=3), TypeError, "callback must be callable"),
        (dict(shape=(2**33, 1)), ValueError, "a batch of 8589934592 samples exceeds"),
    ],
)
def test_sample_errors_come_before_any_model_call(model, kwargs, err, match):
    shape = kwargs.pop("shape", SHAPE)
    with pytest.raises(err, match=match):
        sampler(model, backend="torch").sample(shape, torch.zeros(2), **kwargs)
    assert model.calls == 0


def test_triton_backend_refuses_float64(model):
    with pytest.raises(TypeError, match="triton backend"):
        sampler(model, backend="triton").sample(SHAPE, torch.zeros(2), x_last=torch.zeros(SHAPE, dtype=torch.float64))
    assert model.calls == 0


def test_model_returning_a_wrong_shape_is_named():
    s = DDIMSampler(lambda x, t, c: x[:, :1], 5, alpha_bar="linear", backend="torch")
    with pytest.raises(ValueError, match=r"model returned eps of shape \(2, 1, 4, 5\), expected \(2, 3, 4, 5\)"):
        s.sample(SHAPE, None)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(t_start=0), ValueError, "t_start"),
        (dict(t_start=6), ValueError, "t_start"),
        (dict(mask=torch.ones(2, 1, 4, 5)), ValueError, "orig and mask together"),
        (dict(orig=torch.zeros(SHAPE)), ValueError, "orig and mask together"),
        (dict(orig=torch.zeros(SHAPE), mask=torch.ones(2, 1, 4, 4)), ValueError,
         r"mask has shape \(2, 1, 4, 4\), which does not broadcast to x's shape \(2, 3, 4, 5\)"),
        (dict(orig=torch.zeros(SHAPE), mask=torch.ones(3, 1, 4, 5)), ValueError, "does not broadcast"),
        (dict(orig=torch.zeros(3, 3, 4, 5), mask=torch.ones(1, 1, 4, 5)), ValueError, "orig has shape"),
        (dict(orig=torch.zeros(SHAPE), mask=torch.ones(1, 1, 4, 5), orig_noise=torch.zeros(2, 3, 5, 4)),
         ValueError, "orig_noise has shape"),
        (dict(orig=torch.zeros(SHAPE), mask=torch.ones(1, 1, 4, 5, device="meta")), ValueError, "mask is on meta"),
        (dict(orig=torch.zeros(SHAPE), mask=torch.ones(1, 1, 4, 5, dtype=torch.int32)), TypeError, "mask has dtype"),
    ],
)
def test_paint_errors_come_before_any_model_call(model, kwargs, err, match):
    t_start = kwargs.pop("t_start", 3)
    with pytest.raises(err, match=match):
        sampler(model, backend="torch").paint(torch.zeros(SHAPE), torch.zeros(2), t_start, **kwargs)
    assert model.calls == 0


def test_step_level_errors(model):
    s = sampler(model, backend="torch")
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="index"):
        s.p_sample(x, torch.zeros(2), torch.zeros(2, dtype=torch.long), 1, 5)
    with pytest.raises(ValueError, match="index"):
        s.q_sample(x, -1)
    with pytest.raises(ValueError, match="noise has shape"):
        s.get_x_prev_and_pred_x0(x, 1, x, noise=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="model returned eps of shape"):
        s.get_x_prev_and_pred_x0(torch.zeros(2, 3, 4, 4), 1, x)
    with pytest.raises(TypeError, match="t must be a \\(B,\\) tensor of time steps"):
        s.p_sample(x, torch.zeros(2), None, 1, 1)
    with pytest.raises(ValueError, match=r"t has shape \(3,\), expected \(2,\)"):
        s.p_sample(x, torch.zeros(2), torch.zeros(3, dtype=torch.long), 1, 1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        s.get_eps("x", torch.zeros(2, dtype=torch.long), torch.zeros(2))
    # Options are checked even where an explicit noise makes them unused.
    with pytest.raises(TypeError, match="seed must be an int"):
        s.q_sample(x, 1, noise=torch.zeros(SHAPE), seed="a")
    with pytest.raises(ValueError, match="sample_offset"):
        s.q_sample(x, 1, noise=torch.zeros(SHAPE), sample_offset=-5)
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        s.sample(SHAPE, torch.zeros(2), cuda_graph="no")
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        s.paint(x, torch.zeros(2), 3, cuda_graph="no")
    with pytest.raises(ValueError, match="shape .* has 100000000000000000000 elements"):
        s.sample((1, 10**5, 10**5, 10**5, 10**5), torch.zeros(1))
    assert model.calls == 0


def test_strided_inputs_are_read_correctly_and_left_untouched(device):
    s = sampler(ToyModel(device=device), backend="triton", eta=0.0)
    base = torch.randn(2, 5, 4, 3, device=device)
    x_last = base.permute(0, 3, 2, 1)  # (2, 3, 4, 5), not contiguous
    before = x_last.clone()
    out = s.sample(SHAPE, torch.zeros(2), x_last=x_last)
    assert torch.equal(x_last, before)
    assert torch.equal(out, s.sample(SHAPE, torch.zeros(2), x_last=x_last.contiguous()))


# Each case builds its tensors on the Triton device `d` (a callable, so nothing is made at import).
LAUNCHER_CASES = {
    "model_out-not-doubled": (lambda d: dict(model_out=torch.zeros(2, 3, 4, 5, device=d)), ValueError,
                              r"model_out has shape \(2, 3, 4, 5\), expected \(4, 3, 4, 5\) \(batch-doubled"),
    "x-strided": (lambda d: dict(x=torch.zeros(5, 3, 4, device=d).transpose(0, 1),
                                 model_out=torch.zeros(3, 5, 4, device=d), guidance=None), ValueError, "contiguous"),
    "x-float64": (lambda d: dict(x=torch.zeros(SHAPE, dtype=torch.float64, device=d), guidance=None,
                                 model_out=torch.zeros(SHAPE, device=d)), TypeError, "x has dtype"),
    "noise-without-seed": (lambda d: dict(noise_coef=0.5, guidance=None, model_out=torch.zeros(SHAPE, device=d)),
                           ValueError, "noise tensor or a seed"),
    "out-shape": (lambda d: dict(out=torch.zeros(2, 3, 4, device=d), guidance=None,
                                 model_out=torch.zeros(SHAPE, device=d)), ValueError, "out has shape"),
    "seed-negative": (lambda d: dict(seed=-3, guidance=None, model_out=torch.zeros(SHAPE, device=d)), ValueError,
                      "seed"),
    "model_out-on-meta": (lambda d: dict(model_out=torch.zeros(SHAPE, device="meta"), guidance=None), ValueError,
                          "model_out is on meta"),
    "x_coef-nan": (lambda d: dict(x_coef=float("nan"), guidance=None, model_out=torch.zeros(SHAPE, device=d)),
                   ValueError, "x_coef must be finite"),
    "eps_coef-beyond-float32": (lambda d: dict(eps_coef=1e39, guidance=None, model_out=torch.zeros(SHAPE, device=d)),
                                ValueError, "eps_coef must be finite and in"),
    "x_coef-huge-int": (lambda d: dict(x_coef=10**400, guidance=None, model_out=torch.zeros(SHAPE, device=d)),
                        ValueError, "x_coef must be finite"),
    "guidance-inf": (lambda d: dict(guidance=float("inf")), ValueError, "guidance must be finite"),
    "repeat_noise-string": (lambda d: dict(repeat_noise="no", guidance=None, model_out=torch.zeros(SHAPE, device=d)),
                            TypeError, "repeat_noise must be a bool"),
    "out-is-model_out": (lambda d: dict(guidance=None, model_out=(m := torch.zeros(SHAPE, device=d)), out=m),
                         ValueError, "out shares memory with model_out"),
    "x0_out-is-x": (lambda d: dict(guidance=None, model_out=torch.zeros(SHAPE, device=d), x0_coefs=(1.0, 0.0),
                                   x0_out="x"), ValueError, "x0_out shares memory with x"),
}


@pytest.mark.parametrize("case", LAUNCHER_CASES.values(), ids=LAUNCHER_CASES.keys())
def test_kernel_launcher_validation(case, device):
    make, err, match = case
    args = dict(x=torch.zeros(SHAPE, device=device), model_out=torch.zeros(4, 3, 4, 5, device=device), guidance=2.0,
                x_coef=1.0, eps_coef=0.5)
    args.update(make(device))
    if args.get("x0_out") == "x":
        args["x0_out"] = args["x"]
    with pytest.raises(err, match=match):
        ddim_step(args.pop("x"), args.pop("model_out"), backend="triton", **args)


def test_triton_backend_on_cpu_without_the_interpreter_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("with CUDA present the CPU-only refusal path is not reachable the same way")
    code = (
        "import torch\n"
        "from ddim_fused import DDIMSampler\n"
        "s = DDIMSampler(lambda x, t, c: x, 4, alpha_bar='linear', backend='triton')\n"
        "try:\n    s.sample((1, 4), None)\nexcept ValueError as e:\n    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR backend='triton' needs CUDA tensors" in out.stdout, out.stderr


@pytest.mark.parametrize("device, match", [
    ("cuda", "needs CUDA"), ("cuda:99", "CUDA"), ("nonsense", "must be a torch device"), (3.5, "must be a torch device"),
])
def test_sample_on_a_device_that_is_not_here_is_a_value_error(model, device, match):
    if torch.cuda.is_available() and device == "cuda":
        pytest.skip("CUDA is present: 'cuda' is a valid device here")
    with pytest.raises(ValueError, match=match):
        sampler(model).sample(SHAPE, None, device=device)
    assert model.calls == 0


def test_q_sample_of_a_0d_tensor_is_a_value_error(model):
    with pytest.raises(ValueError, match="x0 must have a batch dimension"):
        sampler(model).q_sample(torch.tensor(1.0), 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="gpu"), "device must be a torch device"),
    (dict(shape=(2**33, 1)), "a batch of 8589934592 samples exceeds"),
] + ([(dict(device="cuda"), "needs CUDA")] if not torch.cuda.is_available() else []))
def test_initial_noise_names_a_bad_device_or_batch(kwargs, match):
    from ddim_fused import initial_noise

    with pytest.raises(ValueError, match=match):
        initial_noise(kwargs.pop("shape", (1, 3)), 0, **kwargs)


def test_triton_backend_refuses_meta_tensors():
    x = torch.zeros(SHAPE, device="meta")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        ddim_step(x, torch.zeros(SHAPE, device="meta"), backend="triton", x_coef=1.0, eps_coef=0.5)


@pytest.mark.parametrize("value", [2.0, -0.5, float("nan")])
def test_paint_mask_values_outside_0_1_are_refused(model, value):
    mask = torch.ones(1, 1, 4, 5)
    mask[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        sampler(model, backend="torch").paint(torch.zeros(SHAPE), torch.zeros(2), 3, orig=torch.zeros(SHAPE), mask=mask)
    assert model.calls == 0


def test_release_graphs_names_a_wrong_argument():
    from ddim_fused import graph

    with pytest.raises(TypeError, match="sampler must be a DDIMSampler"):
        graph.release_graphs(None)
