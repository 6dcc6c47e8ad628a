"""The CUDA-graph loop option: refusals, and the capturable loop against the ordinary one.

The loop a graph captures (`ddim_fused.graph`) runs eagerly on CPU too: with the torch
backend it must give the ordinary loop's bits, and refilling its static seed and inputs
(what a replay does) must give the ordinary loop's result for the new seed.
"""
import pytest
import torch

from ddim_fused import DDIMSampler, graph

SHAPE = (2, 3, 4, 5)
CUDA = torch.cuda.is_available()


class TinyModel:
    """eps-model of a few elementwise ops; conditioning shifts it per sample."""

    alpha_bar = torch.linspace(0.9999, 0.02, 100, dtype=torch.float64)

    def __call__(self, x, t, cond):
        eps = 0.3 * x + 1e-3 * t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        if cond is not None:
            eps = eps + cond.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return eps


def randn(shape, seed, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def sample_options(**overrides):
    options = dict(repeat_noise=False, temperature=1.0, x_last=None, uncond_scale=1.0, uncond_cond=None,
                   skip_steps=0, seed=7, sample_offset=3)
    options.update(overrides)
    return options


def replayed(spec, next_spec, device):
    """The body built for `spec`, rerun after refilling what a replay refills from `next_spec`."""
    statics = {name: value.clone() for name, value in spec.fill(spec.values).items()}
    seed_t = torch.tensor(spec.seed, device=device)
    offset_t = torch.tensor(spec.sample_offset, device=device)
    body = spec.build(seed_t, offset_t, statics)
    body()
    seed_t.fill_(next_spec.seed)
    offset_t.fill_(next_spec.sample_offset)
    for name, value in next_spec.fill(next_spec.values).items():
        statics[name].copy_(value)
    return body().clone()


SAMPLE_CASES = {
    "eta0": ({}, dict()),
    "eta1-temp": ({"ddim_eta": 1.0}, dict(temperature=0.7)),
    "repeat": ({"ddim_eta": 0.5}, dict(repeat_noise=True)),
    "x_last-skip": ({"ddim_eta": 0.5}, dict(x_last=randn(SHAPE, 1), skip_steps=2)),
    "guided": ({"ddim_eta": 0.5}, dict(uncond_scale=3.0, uncond_cond=torch.zeros(SHAPE[0]))),
}


@pytest.mark.parametrize("case", SAMPLE_CASES.values(), ids=SAMPLE_CASES.keys())
def test_capturable_sample_loop_gives_the_ordinary_bits(case):
    ctor, options = case
    sampler = DDIMSampler(TinyModel(), 6, backend="torch", **ctor)
    cond = torch.tensor([0.1, -0.2])
    options = sample_options(**options)
    spec = graph.sample_spec(sampler, SHAPE, torch.device("cpu"), torch.float32, cond, **options)
    expected = sampler.sample(SHAPE, cond, **options)
    assert torch.equal(graph.run_uncaptured(spec, "cpu"), expected)
    # A replay: new seed, offset, conditioning (and latent) in the same static buffers.
    options2 = dict(options, seed=12345, sample_offset=0)
    if options["x_last"] is not None:
        options2["x_last"] = randn(SHAPE, 2)
    cond2 = torch.tensor([0.4, 0.3])
    spec2 = graph.sample_spec(sampler, SHAPE, torch.device("cpu"), torch.float32, cond2, **options2)
    assert spec2.key == spec.key
    assert torch.equal(replayed(spec, spec2, "cpu"), sampler.sample(SHAPE, cond2, **options2))


@pytest.mark.parametrize("fixed_orig_noise", [False, True], ids=["drawn-orig-noise", "fixed-orig-noise"])
def test_capturable_paint_loop_gives_the_ordinary_bits(fixed_orig_noise):
    sampler = DDIMSampler(TinyModel(), 6, ddim_eta=0.8, backend="torch")
    x, orig = randn(SHAPE, 3), randn(SHAPE, 4)
    mask = (randn((SHAPE[0], 1) + SHAPE[2:], 5) > 0).float()
    calls = []
    for seed, offset, salt in ((5, 0, 0), (99, 4, 10)):
        calls.append(dict(x=randn(SHAPE, 3 + salt), orig=randn(SHAPE, 4 + salt),
                          mask=(randn((SHAPE[0], 1) + SHAPE[2:], 5 + salt) > 0).float(),
                          orig_noise=randn(SHAPE, 6 + salt) if fixed_orig_noise else None, seed=seed,
                          sample_offset=offset))
    specs, expected = [], []
    for call in calls:
        call = dict(call)
        x = call.pop("x")
        specs.append(graph.paint_spec(sampler, x, None, 5, uncond_scale=1.0, uncond_cond=None, **call))
        expected.append(sampler.paint(x, None, 5, **call))
    assert torch.equal(graph.run_uncaptured(specs[0], "cpu"), expected[0])
    assert specs[1].key == specs[0].key
    assert torch.equal(replayed(specs[0], specs[1], "cpu"), expected[1])
    assert not torch.equal(expected[0], expected[1])
    del x, orig, mask


@pytest.mark.parametrize("repeat_noise", [False, True], ids=["per-sample", "repeated"])
def test_capturable_loop_on_the_kernel_path_matches_the_ordinary_loop(device, repeat_noise):
    """The kernel (interpreter on a CPU) reads the noise the loop refills into its buffer each step.

    The ordinary loop draws that noise inside its step kernel and scales it there as the
    captured loop's step scales the loaded buffer: the same bits. (A difference of one
    rounding per step grows to ~1e-3 through a model whose convolutions round their
    inputs to TF32, as cuDNN's do by default on GPUs: see docs/testing.md.)
    """
    sampler = DDIMSampler(TinyModel(), 4, ddim_eta=1.0, backend="triton")
    cond = torch.tensor([0.1, -0.2], device=device)
    options = sample_options(repeat_noise=repeat_noise)
    spec = graph.sample_spec(sampler, SHAPE, device, torch.float32, cond, **options)
    assert torch.equal(graph.run_uncaptured(spec, device), sampler.sample(SHAPE, cond, device=device, **options))
    options2 = dict(options, seed=4242)
    spec2 = graph.sample_spec(sampler, SHAPE, device, torch.float32, cond, **options2)
    assert torch.equal(replayed(spec, spec2, device), sampler.sample(SHAPE, cond, device=device, **options2))


def test_capturable_paint_loop_on_the_kernel_path_matches_the_ordinary_loop(device):
    """Paint's drawn orig noise comes from its own keyed stream, in the loop as in the kernel."""
    sampler = DDIMSampler(TinyModel(), 6, ddim_eta=0.8, backend="triton")
    mask = (randn((SHAPE[0], 1) + SHAPE[2:], 5, device) > 0).float()
    specs, expected = [], []
    for seed, offset in ((5, 0), (99, 4)):
        call = dict(orig=randn(SHAPE, 4, device), mask=mask, orig_noise=None, seed=seed, sample_offset=offset)
        x = randn(SHAPE, 3, device)
        specs.append(graph.paint_spec(sampler, x, None, 5, uncond_scale=1.0, uncond_cond=None, **call))
        expected.append(sampler.paint(x, None, 5, **call))
    assert torch.equal(graph.run_uncaptured(specs[0], device), expected[0])
    assert torch.equal(replayed(specs[0], specs[1], device), expected[1])


def test_capturable_loop_does_not_modify_its_inputs():
    sampler = DDIMSampler(TinyModel(), 4, ddim_eta=1.0, backend="torch")
    x_last, cond = randn(SHAPE, 1), torch.tensor([0.5, 0.5])
    before = (x_last.clone(), cond.clone())
    spec = graph.sample_spec(sampler, SHAPE, torch.device("cpu"), torch.float32, cond, **sample_options(x_last=x_last))
    graph.run_uncaptured(spec, "cpu")
    assert torch.equal(x_last, before[0]) and torch.equal(cond, before[1])


def test_cuda_graph_on_cpu_is_refused():
    sampler = DDIMSampler(TinyModel(), 4, backend="torch")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        sampler.sample(SHAPE, None, seed=1, device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        sampler.paint(randn(SHAPE, 1), None, 3, cuda_graph=True)


def test_conditioning_other_than_tensors_is_refused_for_a_capture():
    sampler = DDIMSampler(TinyModel(), 4, backend="torch")
    with pytest.raises(TypeError, match="conditioning as a tensor or None"):
        graph.sample_spec(sampler, SHAPE, torch.device("cpu"), torch.float32, {"text": "a"}, **sample_options())


@pytest.mark.skipif(not CUDA, reason="captures a CUDA graph: needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", "torch"])  # noise by the kernel, or by torch ops with tensor keys
def test_captured_loop_equals_the_uncaptured_one_for_two_seeds(backend):
    device = torch.device("cuda")
    sampler = DDIMSampler(TinyModel(), 8, ddim_eta=0.6, backend=backend)
    cond = torch.tensor([0.1, -0.2], device=device)
    for seed in (3, 1234567):
        options = sample_options(seed=seed)
        captured = sampler.sample(SHAPE, cond, device=device, cuda_graph=True, **options)
        spec = graph.sample_spec(sampler, SHAPE, device, torch.float32, cond, **options)
        # The same loop without the graph: bit for bit.
        assert torch.equal(captured, graph.run_uncaptured(spec, device))
        # The ordinary loop draws the same normals inside its step and scales them as the
        # captured step scales its buffer: the same bits.
        ordinary = sampler.sample(SHAPE, cond, device=device, **options)
        assert torch.equal(captured, ordinary)
    assert len(sampler._cuda_graphs["loops"]) == 1  # the second seed replayed the first capture
    graph.release_graphs(sampler)
    assert not hasattr(sampler, "_cuda_graphs")


def test_a_capture_keeps_alive_what_the_graph_reads_by_address(monkeypatch):
    """The noise buffer, the step keys and the model's time steps are made before the capture;
    the graph holds their addresses, so the captured loop must keep them (CPU stand-ins for
    the CUDA calls: same Python object flow, no capture)."""
    import contextlib  # noqa: PLC0415
    import gc  # noqa: PLC0415
    import types  # noqa: PLC0415
    import weakref  # noqa: PLC0415

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    for name, value in {"device": lambda d: contextlib.nullcontext(), "Stream": lambda: stream,
                        "current_stream": lambda: stream, "stream": lambda s: contextlib.nullcontext(),
                        "graph_pool_handle": object, "CUDAGraph": lambda: types.SimpleNamespace(replay=lambda: None),
                        "graph": lambda g, pool=None: contextlib.nullcontext()}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    made = []
    real_loop = graph.graph_loop

    def spying_loop(plan, *args, **kwargs):
        made.extend([kwargs["noise_buffer"], plan.steps[0].t_batch])
        return real_loop(plan, *args, **kwargs)

    monkeypatch.setattr(graph, "graph_loop", spying_loop)
    sampler = DDIMSampler(TinyModel(), 4, ddim_eta=1.0, backend="torch")
    spec = graph.sample_spec(sampler, SHAPE, torch.device("cpu"), torch.float32, None, **sample_options())
    loop = graph._capture({"pool": None, "loops": {}}, spec, torch.device("cpu"))
    refs = [weakref.ref(t) for t in made]
    made.clear()
    gc.collect()
    assert all(r() is not None for r in refs), "a tensor the graph reads was freed after capture"
    del loop
    gc.collect()
    assert all(r() is None for r in refs)  # and nothing else holds them: the loop is what keeps them
