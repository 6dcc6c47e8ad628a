"""The lean per-step paths: bound steps compute what the unbound step functions compute.

- torch path: `torch_step_runner` against `torch_ddim_step`, bit for bit, in every mode
  it binds (and the ones it hands back to torch_ddim_step);
- kernel path: `bind_ddim_step` against `launch_ddim_step`, bit for bit, through the
  interpreter (the direct-runner dispatch is checked with a stand-in compiled kernel);
- the sampler's ping-pong buffers never alias what it returns.
"""
import ast
import inspect
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddim_fused import DDIMSampler, native
from ddim_fused.backend import kernels
from ddim_fused.masks import mask_layout
from ddim_fused.step_args import StepArgs
from ddim_fused.torch_step import torch_ddim_step, torch_step_runner

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (2, 3, 5, 7)
COEFS = dict(x_coef=1.37, eps_coef=-0.41, x0_coefs=(2.1, -1.3))


@pytest.fixture(params=["c-kernel", "torch-ops"])
def cpu_path(request, monkeypatch):
    """Both ways the torch backend runs a float32 CPU step: the C kernel, and torch ops without it."""
    if request.param == "c-kernel":
        if native.library() is None:
            pytest.skip("no C compiler: the CPU kernels cannot be built here")
    else:
        monkeypatch.setenv(native.DISABLE_ENV, "0")
    return request.param


def randn(shape, dtype=torch.float32, seed=0, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device, dtype)


def step_variants(dtype, device="cpu"):
    """StepArgs of every mode a plan builds: guidance, noise given / drawn / none, paint."""
    noise = randn(SHAPE, dtype, 5, device)
    one_noise = randn((1,) + SHAPE[1:], dtype, 6, device)
    mask = (randn((SHAPE[0], 1) + SHAPE[2:], seed=7, device=device) > 0).to(dtype)
    orig = randn(SHAPE, dtype, 8, device)
    for guidance, noise_case, paint in itertools.product((None, 3.5), ("none", "tensor", "one", "keyed"),
                                                         (False, True)):
        fields = dict(COEFS, guidance=guidance, step_key=3, seed=11, sample_offset=4)
        if noise_case != "none":
            fields["noise_coef"] = 0.23
        if noise_case in ("tensor", "one"):
            fields["noise"] = noise if noise_case == "tensor" else one_noise
        if paint:
            fields.update(mask=mask_layout(mask, SHAPE), orig=orig, orig_coef=0.8, orig_noise_coef=0.6)
        yield f"g{guidance}-{noise_case}-{'paint' if paint else 'plain'}", StepArgs(**fields)


def inputs(dtype, guided, device="cpu"):
    x = randn(SHAPE, dtype, 1, device)
    model_out = randn(((2 if guided else 1) * SHAPE[0],) + SHAPE[1:], dtype, 2, device)
    return x, model_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("want_x0", [False, True], ids=["no-x0", "x0"])
def test_torch_runner_is_bit_identical(dtype, want_x0, cpu_path):
    for name, step in step_variants(dtype):
        x, model_out = inputs(dtype, step.guidance is not None)
        x_before, model_before = x.clone(), model_out.clone()
        expected, expected_x0 = torch.empty_like(x), torch.empty_like(x) if want_x0 else None
        torch_ddim_step(x, model_out, expected, step, expected_x0)
        got, got_x0 = torch.empty_like(x), torch.empty_like(x) if want_x0 else None
        returned = torch_step_runner(step, dtype, "cpu")(x, model_out, got, got_x0)
        assert returned is got, name
        assert torch.equal(got, expected), name
        if want_x0:
            assert torch.equal(got_x0, expected_x0), name
        assert torch.equal(x, x_before) and torch.equal(model_out, model_before), name


def test_torch_runner_falls_back_for_another_model_dtype():
    step = StepArgs(**COEFS)
    x, model_out = inputs(torch.float32, False)
    expected = torch_ddim_step(x, model_out.double(), torch.empty_like(x), step)
    got = torch_step_runner(step, torch.float32, "cpu")(x, model_out.double(), torch.empty_like(x))
    assert torch.equal(got, expected)


def run_bound(dtype, step, x, model_out, want_x0):
    """The bound step run twice (on a GPU the second launch goes through the direct runner)."""
    call = kernels().bind_ddim_step(torch.empty(SHAPE, dtype=dtype, device="meta"))
    run = call.step(step)
    results = []
    for _ in range(2):
        out, x0 = torch.empty_like(x), torch.empty_like(x) if want_x0 else None
        assert run(x, model_out, out, x0) is out
        results.append((out, x0))
    (first, first_x0), (second, second_x0) = results
    assert torch.equal(first, second) and (not want_x0 or torch.equal(first_x0, second_x0))
    return second, second_x0


@pytest.mark.parametrize("want_x0", [False, True], ids=["no-x0", "x0"])
def test_bound_kernel_step_is_bit_identical(want_x0, device):
    for name, step in step_variants(torch.float32, device):
        x, model_out = inputs(torch.float32, step.guidance is not None, device)
        expected, expected_x0 = torch.empty_like(x), torch.empty_like(x) if want_x0 else None
        kernels().launch_ddim_step(x, model_out, expected, step, expected_x0)
        got, got_x0 = run_bound(torch.float32, step, x, model_out, want_x0)
        assert torch.equal(got, expected), name
        if want_x0:
            assert torch.equal(got_x0, expected_x0), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [SHAPE, (1, 3, 7, 11)], ids=["B2-3x5x7", "B1-3x7x11-tail"])
def test_bound_step_stores_x_prev_in_both_halves_in_one_launch(dtype, shape, device):
    """out_twice: out is the first half of a (2B, *s) buffer; both halves get launch_ddim_step's x_prev."""
    batch = shape[0]
    for name, step in step_variants(dtype, device):
        if step.mask is not None or step.noise is not None:
            continue  # those variants' tensors are shaped for SHAPE
        x = randn(shape, dtype, 1, device)
        model_out = randn(((2 if step.guidance is not None else 1) * batch,) + shape[1:], dtype, 2, device)
        expected = kernels().launch_ddim_step(x, model_out, torch.empty_like(x), step)
        run = kernels().bind_ddim_step(torch.empty(shape, dtype=dtype, device="meta")).step(step)
        for _ in range(2):  # the second round: the direct runner on a GPU
            pair = torch.full((2 * batch,) + shape[1:], float("nan"), dtype=dtype, device=device)
            assert run(x, model_out, pair[:batch], None, True).data_ptr() == pair.data_ptr()
            assert torch.equal(pair[:batch], expected) and torch.equal(pair[batch:], expected), name
        single = torch.full((2 * batch,) + shape[1:], float("nan"), dtype=dtype, device=device)
        run(x, model_out, single[:batch])
        assert torch.equal(single[:batch], expected) and single[batch:].isnan().all(), name


def test_direct_runner_keyed_by_out_twice(monkeypatch):
    """A launch storing twice is another kernel variant: it never reuses the single store's runner."""
    bound_step, ordinary, direct = stand_in_kernel(monkeypatch)
    x, model_out = inputs(torch.float32, False)
    run = bound_step.bind_ddim_step(torch.empty(SHAPE, device="meta")).step(StepArgs(**COEFS))
    pair = torch.empty((2 * SHAPE[0],) + SHAPE[1:])
    for twice in (False, True, False, True):
        run(x, model_out, pair[:SHAPE[0]], None, twice)
    assert [launch[1][bound_step._OUT_TWICE] for launch in ordinary] == [False, True]
    assert [args[bound_step._OUT_TWICE] for _, args in direct] == [False, True]


def test_bound_steps_of_one_call_share_layout_but_not_coefficients(device):
    call = kernels().bind_ddim_step(torch.empty(SHAPE, device="meta"))
    x, model_out = inputs(torch.float32, False, device)
    first = StepArgs(**COEFS, noise_coef=0.2, seed=3, step_key=5)
    second = StepArgs(x_coef=0.5, eps_coef=0.25, x0_coefs=(1.0, 2.0), noise_coef=0.1, seed=3, step_key=4)
    runs = [call.step(s) for s in (first, second)]
    for _ in range(2):  # the second round: direct launches on a GPU
        for step, run in zip((first, second), runs):
            expected = kernels().launch_ddim_step(x, model_out, torch.empty_like(x), step)
            assert torch.equal(run(x, model_out, torch.empty_like(x)), expected)


def test_bound_steps_read_their_own_noise_tensors(device):
    call = kernels().bind_ddim_step(torch.empty(SHAPE, device="meta"))
    x, model_out = inputs(torch.float32, False, device)
    steps = [StepArgs(**COEFS, noise_coef=0.3, noise=randn(SHAPE, seed=20 + k, device=device), step_key=k)
             for k in range(2)]
    runs = [call.step(s) for s in steps]
    for _ in range(2):  # the second round: direct launches on a GPU
        for step, run in zip(steps, runs):
            expected = kernels().launch_ddim_step(x, model_out, torch.empty_like(x), step)
            assert torch.equal(run(x, model_out, torch.empty_like(x)), expected)


class _StandInCompiled:
    """Plays a Triton CompiledKernel: records the launches of `run` (what the direct runner
    calls) and of its Triton runner `compiled[grid]` (used while a launch hook is set)."""

    function, packed_metadata, stream = object(), object(), 1234

    def __init__(self, launches, runner_launches=None):
        self.launches, self.runner_launches = launches, runner_launches

    def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args):
        assert (stream, function, metadata) == (self.stream, self.function, self.packed_metadata)
        assert launch_metadata is None and enter_hook is None and exit_hook is None
        self.launches.append(((g0, g1, g2), args))

    def __getitem__(self, grid):
        def runner(*args):  # as Triton's CompiledKernel runner: three grid dimensions, always
            self.runner_launches.append(((grid[0], grid[1], grid[2]), args))
        return runner


def stand_in_kernel(monkeypatch, runner_launches=None):
    """(bound_step module, ordinary launches, direct launches) with direct launches on and a
    stand-in for the jit kernel: ordinary launches record (grid, args, options) and return a
    _StandInCompiled that records (grid, args) of direct ones."""
    bound_step = kernels().bound_step
    ordinary, direct = [], []
    # Device 3's current stream is the stand-in's.
    monkeypatch.setattr(bound_step, "_cuda_current",
                        lambda: (lambda: 3, lambda device: _StandInCompiled.stream if device == 3 else None))

    class StandInKernel:
        arg_names = bound_step._ARG_NAMES

        def __getitem__(self, grid):
            def launch(*args, **options):
                ordinary.append((grid, args, options))
                return _StandInCompiled(direct, runner_launches)
            return launch

    monkeypatch.setattr(bound_step, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(bound_step, "_ddim_step_kernel", StandInKernel())
    return bound_step, ordinary, direct


def test_direct_runner_reused_per_dtype_and_alignment(monkeypatch):
    """After the first ordinary launch, launches go to the compiled kernel's runner with the same arguments."""
    bound_step, ordinary, direct = stand_in_kernel(monkeypatch)
    x, model_out = inputs(torch.float32, False)
    run = bound_step.bind_ddim_step(torch.empty(SHAPE, device="meta")).step(StepArgs(**COEFS))
    out = torch.empty_like(x)
    for _ in range(3):
        run(x, model_out, out)
    assert len(ordinary) == 1 and len(direct) == 2
    assert all(args == addresses(ordinary[0][1]) and grid == ordinary[0][0] + (1, 1) for grid, args in direct)
    assert ordinary[0][1][bound_step._X] is x and ordinary[0][1][bound_step._OUT] is out
    # A misaligned view is a different specialisation: one more ordinary launch.
    storage = torch.empty(x.numel() + 1)
    shifted = storage[1:].view(SHAPE)
    run(x, model_out, shifted)
    assert len(ordinary) == 2 and len(direct) == 2


def addresses(args) -> tuple:
    """A launch's arguments as the direct runner passes them: tensors as their addresses."""
    return tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)


def test_a_launch_hook_sends_direct_launches_through_tritons_launch(monkeypatch):
    """A profiler's hooks want Triton's launch metadata: while one is set, the ordinary launch runs."""
    knobs = pytest.importorskip("triton").knobs
    through_runner = []
    bound_step, ordinary, direct = stand_in_kernel(monkeypatch, through_runner)
    x, model_out = inputs(torch.float32, False)
    run = bound_step.bind_ddim_step(torch.empty(SHAPE, device="meta")).step(StepArgs(**COEFS))
    out = torch.empty_like(x)
    run(x, model_out, out)
    run(x, model_out, out)
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        run(x, model_out, out)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    run(x, model_out, out)
    assert len(ordinary) == 2 and len(direct) == 2 and not through_runner
    assert ordinary[1][1] == ordinary[0][1] and direct[0][1] == addresses(ordinary[0][1])
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", hook)  # a hook assigned, not added
    run(x, model_out, out)
    assert len(direct) == 2 and len(ordinary) == 3


def _source(fn) -> str:
    return " ".join(inspect.getsource(fn).split())


def test_the_direct_runner_mirrors_tritons_runner():
    """The installed Triton's runner makes the call `direct_runner` makes (a GPU runs it; this
    reads it): compiled.run with three grid dimensions, the stream, function, packed metadata,
    launch metadata and both hook chains, and the stream is torch's current raw stream."""
    triton = pytest.importorskip("triton")
    from triton.backends.driver import GPUDriver  # noqa: PLC0415
    from triton.compiler.compiler import CompiledKernel  # noqa: PLC0415

    runner = _source(CompiledKernel.__getitem__)
    assert ("self.run(grid[0], grid[1], grid[2], stream, self.function, self.packed_metadata, launch_metadata, "
            "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args)") in runner, runner
    assert "device = driver.active.get_current_device() stream = driver.active.get_current_stream(device)" in runner
    driver = _source(GPUDriver.__init__)
    assert "self.get_current_stream = _cuda_getCurrentRawStream" in driver
    assert "self.get_current_device = torch.cuda.current_device" in driver
    assert "return torch._C._cuda_getDevice()" in _source(torch.cuda.current_device)  # after its lazy init
    assert isinstance(triton.knobs.runtime.launch_enter_hook, triton.knobs.HookChain)


def test_compiled_kernels_read_one_global():
    """Every ordinary launch compares each global constant a kernel reads with its value at
    compile time (about 1 us per tl.constexpr); the kernels, compiled as a GPU would (no
    interpreter, in a subprocess), read only INTERPRETED."""
    script = ("import ddim_fused.kernels.ddim_step as s, ddim_fused.kernels.noise as n\n"
              "for k in (s._ddim_step_kernel, n._keyed_normal_kernel):\n"
              "    k.cache_key\n"
              "    print(sorted({name for name, _ in k.used_global_vals}))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for line in run.stdout.splitlines():
        assert set(ast.literal_eval(line)) <= {"INTERPRETED"}, line
    assert len(run.stdout.splitlines()) == 2


class _Recorder:
    """eps-model returning a tensor of its own; remembers every x it was called with."""

    alpha_bar = torch.linspace(0.999, 0.01, 50, dtype=torch.float64)

    def __init__(self):
        self.inputs = []

    def __call__(self, x, t, cond):
        self.inputs.append(x)
        return 0.1 * x + 0.01 * t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


@pytest.mark.parametrize("n_steps", [1, 2, 5])
def test_ping_pong_buffers_never_alias_the_result(n_steps):
    model = _Recorder()
    sampler = DDIMSampler(model, n_steps, ddim_eta=0.5, backend="torch")
    x_last = randn(SHAPE, seed=3)
    before = x_last.clone()
    first = sampler.sample(SHAPE, None, x_last=x_last, seed=1)
    kept = first.clone()
    second = sampler.sample(SHAPE, None, x_last=x_last, seed=2)
    assert torch.equal(x_last, before)
    assert torch.equal(first, kept), "a later call wrote into an earlier result"
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    assert first.untyped_storage().data_ptr() != x_last.untyped_storage().data_ptr()
    # The model's inputs after the first are the loop's buffers; the result is not the
    # one the last step read (which the caller never gets).
    if n_steps > 1:
        assert second.untyped_storage().data_ptr() != model.inputs[-1].untyped_storage().data_ptr()


def test_model_returning_an_earlier_input_gets_a_fresh_output():
    """A model handing back the buffer the step is about to write must not alias x_prev with eps."""

    class EchoesEarlierInput(_Recorder):
        def __call__(self, x, t, cond):
            self.inputs.append(x)
            return self.inputs[-2] if len(self.inputs) > 1 else x.clone()

    x_last = randn(SHAPE, seed=3)
    results = []
    for callback in (None, lambda info: None):
        model = EchoesEarlierInput()
        sampler = DDIMSampler(model, 6, backend="torch")
        results.append(sampler.sample(SHAPE, None, x_last=x_last, callback=callback))
    assert torch.equal(results[0], results[1])


def test_results_are_ordinary_tensors_the_caller_may_update_in_place():
    """The loop runs under inference mode; what it returns must not be an inference tensor."""

    class EchoesEarlierInput(_Recorder):
        def __call__(self, x, t, cond):
            self.inputs.append(x)
            return self.inputs[-2] if len(self.inputs) > 1 else x.clone()

    for model in (_Recorder(), EchoesEarlierInput()):  # the second takes the fresh-output path
        sampler = DDIMSampler(model, 4, ddim_eta=0.5, backend="torch")
        x = sampler.sample(SHAPE, None, seed=1)
        assert not x.is_inference()
        before = x.clone()
        x.add_(1.0)  # raises for an inference tensor outside inference mode
        assert torch.equal(x, before + 1.0)
    with torch.inference_mode():  # a caller already in inference mode gets no extra copy
        assert sampler.sample(SHAPE, None, seed=1).is_inference()


# ---------------------------------------------------------------- steps reused across calls
class _Linear:
    """eps-model whose output depends on x, t and the conditioning (so every input matters)."""

    alpha_bar = torch.linspace(0.999, 0.01, 50, dtype=torch.float64)

    def __call__(self, x, t, cond):
        shift = 0.0 if cond is None else cond.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return 0.3 * x - 0.002 * t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) + shift


def _fresh(**options):
    return DDIMSampler(_Linear(), 6, ddim_eta=options.pop("eta", 1.0), backend="torch", **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_reused_steps_draw_each_calls_noise(dtype, guided, cpu_path):
    """A later call with the same key runs the kept steps, with its own seed's noise: the bits of a fresh sampler."""
    cond, uncond = torch.tensor([0.5, -0.25]), torch.zeros(2)
    kw = dict(uncond_scale=2.5, uncond_cond=uncond) if guided else {}
    sampler = _fresh()
    sampler.sample(SHAPE, cond, seed=1, dtype=dtype, **kw)
    (kept,) = sampler._reused.values()
    for seed, offset in ((2, 0), (3, 5)):
        got = sampler.sample(SHAPE, cond, seed=seed, sample_offset=offset, dtype=dtype, temperature=0.8, **kw)
        want = _fresh().sample(SHAPE, cond, seed=seed, sample_offset=offset, dtype=dtype, temperature=0.8, **kw)
        assert torch.equal(got, want), (seed, offset)
    again = sampler.sample(SHAPE, cond, seed=2, dtype=dtype, **kw)
    assert torch.equal(again, _fresh().sample(SHAPE, cond, seed=2, dtype=dtype, **kw))
    assert any(table is kept for table in sampler._reused.values()), "the first call's steps were not reused"


def test_predrawn_noise_equals_each_steps_own_draw(monkeypatch, cpu_path):
    from ddim_fused import plan as plan_module

    cond = torch.tensor([0.5, -0.25])
    for dtype in (torch.float32, torch.float64):
        predrawn = _fresh().sample(SHAPE, cond, seed=4, temperature=0.7, dtype=dtype)
        with monkeypatch.context() as patch:
            patch.setattr(plan_module, "_PREDRAW_LIMIT", 0)  # every step draws its own noise
            sampler = _fresh()
            drawn = sampler.sample(SHAPE, cond, seed=4, temperature=0.7, dtype=dtype)
            assert not sampler._reused, "steps that draw from the call's seed must not be reused"
        assert torch.equal(predrawn, drawn), dtype


def test_a_call_from_a_callback_leaves_the_outer_call_alone():
    sampler, cond = _fresh(), torch.tensor([0.5, -0.25])
    want = _fresh().sample(SHAPE, cond, seed=8)
    inner = []
    got = sampler.sample(SHAPE, cond, seed=8, callback=lambda info: inner.append(sampler.sample(SHAPE, cond, seed=9)))
    assert torch.equal(got, want)
    inner_want = _fresh().sample(SHAPE, cond, seed=9)
    assert len(inner) == len(sampler.time_steps) and all(torch.equal(x, inner_want) for x in inner)


def test_paint_and_explicit_noise_are_never_reused():
    sampler, cond = _fresh(), torch.tensor([0.5, -0.25])
    x = randn(SHAPE, seed=1)
    sampler.paint(x, cond, 4, orig=randn(SHAPE, seed=2), mask=torch.ones(SHAPE))
    sampler.p_sample(x, cond, torch.full((2,), 10), 10, 3, noise=randn(SHAPE, seed=3))
    assert not sampler._reused


def test_guided_torch_path_does_not_depend_on_the_batch(cpu_path):
    """Guided steps, C kernel or torch ops: each sample's bits stay its own whatever the batch."""
    sampler = _fresh(seed=7)
    cond, uncond = torch.linspace(-1, 1, 4), torch.zeros(4)
    kw = dict(uncond_scale=3.0)
    whole = sampler.sample((4, 3, 5, 6), cond, uncond_cond=uncond, **kw)
    halves = [sampler.sample((2, 3, 5, 6), cond[i:i + 2], uncond_cond=uncond[i:i + 2], sample_offset=i, **kw)
              for i in (0, 2)]
    single = sampler.sample((1, 3, 5, 6), cond[3:], uncond_cond=uncond[3:], sample_offset=3, **kw)
    assert torch.equal(torch.cat(halves), whole)
    assert torch.equal(single[0], whole[3])


@pytest.mark.parametrize("guidance", [None, 2.0])
def test_out_may_be_the_noise_it_reads(guidance, cpu_path):
    """torch_ddim_step writes x_prev over its (pre-scaled) noise, as the diffusers scheduler asks."""
    x, model_out = inputs(torch.float32, guidance is not None)
    noise = randn(SHAPE, seed=9)
    step = StepArgs(**COEFS, guidance=guidance, noise_coef=1.0, noise=noise.clone())
    expected = torch_ddim_step(x, model_out, torch.empty_like(x), step)
    assert torch.equal(torch_ddim_step(x, model_out, step.noise, step), expected)
    assert not torch.equal(expected, noise)


def test_a_float32_cpu_step_is_one_c_kernel_call(cpu_lib, monkeypatch):
    calls = []
    real = cpu_lib.ddim_update_f32
    monkeypatch.setattr(cpu_lib, "ddim_update_f32", lambda *args: calls.append(args) or real(*args))
    for guidance in (1.0, 2.0):
        calls.clear()
        sampler = _fresh()
        un = torch.zeros(2) if guidance != 1.0 else None
        sampler.sample(SHAPE, torch.tensor([0.5, -0.25]), seed=3, uncond_scale=guidance, uncond_cond=un)
        assert len(calls) == len(sampler.time_steps), guidance


def test_a_copied_or_pickled_sampler_keeps_no_steps_of_the_original():
    import copy
    import pickle

    sampler, cond = _fresh(), torch.tensor([0.5, -0.25])
    want = sampler.sample(SHAPE, cond, seed=2)
    for clone in (copy.deepcopy(sampler), pickle.loads(pickle.dumps(sampler))):
        assert not clone._reused and sampler._reused
        assert torch.equal(clone.sample(SHAPE, cond, seed=2), want)


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_reused_kernel_steps_are_rekeyed_to_each_call(device, guided):
    """The kernel path's steps draw their own noise: a reused call rebinds them to its seed and offset."""
    cond = torch.tensor([0.5, -0.25], device=device)
    kw = dict(uncond_scale=2.5, uncond_cond=torch.zeros(2, device=device)) if guided else {}

    def fresh():
        return DDIMSampler(_Linear(), 3, ddim_eta=1.0, backend="triton")

    sampler = fresh()
    sampler.sample(SHAPE, cond, seed=1, device=device, **kw)
    (kept,) = sampler._reused.values()
    assert kept.launches is not None
    # Seeds and offsets of other integer types than the first call's (Triton types them by range).
    for seed, offset in ((2**40 + 3, 0), (7, 2**31 + 5), (2**63 - 1, 2**32 - 2)):
        got = sampler.sample(SHAPE, cond, seed=seed, sample_offset=offset, device=device, **kw)
        want = fresh().sample(SHAPE, cond, seed=seed, sample_offset=offset, device=device, **kw)
        assert torch.equal(got, want), (seed, offset)
    assert any(table is kept for table in sampler._reused.values()), "the first call's steps were not reused"


def test_rekey_checks_the_keys_and_keeps_a_runner_per_integer_type(monkeypatch):
    bound_step, ordinary, direct = stand_in_kernel(monkeypatch)
    x, model_out = inputs(torch.float32, False)
    call = bound_step.bind_ddim_step(torch.empty(SHAPE, device="meta"))
    run = call.step(StepArgs(**COEFS, noise_coef=0.3, seed=5, step_key=2, sample_offset=1))
    out = torch.empty_like(x)
    seed_slot, offset_slot = bound_step._SEED, bound_step._OFFSET
    run(x, model_out, out)
    run(x, model_out, out)
    call.rekey(9, 3)  # still i32 keys: the same compiled kernel, launched directly
    run(x, model_out, out)
    assert len(ordinary) == 1 and [a[seed_slot] for _, a in direct] == [5, 9]
    assert direct[-1][1][offset_slot] == 3
    call.rekey(2**40, 3)  # an i64 seed: another compiled variant, so first an ordinary launch
    run(x, model_out, out)
    run(x, model_out, out)
    assert len(ordinary) == 2 and ordinary[-1][1][seed_slot] == 2**40 and direct[-1][1][seed_slot] == 2**40
    with pytest.raises(ValueError, match="sample_offset"):
        call.rekey(1, 2**32 - 1)  # the batch's last sample index would pass 2**32 - 1
    with pytest.raises(ValueError, match="seed"):
        call.rekey(2**63, 0)


def test_key_integer_types_are_tritons():
    """The direct runners are kept per integer type of the keys: the types Triton's binder gives them."""
    mangle_type = getattr(pytest.importorskip("triton.runtime.jit"), "mangle_type", None)
    if mangle_type is None:
        pytest.skip("this Triton has no triton.runtime.jit.mangle_type to compare with")
    for value in (0, 1, 5, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**63):
        assert kernels().bound_step._int_type(value) == mangle_type(value), value


def test_steps_kept_under_inference_mode_are_reused_outside_it_and_back():
    sampler, cond = _fresh(), torch.tensor([0.5, -0.25])
    with torch.inference_mode():
        first = sampler.sample(SHAPE, cond, seed=1)
    second = sampler.sample(SHAPE, cond, seed=2)
    with torch.inference_mode():
        third = sampler.sample(SHAPE, cond, seed=3)
    for seed, got in ((1, first), (2, second), (3, third)):
        assert torch.equal(got, _fresh().sample(SHAPE, cond, seed=seed)), seed


def test_a_p_sample_loop_is_sample_bit_for_bit(cpu_path):
    """labml's loop of p_sample calls and sample() take the same step path (C kernel or torch ops)."""
    sampler, cond = _fresh(), torch.tensor([0.5, -0.25])
    x_last = randn(SHAPE, seed=4)
    want = sampler.sample(SHAPE, cond, x_last=x_last, seed=3)
    x = x_last
    for index in range(len(sampler.time_steps) - 1, -1, -1):
        t = torch.full((SHAPE[0],), int(sampler.time_steps[index]), dtype=torch.long)
        x, _, _ = sampler.p_sample(x, cond, t, int(t[0]), index, seed=3)
    assert torch.equal(x, want)


def test_torch_noise_steps_are_reused_on_the_kernel_path(device):
    """torch.randn steps draw per run, not from a seed: reused calls must not try to rekey them."""
    sampler = DDIMSampler(_Linear(), 3, ddim_eta=1.0, backend="triton", noise_source="torch")
    cond = torch.tensor([0.5, -0.25], device=device)
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        got = sampler.sample(SHAPE, cond, device=device)
        torch.manual_seed(seed)
        want = DDIMSampler(_Linear(), 3, ddim_eta=1.0, backend="triton", noise_source="torch").sample(
            SHAPE, cond, device=device)
        assert torch.equal(got, want), seed
    assert sampler._reused, "the steps were not kept"


def test_a_changed_limit_is_honoured_by_the_next_call():
    sampler, cond = _fresh(clip_sample=True, clip_sample_range=0.1), torch.tensor([0.5, -0.25])
    sampler.sample(SHAPE, cond, seed=2)
    sampler.limit = None
    assert torch.equal(sampler.sample(SHAPE, cond, seed=2), _fresh().sample(SHAPE, cond, seed=2))


class _Trainable(torch.nn.Module):
    """An eps-model with parameters that records whether grad mode was on when it ran."""

    alpha_bar = torch.linspace(0.999, 0.01, 50, dtype=torch.float64)

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))
        self.grad_modes = []

    def forward(self, x, t, cond):
        self.grad_modes.append(torch.is_grad_enabled())
        return self.scale.to(x.dtype) * x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("with_callback", [False, True], ids=["no-callback", "callback"])
def test_the_model_runs_without_grad(dtype, with_callback):
    model = _Trainable()
    sampler = DDIMSampler(model, 3, ddim_eta=1.0, backend="torch")
    callback = (lambda info: None) if with_callback else None
    x = sampler.sample(SHAPE, None, seed=1, dtype=dtype, callback=callback)
    assert not x.requires_grad and model.grad_modes and not any(model.grad_modes)


def test_a_sampler_pickled_before_steps_were_kept_still_loads():
    import pickle

    sampler, cond = _fresh(), torch.tensor([0.5, -0.25])
    state = dict(sampler.__dict__)
    del state["_reused"]
    old = DDIMSampler.__new__(DDIMSampler)
    old.__setstate__(pickle.loads(pickle.dumps(state)))
    assert torch.equal(old.sample(SHAPE, cond, seed=2), sampler.sample(SHAPE, cond, seed=2))


# ---------------------------------------------------------------- launch_step: one layout per key
def fresh_layouts(monkeypatch):
    """bound_step with an empty layout cache for the test (restored after it)."""
    bound_step = kernels().bound_step
    monkeypatch.setattr(bound_step, "_LAUNCHERS", {})
    return bound_step


def all_layouts(bound_step) -> list:
    return [layout for launcher in bound_step._LAUNCHERS.values() for layout in launcher.layouts.values()]


@pytest.mark.parametrize("outputs", ["out", "x0", "x0-eps"])
def test_launch_step_is_bit_identical_to_launch_ddim_step(outputs, device, monkeypatch):
    bound_step = fresh_layouts(monkeypatch)
    for name, step in step_variants(torch.float32, device):
        x, model_out = inputs(torch.float32, step.guidance is not None, device)
        for _ in range(2):  # the second launch reuses the layout (a direct launch on a GPU)
            want = [torch.full_like(x, float("nan")) for _ in range(3)]
            got = [torch.full_like(x, float("nan")) for _ in range(3)]
            extra = {"out": (), "x0": (1,), "x0-eps": (1, 2)}[outputs]
            kernels().launch_ddim_step(x, model_out, want[0], step, *(want[i] for i in extra))
            assert bound_step.launch_step(x, model_out, got[0], step, *(got[i] for i in extra)) is got[0]
            for i in (0,) + extra:
                assert torch.equal(got[i], want[i]), (name, i)
    # Every variant has its own layout (paint included), and none keeps a tensor.
    assert len(all_layouts(bound_step)) == 16
    for layout in all_layouts(bound_step):
        assert all(layout.values[slot] is None for slot in bound_step._POINTERS)


def test_launch_step_binds_per_shape_dtype_and_flags_and_never_reuses_a_stale_layout(device, monkeypatch):
    """Interleaved launches that differ in one thing each: every one equals its ordinary launch."""
    bound_step = fresh_layouts(monkeypatch)
    cases = []
    for shape in ((2, 3, 5, 7), (3, 3, 5, 7), (2, 3, 5, 8)):
        for dtype in (torch.float32, torch.float16):
            for fields in (dict(COEFS), dict(COEFS, guidance=2.5), dict(COEFS, noise_coef=0.3, seed=9, step_key=4),
                           dict(COEFS, noise_coef=0.3, seed=2**40, step_key=4)):
                cases.append((shape, dtype, StepArgs(**fields)))
    for _ in range(2):
        for k, (shape, dtype, step) in enumerate(cases):
            gen = torch.Generator().manual_seed(k)
            x = torch.randn(shape, generator=gen).to(device, dtype)
            model_out = torch.randn(((2 if step.guidance else 1) * shape[0],) + shape[1:], generator=gen).to(device,
                                                                                                             dtype)
            want = kernels().launch_ddim_step(x, model_out, torch.empty_like(x), step)
            got = bound_step.launch_step(x, model_out, torch.empty_like(x), step)
            assert torch.equal(got, want), (shape, dtype, step)
    # A seed past 2**31 is an i64 argument: its own layout, as each shape, dtype and flag.
    assert len(all_layouts(bound_step)) == len(cases)


def test_launch_step_checks_noise_keys_as_launch_ddim_step(device):
    x, model_out = inputs(torch.float32, False, device)
    for bad, error in ((dict(seed=2**63), ValueError), (dict(seed=1, step_key=-1), ValueError),
                       (dict(seed=1.5), TypeError), (dict(seed=1, sample_offset=2**32 - 1), ValueError)):
        step = StepArgs(**COEFS, noise_coef=0.3, **bad)
        with pytest.raises(error):
            kernels().bound_step.launch_step(x, model_out, torch.empty_like(x), step)


def test_launch_step_launches_directly_with_addresses_once_bound(monkeypatch):
    bound_step, ordinary, direct = stand_in_kernel(monkeypatch)
    monkeypatch.setattr(bound_step, "_LAUNCHERS", {})
    shape = (2, 3, 4, 4)  # the conditional half of model_out starts 16-byte aligned
    x, model_out = randn(shape, seed=1), randn((4,) + shape[1:], seed=2)
    step = StepArgs(**COEFS, guidance=1.5)
    out, x0 = torch.empty_like(x), torch.empty_like(x)
    for _ in range(3):
        bound_step.launch_step(x, model_out, out, step, x0)
    assert len(ordinary) == 1 and len(direct) == 2
    first = ordinary[0][1]
    assert first[bound_step._EPS_C].data_ptr() == model_out[2:].data_ptr()
    assert all(args == addresses(first) and grid == ordinary[0][0] + (1, 1) for grid, args in direct)
    # Other coefficients: the same layout, the new values in their slots.
    bound_step.launch_step(x, model_out, out, step._replace(x_coef=0.5, guidance=2.0), x0)
    args = direct[-1][1]
    assert len(ordinary) == 1 and args[bound_step._SLOT["x_coef"]] == 0.5 and args[bound_step._GUIDANCE] == 2.0
    # A misaligned output is another specialisation: the ordinary launch, every time.
    shifted = torch.empty(x.numel() + 1)[1:].view(shape)
    bound_step.launch_step(x, model_out, shifted, step, x0)
    bound_step.launch_step(x, model_out, shifted, step, x0)
    assert len(ordinary) == 3 and len(direct) == 3


# ---------------------------------------------------------------- guidance without a per-step cat
class _GuidedRecorder(_Recorder):
    """Records each model input; its output depends on both halves differently (so a wrong half shows)."""

    def __call__(self, x, t, cond):
        self.inputs.append(x.clone())
        return 0.1 * x + 0.01 * cond.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) + 0.001 * t.view(
            -1, *([1] * (x.dim() - 1))).to(x.dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["eta0", "eta1"])
def test_guided_loop_without_cat_equals_the_loop_with_it(backend, eta, backend_device):
    """The doubled-buffer loop (no callback) against the loop that cats [x; x] every step (a callback)."""
    cond, uncond = torch.tensor([0.5, -0.25], device=backend_device), torch.zeros(2, device=backend_device)
    x_last = randn(SHAPE, seed=3, device=backend_device)
    results, models = [], []
    for callback in (None, lambda info: None):
        model = _GuidedRecorder()
        sampler = DDIMSampler(model, 5, ddim_eta=eta, backend=backend)
        results.append(sampler.sample(SHAPE, cond, x_last=x_last, seed=4, uncond_scale=2.5, uncond_cond=uncond,
                                      callback=callback))
        models.append(model)
    assert torch.equal(results[0], results[1])
    assert not results[0].is_inference() and results[0]._base is None
    for doubled, catted in zip(*(m.inputs for m in models)):
        assert torch.equal(doubled, catted)
        assert torch.equal(doubled[:2], doubled[2:])


@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["eta0", "eta1"])
def test_guided_kernel_loop_is_one_launch_per_step(eta, monkeypatch):
    """On the kernel path every guided step but the last stores both halves itself: one launch, no copy."""
    bound_step = kernels().bound_step
    kernel, flags = bound_step._ddim_step_kernel, []

    class Counting:
        arg_names = kernel.arg_names

        def __getitem__(self, grid):
            def launch(*args, **options):
                flags.append(args[bound_step._OUT_TWICE])
                return kernel[grid](*args, **options)
            return launch

    monkeypatch.setattr(bound_step, "_ddim_step_kernel", Counting())
    copies = []
    copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, *a, **k: copies.append(self.shape) or copy(self, *a, **k))
    cond, uncond = torch.tensor([0.5, -0.25]), torch.zeros(2)
    sampler = DDIMSampler(_GuidedRecorder(), 5, ddim_eta=eta, backend="triton")
    sampler.sample(SHAPE, cond, x_last=randn(SHAPE, seed=3), seed=4, uncond_scale=2.5, uncond_cond=uncond)
    assert flags == [True] * 4 + [False]
    assert torch.Size(SHAPE) not in copies  # no half copied into the other


def test_guided_loop_with_a_model_returning_its_input_or_an_earlier_one():
    cond, uncond = torch.tensor([0.5, -0.25]), torch.zeros(2)

    class ReturnsInput(_Recorder):
        def __call__(self, x, t, cond):
            self.inputs.append(x)
            return x

    class EchoesEarlierInput(_Recorder):
        def __call__(self, x, t, cond):
            self.inputs.append(x)
            return self.inputs[-2] if len(self.inputs) > 1 else x.clone()  # the buffer this step writes

    for model_type in (ReturnsInput, EchoesEarlierInput):
        results = []
        for callback in (None, lambda info: None):
            sampler = DDIMSampler(model_type(), 6, backend="torch")
            results.append(sampler.sample(SHAPE, cond, x_last=randn(SHAPE, seed=3), uncond_scale=1.5,
                                          uncond_cond=uncond, callback=callback))
        assert torch.equal(results[0], results[1]), model_type.__name__


# ---------------------------------------------------------------- the C launch under Triton 3.6
def test_direct_runner_calls_the_c_launch_of_a_launcher_without_scratch(monkeypatch):
    bound_step = kernels().bound_step
    calls = []

    class CudaLauncher:  # Triton's class name: the runner checks it
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid, launch_pdl = False, True

        def launch(self, *args):
            calls.append(args)

        def __call__(self, *args):
            raise AssertionError("the C launch is called directly")

    class Compiled:
        function, packed_metadata, run = object(), object(), CudaLauncher()

        def __getitem__(self, grid):
            return lambda *args: None

    monkeypatch.setattr(bound_step, "C_LAUNCH", True)
    monkeypatch.setattr(bound_step, "_cuda_current", lambda: (lambda: 2, lambda device: 77 if device == 2 else None))
    compiled = Compiled()
    assert bound_step.direct_runner(compiled, (5,))(1, "a", None) is True
    assert calls == [(5, 1, 1, 77, compiled.function, False, True, None, None, compiled.packed_metadata, None, None,
                      None, 1, "a", None)]
    compiled.run.global_scratch_size = 64  # a kernel with scratch: through the launcher, which allocates it
    monkeypatch.setattr(CudaLauncher, "__call__", lambda self, *args: calls.append(("launcher",) + args))
    assert bound_step.direct_runner(compiled, (5,))(1) is True
    assert calls[-1][:2] == ("launcher", 5)


def test_the_c_launch_is_used_only_where_tritons_launcher_makes_that_call():
    """On Triton 3.6 (a GPU run reads its source) CudaLauncher.__call__ allocates scratch and
    calls its C launch with the layout the direct runner uses; elsewhere C_LAUNCH is off."""
    pytest.importorskip("triton")
    bound_step = kernels().bound_step
    if not bound_step.C_LAUNCH:
        low, high = bound_step.C_LAUNCH_VERSIONS
        version = bound_step._version(bound_step.triton.__version__)
        assert not bound_step.DIRECT_LAUNCH or not low <= version <= high
        return
    from triton.backends.nvidia.driver import CudaLauncher  # noqa: PLC0415

    source = _source(CudaLauncher.__call__)
    assert ("self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl, "
            "global_scratch, profile_scratch, *args)") in source, source
    assert "def __call__(self, gridX, gridY, gridZ, stream, function, *args):" in source


def test_eager_op_on_the_kernel_path_launches_what_launch_ddim_step_launches(device, monkeypatch):
    """ddim_fused.ddim_step's eager path with the kernel: a StepLauncher bound to the call's signature."""
    import ddim_fused  # noqa: PLC0415
    from ddim_fused import ops  # noqa: PLC0415

    if device.type == "cpu":  # "auto" picks the kernel for CUDA tensors; through the interpreter here
        monkeypatch.setattr(ops, "step_function", lambda backend, dev, dtype: kernels().launch_step)
    monkeypatch.setattr(ops, "_EAGER", {})
    x, model_out = inputs(torch.float32, True, device)
    fields = dict(x_coef=1.37, eps_coef=-0.41, guidance=2.5, noise_coef=0.2, seed=9, x0_coefs=(2.1, -1.3))
    for step_key in range(3):  # the first call validates and goes through the operator; the rest are eager
        out, x0 = torch.empty_like(x), torch.empty_like(x)
        ddim_fused.ddim_step(x, model_out, out=out, x0_out=x0, step_key=step_key, **fields)
        want, want_x0 = torch.empty_like(x), torch.empty_like(x)
        kernels().launch_ddim_step(x, model_out, want, StepArgs(**fields, step_key=step_key), want_x0)
        assert torch.equal(out, want) and torch.equal(x0, want_x0), step_key
    (plan,) = ops._EAGER.values()
    assert isinstance(plan.run, kernels().bound_step.StepLauncher)


def test_launch_step_under_torch_compile_is_the_traceable_launch(monkeypatch):
    bound_step = fresh_layouts(monkeypatch)
    calls = []
    monkeypatch.setattr(bound_step, "launch_ddim_step", lambda *args: calls.append(args) or args[2])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, model_out = inputs(torch.float32, False)
    out = torch.empty_like(x)
    assert bound_step.launch_step(x, model_out, out, StepArgs(**COEFS)) is out
    assert len(calls) == 1 and not bound_step._LAUNCHERS


def test_launch_step_binds_each_paint_layout_on_its_own(device, monkeypatch):
    """Masks of every layout and dtype, orig of batch 1 or B, orig noise drawn, given or off."""
    bound_step = fresh_layouts(monkeypatch)
    x, model_out = inputs(torch.float32, False, device)
    masks = {"run": randn((SHAPE[0], 1) + SHAPE[2:], seed=7, device=device) > 0,
             "dense": randn(SHAPE, seed=8, device=device).sigmoid(),
             "shared": randn((1, 1) + SHAPE[2:], seed=9, device=device).sigmoid(),
             "channels": randn(SHAPE[:2] + (1, 1), seed=10, device=device) > 0}
    origs = {"B": randn(SHAPE, seed=11, device=device), "1": randn((1,) + SHAPE[1:], seed=12, device=device)}
    cases = []
    for (mname, mask), (oname, orig), orig_noise in itertools.product(masks.items(), origs.items(),
                                                                      ("drawn", "tensor", "off")):
        fields = dict(COEFS, seed=5, step_key=2, orig=orig, orig_coef=0.8,
                      mask=mask_layout(mask.to(torch.float32) if mask.dtype != torch.bool else mask, SHAPE))
        if orig_noise != "off":
            fields["orig_noise_coef"] = 0.6
        if orig_noise == "tensor":
            fields["orig_noise"] = randn(SHAPE, seed=13, device=device)
        cases.append((f"{mname}-{oname}-{orig_noise}", StepArgs(**fields)))
    for _ in range(2):
        for name, step in cases:
            want = kernels().launch_ddim_step(x, model_out, torch.empty_like(x), step)
            got = bound_step.launch_step(x, model_out, torch.empty_like(x), step)
            assert torch.equal(got, want), name
    assert len(all_layouts(bound_step)) == len(cases)


def test_launch_step_passes_paint_tensors_as_addresses_once_bound(monkeypatch):
    bound_step, ordinary, direct = stand_in_kernel(monkeypatch)
    monkeypatch.setattr(bound_step, "_LAUNCHERS", {})
    shape = (2, 3, 4, 4)
    x, model_out, orig = randn(shape, seed=1), randn(shape, seed=2), randn(shape, seed=3)
    mask = randn((2, 1, 4, 4), seed=4) > 0
    step = StepArgs(**COEFS, orig=orig, orig_coef=0.8, orig_noise_coef=0.6, seed=5, mask=mask_layout(mask, shape))
    out = torch.empty_like(x)
    for _ in range(3):
        bound_step.launch_step(x, model_out, out, step)
    assert len(ordinary) == 1 and len(direct) == 2
    first = ordinary[0][1]
    assert first[bound_step._ORIG] is orig and first[bound_step._MASK].data_ptr() == mask.data_ptr()
    assert all(args == addresses(first) for _, args in direct)
