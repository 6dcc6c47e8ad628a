"""CUDA-graph capture of a whole sampling loop, model included (`cuda_graph=True`).

With `DDIMSampler.sample(..., cuda_graph=True)` (and `paint`), the first call for a
given key captures the S-step loop into one CUDA graph; later calls with that key copy
their inputs into the capture's static buffers and replay it: one graph launch instead
of S model calls and S step launches from Python.

Key: (sample or paint, shape, dtype, device, skip_steps / t_start, repeat_noise,
temperature, uncond_scale, the shapes and dtypes of x_last / cond / uncond_cond /
orig / mask / orig_noise, whether each is given).

Per call, in static device buffers: the Philox seed and sample offset (0-d int64
tensors), the initial latent (x_last or x; else it is drawn inside the graph from the
seed), cond / uncond_cond, orig, mask, orig_noise. The loop draws its keyed noise
inside the graph from the seed and offset tensors into a buffer each step reads, so
every replay draws the noise of its own seed: on the kernel path with the noise kernel
reading the keys from device memory (the normals the uncaptured step kernel draws), on
the torch path with its torch ops. The step kernel scales those normals as the
uncaptured step scales the ones it draws, so on the kernel path a captured loop gives
the uncaptured loop's bits (and a replay gives the capture's).

Warm-up: before capturing, the loop runs once on a side stream, so Triton compiles,
cuDNN/cuBLAS pick their algorithms and lazy state is created outside the capture.

Memory pool: each sampler's captures share one private pool
(`torch.cuda.graph_pool_handle`); it holds the loop's intermediates (ping-pong buffers,
model activations, noise) until `release_graphs(sampler)` or the sampler is dropped.
Each call returns a fresh clone of the graph's output.

What invalidates a capture (call `release_graphs`): anything the graph baked in at
capture that later changes other than in place: model parameters or buffers replaced
by new tensors (in-place updates such as `load_state_dict` into the same tensors are
seen by replays), a model whose Python control flow depends on values that change, a
changed schedule or coefficients of the sampler, other Python-side model state. The
model must be capturable: no host syncs (`.item()`, printing tensors), no CPU tensors
created per call, no data-dependent shapes.

Not supported with a graph: CPU devices, noise_source="torch", callbacks (ValueError),
conditioning other than a tensor or None (TypeError).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple, Optional

import torch

from .backend import keyed_normal, uses_kernel
from .masks import mask_layout
from .plan import Plan
from .torch_step import torch_ddim_step
from .validation import broadcast_batch, check_sample_offset

_GRAPHS_ATTR = "_cuda_graphs"


def check_graph_call(sampler, device: torch.device, callback) -> None:
    """ValueError unless a call with cuda_graph=True can be captured (before any work)."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
    if sampler.noise_source != "philox":
        raise ValueError("cuda_graph=True needs noise_source='philox' (keyed noise drawn from a seed tensor)")
    if callback is not None:
        raise ValueError("cuda_graph=True cannot call a callback per step: the loop runs as one graph")


def _signature(t) -> object:
    """The part of an input a capture depends on: shape and dtype of a tensor, None for None."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"cuda_graph=True needs conditioning as a tensor or None, got {type(t).__name__}")
    return tuple(t.shape), t.dtype, t.device


class LoopSpec(NamedTuple):
    """What a call contributes to a capture: key, raw inputs, how to copy them, the loop.

    fill(values) -> {name: tensor to copy into the static buffer of that name};
    build(seed_t, offset_t, statics) -> body, the loop on those static tensors.
    """

    key: tuple
    seed: int
    sample_offset: int
    values: dict
    fill: Callable[[dict], dict]
    build: Callable[[torch.Tensor, torch.Tensor, dict], Callable[[], torch.Tensor]]


def run_uncaptured(spec: LoopSpec, device) -> torch.Tensor:
    """The captured loop's body run once, eagerly, on fresh static tensors (any device).

    What a capture computes, without the graph: the reference for tests and benchmarks.
    """
    statics = {name: value.clone(memory_format=torch.contiguous_format)
               for name, value in spec.fill(spec.values).items()}
    seed_t = torch.tensor(spec.seed, dtype=torch.int64, device=device)
    offset_t = torch.tensor(spec.sample_offset, dtype=torch.int64, device=device)
    return spec.build(seed_t, offset_t, statics)()


@dataclass
class CapturedLoop:
    """One captured loop: its graph, its static inputs and its static output."""

    graph: torch.cuda.CUDAGraph
    seed: torch.Tensor  # 0-d int64
    sample_offset: torch.Tensor  # 0-d int64
    inputs: dict  # name -> static tensor the call's value is copied into
    output: torch.Tensor
    fill: Callable[[dict], dict] = field(repr=False, default=None)  # call's raw inputs -> tensors to copy
    # The captured body: it holds every tensor the graph reads or writes by address that was
    # made before the capture (noise buffers, step keys, the model's time steps). Without
    # this reference they would be freed after capture and their memory handed out again.
    body: Optional[Callable[[], torch.Tensor]] = field(repr=False, default=None)

    def replay(self, seed: int, sample_offset: int, values: dict) -> torch.Tensor:
        """Copy the call's keys and inputs in, replay, return a clone of the output."""
        with torch.cuda.device(self.output.device):
            self.seed.fill_(seed)
            self.sample_offset.fill_(sample_offset)
            for name, value in self.fill(values).items():
                self.inputs[name].copy_(value)
            self.graph.replay()
            return self.output.clone()


def release_graphs(sampler) -> None:
    """Drop every capture of `sampler` (and their memory pool); the next call captures again."""
    if not hasattr(sampler, "__dict__") or not hasattr(sampler, "sample"):
        raise TypeError(f"sampler must be a DDIMSampler, got {type(sampler).__name__}")
    sampler.__dict__.pop(_GRAPHS_ATTR, None)


def _store(sampler) -> dict:
    return sampler.__dict__.setdefault(_GRAPHS_ATTR, {"pool": None, "loops": {}})


def run_captured(sampler, spec: LoopSpec, device: torch.device) -> torch.Tensor:
    """The loop's result for this call: replayed, or captured first for a new key."""
    store = _store(sampler)
    loop = store["loops"].get(spec.key)
    if loop is None:
        loop = _capture(store, spec, device)
        store["loops"][spec.key] = loop
    return loop.replay(spec.seed, spec.sample_offset, spec.values)


def _capture(store, spec: LoopSpec, device) -> CapturedLoop:
    # Ordinary tensors even when the first call runs under inference mode: later replays,
    # in or out of it, update them in place.
    # inference_mode(False) turns grad mode on: no_grad keeps the warm-up and capture without autograd.
    with torch.cuda.device(device), torch.inference_mode(False), torch.no_grad():
        seed_t = torch.tensor(spec.seed, dtype=torch.int64, device=device)
        offset_t = torch.tensor(spec.sample_offset, dtype=torch.int64, device=device)
        statics = {name: value.clone(memory_format=torch.contiguous_format)
                   for name, value in spec.fill(spec.values).items()}
        body = spec.build(seed_t, offset_t, statics)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()  # warm-up: compiles and initialises outside the capture
        torch.cuda.current_stream().wait_stream(side)
        if store["pool"] is None:
            store["pool"] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=store["pool"]):
            output = body()
    return CapturedLoop(graph, seed_t, offset_t, statics, output, spec.fill, body)


def graph_loop(plan: Plan, x_static: Optional[torch.Tensor], shape, dtype, seed_t, offset_t, *,
               repeat: bool, noise_buffer: Optional[torch.Tensor], orig_noise_buffer: Optional[torch.Tensor]
               ) -> Callable[[], torch.Tensor]:
    """body() -> x_0: the denoising loop of `plan` on static tensors, capturable.

    Args:
        plan: built with `noise=noise_buffer` (and paint's orig_noise=orig_noise_buffer
            when the call gave none), so its steps read their noise from those buffers.
        x_static: (B, *s) starting latent, or None to draw it from the "initial" stream.
        noise_buffer, orig_noise_buffer: (B, *s) fp32 buffers the body refills per step
            with the keyed draws of that step (None: not needed).
    """
    device = seed_t.device
    # The noise an uncaptured call would draw: on the kernel path the kernel's own keyed
    # noise (the noise kernel reading the keys from seed_t and offset_t), on the torch path
    # its torch ops; the initial latent as `initial_noise` draws it.
    step_backend = "torch" if plan.step_fn is torch_ddim_step else "triton"
    zero_t = torch.zeros((), dtype=torch.int64, device=device)
    # Step keys as device tensors made now (a host-to-device copy cannot be captured),
    # for the torch ops; the kernel takes them as launch arguments.
    keys = {i: torch.tensor(i, dtype=torch.int64, device=device) for i in {0, *(step.index for step in plan.steps)}}
    call_model = plan.guide.call

    def draw(out, key: int, stream, repeat_noise, backend):
        # Repeated noise keys every sample as sample 0: one row, broadcast.
        rows = out[:1] if repeat_noise else out
        key = key if uses_kernel(backend, device, out.dtype) else keys[key]
        keyed_normal(rows.shape, seed_t, key, stream, zero_t if repeat_noise else offset_t, device=device,
                     dtype=out.dtype, backend=backend, out=rows)
        if repeat_noise:
            out[1:].copy_(rows.expand_as(out[1:]))
        return out

    def body() -> torch.Tensor:
        x = x_static
        if x is None:
            x = draw(torch.empty(shape, dtype=dtype, device=device), 0, "initial", False, "auto")
        buffers = (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
        for n, step in enumerate(plan.steps):
            if noise_buffer is not None and step.args.noise_coef != 0.0:
                draw(noise_buffer, step.index, "step", repeat, step_backend)
            if orig_noise_buffer is not None and step.args.orig_noise_coef != 0.0:
                draw(orig_noise_buffer, step.index, "orig", False, step_backend)
            model_out = call_model(x, step.t_batch)
            out = buffers[n & 1]
            if model_out.data_ptr() == out.data_ptr():  # the model returned an earlier step's input
                out = torch.empty_like(x)
            x = step.run(x, model_out, out, None)
        return x

    return body


def _checked_keys(sampler, seed, sample_offset: int, batch: int) -> tuple[int, int]:
    """The call's (seed, sample_offset) as ints, checked as an uncaptured call checks them."""
    check_sample_offset(sample_offset, batch)
    return sampler._call_seed(seed), sample_offset


def _noise_buffer(shape, dtype, device) -> torch.Tensor:
    # In the call's dtype for fp32 / fp64, which the torch path then reads in place
    # (it converts other dtypes once per call, which would hide the refills).
    return torch.empty(shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)


def _cond_values(values: dict, guided: bool) -> dict:
    """The conditioning as the model gets it: [uncond_cond; cond] under guidance."""
    if values["cond"] is None:
        return {}
    return {"cond": torch.cat([values["uncond_cond"], values["cond"]]) if guided else values["cond"]}


def _with_static_cond(plan: Plan, statics: dict) -> Plan:
    if "cond" not in statics:
        return plan
    return replace(plan, guide=plan.guide._replace(cond=statics["cond"]))


def sample_captured(sampler, shape, device, dtype, cond, **options) -> torch.Tensor:
    """`DDIMSampler.sample` with cuda_graph=True: arguments as there, already checked by it."""
    return run_captured(sampler, sample_spec(sampler, shape, device, dtype, cond, **options), device)


def paint_captured(sampler, x, cond, t_start, **options) -> torch.Tensor:
    """`DDIMSampler.paint` with cuda_graph=True: arguments as there, already checked by it."""
    return run_captured(sampler, paint_spec(sampler, x, cond, t_start, **options), x.device)


def sample_spec(sampler, shape, device, dtype, cond, *, repeat_noise, temperature, x_last, uncond_scale,
                uncond_cond, skip_steps, seed, sample_offset) -> LoopSpec:
    """The LoopSpec of a `sample` call (arguments as there, checked by it)."""
    seed, sample_offset = _checked_keys(sampler, seed, sample_offset, shape[0])
    guided = float(uncond_scale) != 1.0
    key = ("sample", tuple(shape), dtype, device, skip_steps, bool(repeat_noise), temperature, float(uncond_scale),
           _signature(x_last), _signature(cond), _signature(uncond_cond))
    values = {"x": x_last, "cond": cond, "uncond_cond": uncond_cond}

    def fill(values):
        return {**({"x": values["x"]} if values["x"] is not None else {}), **_cond_values(values, guided)}

    def build(seed_t, offset_t, statics):
        noise = _noise_buffer(shape, dtype, device)
        plan = sampler._plan(range(sampler.coefs.n_steps - 1 - skip_steps, -1, -1), shape, device, dtype, cond,
                             uncond_scale, uncond_cond, seed=seed, sample_offset=sample_offset,
                             repeat_noise=repeat_noise, temperature=temperature, noise=noise)
        return graph_loop(_with_static_cond(plan, statics), statics.get("x"), shape, dtype, seed_t, offset_t,
                          repeat=bool(repeat_noise), noise_buffer=noise, orig_noise_buffer=None)

    return LoopSpec(key, seed, sample_offset, values, fill, build)


def paint_spec(sampler, x, cond, t_start, *, orig, mask, orig_noise, uncond_scale, uncond_cond, seed,
               sample_offset) -> LoopSpec:
    """The LoopSpec of a `paint` call (arguments as there, checked by it)."""
    shape, device, dtype = tuple(x.shape), x.device, x.dtype
    seed, sample_offset = _checked_keys(sampler, seed, sample_offset, shape[0])
    guided = float(uncond_scale) != 1.0
    key = ("paint", shape, dtype, device, t_start, float(uncond_scale), _signature(cond), _signature(uncond_cond),
           _signature(orig), _signature(mask), _signature(orig_noise))
    values = {"x": x, "cond": cond, "uncond_cond": uncond_cond, "orig": orig, "mask": mask, "orig_noise": orig_noise}

    def fill(values):
        tensors = {"x": values["x"], **_cond_values(values, guided)}
        if values["mask"] is not None:
            tensors["mask"] = mask_layout(values["mask"], shape).mask
            tensors["orig"] = broadcast_batch("orig", values["orig"], values["x"])
            if values["orig_noise"] is not None:
                tensors["orig_noise"] = broadcast_batch("orig_noise", values["orig_noise"], values["x"])
        return tensors

    def build(seed_t, offset_t, statics):
        paint, orig_noise_buffer = None, None
        if "mask" in statics:
            orig_noise_buffer = None if "orig_noise" in statics else _noise_buffer(shape, dtype, device)
            layout = mask_layout(mask, shape)._replace(mask=statics["mask"])
            paint = {"mask": layout, "orig": statics["orig"],
                     "orig_noise": statics.get("orig_noise", orig_noise_buffer)}
        noise = _noise_buffer(shape, dtype, device)  # the step noise of eta > 0
        plan = sampler._plan(range(t_start - 1, -1, -1), shape, device, dtype, cond, uncond_scale, uncond_cond,
                             seed=seed, sample_offset=sample_offset, paint=paint, noise=noise)
        return graph_loop(_with_static_cond(plan, statics), statics["x"], shape, dtype, seed_t, offset_t,
                          repeat=False, noise_buffer=noise, orig_noise_buffer=orig_noise_buffer)

    return LoopSpec(key, seed, sample_offset, values, fill, build)
