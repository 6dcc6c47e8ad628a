"""The fused step as a torch operator: its schema, its implementations, and torch.compile."""

import pytest
import torch

import ddim_fused
from ddim_fused.ops import STEP_FIELDS, op_schema
from ddim_fused.step_args import StepArgs
from ddim_fused.torch_step import torch_ddim_step

OP = torch.ops.ddim_fused.ddim_step


def test_schema_keywords_are_the_step_args_fields():
    schema = OP.default._schema
    keywords = [a.name for a in schema.arguments if a.kwarg_only]
    assert keywords == list(StepArgs._fields)
    assert keywords == list(STEP_FIELDS)
    assert [a.name for a in schema.arguments if not a.kwarg_only] == ["x", "model_out", "out", "x0_out", "eps_out"]
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["out", "x0_out", "eps_out"]
    assert str(schema).endswith("-> ()")
    assert "float? guidance=None" in op_schema() and "int? seed=None" in op_schema()


def _inputs(batch=2, guided=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 4, 5, generator=gen)
    model_out = torch.randn(2 * batch if guided else batch, 3, 4, 5, generator=gen)
    return x, model_out


@pytest.mark.parametrize("case", ["plain", "guided-keyed", "noise-tensor", "paint"])
def test_operator_on_cpu_equals_the_torch_path(case):
    x, model_out = _inputs(guided=case == "guided-keyed")
    fields = dict(x_coef=0.93, eps_coef=-0.21, x0_coefs=(1.1, -0.4))
    mask = None
    if case == "guided-keyed":
        fields.update(guidance=3.5, noise_coef=0.3, seed=2**63 - 5, step_key=7, sample_offset=11)
    elif case == "noise-tensor":
        fields.update(noise_coef=0.3, noise=torch.randn(1, 3, 4, 5))
    elif case == "paint":
        mask = (torch.arange(20).view(1, 1, 4, 5) % 3 == 0).float()
        fields.update(orig=torch.randn(2, 3, 4, 5), orig_coef=0.8, orig_noise_coef=0.6, seed=4, step_key=2)
    out, x0 = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    x_before, m_before = x.clone(), model_out.clone()
    OP(x, model_out, out, x0, None, mask=mask, **fields)
    args = StepArgs(**fields, mask=None if mask is None else ddim_fused.masks.mask_layout(mask, tuple(x.shape)))
    want_out, want_x0 = torch.empty_like(x), torch.empty_like(x)
    torch_ddim_step(x, model_out, want_out, args, want_x0)
    assert torch.equal(out, want_out) and torch.equal(x0, want_x0)
    assert torch.equal(x, x_before) and torch.equal(model_out, m_before)
    # The public wrapper goes through the operator under backend="auto".
    assert torch.equal(ddim_fused.ddim_step(x, model_out, mask=mask, **fields), want_out)


def test_fake_implementation_serves_meta_tensors():
    x = torch.empty(2, 3, 4, 5, device="meta")
    out = torch.empty_like(x)
    assert OP(x, torch.empty_like(x), out, None, None, x_coef=1.0, eps_coef=0.5) is None
    assert out.device.type == "meta" and out.shape == x.shape


def test_wrapper_names_unknown_and_missing_keywords():
    x, model_out = _inputs()
    with pytest.raises(TypeError, match="unexpected keyword argument 'x_coeff'"):
        ddim_fused.ddim_step(x, model_out, x_coeff=1.0, eps_coef=0.5)
    with pytest.raises(TypeError, match="missing required keyword argument 'eps_coef'"):
        ddim_fused.ddim_step(x, model_out, x_coef=1.0)
    with pytest.raises(TypeError, match="step_key must be an int"):
        ddim_fused.ddim_step(x, model_out, x_coef=1.0, eps_coef=0.5, step_key=1.5)


def test_wrapper_takes_any_real_and_integral_scalars_and_rejects_the_rest():
    # Python floats and ints take a fast path; numpy and torch scalars the general one.
    np = pytest.importorskip("numpy")
    x, model_out = _inputs()
    fields = dict(x_coef=0.93, eps_coef=-0.21, noise_coef=0.3, seed=5, step_key=7, sample_offset=2)
    want = ddim_fused.ddim_step(x, model_out, **fields)
    same = dict(x_coef=np.float64(0.93), eps_coef=np.float64(-0.21), noise_coef=torch.tensor(0.3).item(),
                seed=np.int64(5), step_key=np.uint32(7), sample_offset=torch.tensor(2).item())
    assert torch.equal(ddim_fused.ddim_step(x, model_out, **same), want)
    assert torch.equal(ddim_fused.ddim_step(x, model_out, x_coef=1, eps_coef=0),
                       ddim_fused.ddim_step(x, model_out, x_coef=1.0, eps_coef=0.0))
    for name, bad in [("x_coef", True), ("eps_coef", "0.5"), ("seed", 5.0), ("sample_offset", False)]:
        kind = "float" if name.endswith("coef") else "int"
        with pytest.raises(TypeError, match=f"{name} must be an? {kind}"):
            ddim_fused.ddim_step(x, model_out, **dict(fields, **{name: bad}))


def _user_loop(weight):
    """A user's denoising loop: a small conv model and the fused step, eta > 0 with keyed noise."""

    def loop(x):
        for i in range(3):
            eps = torch.nn.functional.conv2d(x, weight, padding=1)
            x = ddim_fused.ddim_step(x, eps, x_coef=0.98 - 0.01 * i, eps_coef=-0.15, noise_coef=0.1, seed=123,
                                     step_key=i)
        return x

    return loop


def test_user_loop_compiles_without_graph_break_and_gives_the_eager_result():
    weight = torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.1
    x, _ = _inputs()
    loop = _user_loop(weight)
    eager = loop(x)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loop)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    # aot_eager runs dynamo, functionalisation of the in-place operator and its fake
    # implementation, without inductor's C++ build (tens of seconds on a shared CPU); the
    # CUDA test below compiles with inductor.
    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the operator's CUDA kernel")
def test_operator_on_cuda_runs_the_kernel_and_compiles():
    weight = torch.randn(3, 3, 3, 3, device="cuda") * 0.1
    x = torch.randn(2, 3, 8, 8, device="cuda")
    loop = _user_loop(weight)
    # Full fp32 convolutions: cuDNN may use TF32 by default, which the CPU comparison would see.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        eager = loop(x)
        torch._dynamo.reset()
        compiled = torch.compile(loop, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    cpu = _user_loop(weight.cpu())(x.cpu())
    torch.testing.assert_close(eager.cpu(), cpu, rtol=1e-4, atol=1e-4)
