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


# ---------------------------------------------------------------- the eager path
def _operator_calls(fn) -> int:
    """How many times fn() calls the operator (its dispatcher event, from the profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "ddim_fused::ddim_step")


@pytest.mark.parametrize("case", ["plain", "guided-keyed", "noise-tensor", "x0-eps-in-place"])
def test_eager_path_gives_the_operators_values_without_dispatch(case):
    x, model_out = _inputs(guided=case == "guided-keyed", seed=3)
    fields = dict(x_coef=0.93, eps_coef=-0.21)
    if case == "guided-keyed":
        fields.update(guidance=3.5, noise_coef=0.3, seed=2**63 - 5, step_key=7, sample_offset=11)
    elif case == "noise-tensor":
        fields.update(noise_coef=0.3, noise=torch.randn(1, 3, 4, 5))
    extra = {}
    if case == "x0-eps-in-place":
        fields["x0_coefs"] = (1.1, -0.4)
        extra = dict(out=x.clone(), x0_out=torch.full_like(x, float("nan")), eps_out=torch.full_like(x, float("nan")))
    want_out, want_x0, want_eps = (torch.full_like(x, float("nan")) for _ in range(3))
    OP(x, model_out, want_out, want_x0 if extra else None, want_eps if extra else None, **fields)
    # The first call of an argument combination: the full validation, then the operator.
    first = ddim_fused.ddim_step(extra.get("out", x), model_out, **fields, **extra)
    assert torch.equal(first, want_out)
    for _ in range(2):
        got = {}
        if case == "x0-eps-in-place":
            target = x.clone()
            got["x0_out"], got["eps_out"] = torch.empty_like(x), torch.empty_like(x)
            calls = _operator_calls(lambda: got.setdefault("out", ddim_fused.ddim_step(target, model_out, out=target,
                                                                                       **fields, **got)))
            assert got["out"] is target
            assert torch.equal(got["x0_out"], want_x0) and torch.equal(got["eps_out"], want_eps)
        else:
            calls = _operator_calls(lambda: got.setdefault("out", ddim_fused.ddim_step(x, model_out, **fields)))
        assert calls == 0, "an eager call went through the dispatcher"
        assert torch.equal(got["out"], want_out)


def test_eager_path_hands_tracing_and_autograd_to_the_operator():
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, model_out = _inputs(seed=4)
    fields = dict(x_coef=0.5, eps_coef=0.25)
    want = ddim_fused.ddim_step(x, model_out, **fields)
    assert _operator_calls(lambda: ddim_fused.ddim_step(x, model_out, **fields)) == 0
    with Seen() as mode:
        got = ddim_fused.ddim_step(x, model_out, **fields)
    assert "ddim_fused.ddim_step.default" in mode.ops and torch.equal(got, want)
    x_grad = x.clone().requires_grad_()
    assert _operator_calls(lambda: ddim_fused.ddim_step(x_grad.detach(), model_out, **fields)) == 0
    with torch.no_grad():
        assert _operator_calls(lambda: ddim_fused.ddim_step(x_grad, model_out, **fields)) == 0
    # Autograd would see this call: the operator (which has no autograd formula) runs it.
    assert _operator_calls(lambda: ddim_fused.ddim_step(x_grad, model_out, **fields)) == 1


def test_eager_path_still_names_bad_values():
    """A remembered argument combination leaves every value check in place (same errors)."""
    x, model_out = _inputs(seed=5)
    fields = dict(x_coef=0.5, eps_coef=0.25, noise_coef=0.1, seed=3, step_key=1)
    out = torch.empty_like(x)
    ddim_fused.ddim_step(x, model_out, out=out, **fields)
    ddim_fused.ddim_step(x, model_out, out=out, **fields)
    bad = [(dict(x_coef=float("nan")), ValueError, "x_coef"), (dict(eps_coef=1e39), ValueError, "eps_coef"),
           (dict(seed=2**63), ValueError, "seed"), (dict(step_key=2**32), ValueError, "step_key"),
           (dict(seed=None), ValueError, "noise_coef != 0 needs"), (dict(repeat_noise=1), TypeError, "repeat_noise"),
           (dict(sample_offset=2**32 - 1), ValueError, "sample_offset"), (dict(x0_coefs=(1.0,)), TypeError, "x0_coefs")]
    for change, error, match in bad:
        with pytest.raises(error, match=match):
            ddim_fused.ddim_step(x, model_out, out=out, **dict(fields, **change))
    with pytest.raises(ValueError, match="out shares memory with model_out"):
        ddim_fused.ddim_step(x, model_out, out=model_out, **fields)
    strided = torch.empty(x.shape[::-1]).permute(3, 2, 1, 0)
    with pytest.raises(ValueError, match="out must be contiguous"):
        ddim_fused.ddim_step(x, model_out, out=strided, **fields)


def test_eager_path_does_not_reach_the_dispatcher_statically():
    """The eager branch of the wrapper returns before the operator call, and what it runs
    names neither torch.ops nor torch.library."""
    import ast  # noqa: PLC0415
    import inspect  # noqa: PLC0415
    import textwrap  # noqa: PLC0415

    from ddim_fused import ops  # noqa: PLC0415

    source = inspect.getsource(ops.ddim_step)
    eager = source.index("done = plan(")
    assert eager < source.index("torch.ops.ddim_fused.ddim_step(")
    assert "return done" in source[eager:source.index("check_backend(backend)")]
    for fn in (ops._EagerPlan.__call__, ops._EagerPlan._disjoint, ops._eager_key, ops.tracing):
        names = {ast.unparse(node) for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn))))
                 if isinstance(node, ast.Attribute)}
        assert not any(n.startswith(("torch.ops", "torch.library")) for n in names), fn.__name__
    x, model_out = _inputs(seed=6)
    ddim_fused.ddim_step(x, model_out, x_coef=1.0, eps_coef=0.5)
    plan = ops._EAGER[ops._eager_key(x, model_out, None, None, None, dict(x_coef=1.0, eps_coef=0.5))]
    assert plan.run is ops.step_function("auto", x.device, x.dtype)
