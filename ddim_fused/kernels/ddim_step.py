"""The fused DDIM step: one launch reads x and the model output and writes x_prev.

The update it computes is the step contract of `ddim_fused.step_args` (coefficients from
the host, float64 rounded once to fp32 here); noise is read from a tensor or drawn
in-kernel (see noise.py). Inputs are validated by the caller (`ddim_fused.ops.ddim_step`
or a sampler): contiguous tensors on one device, in fp32, fp16 or bf16. The grid covers
all B * N elements at once (see geometry.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cast import cast_for_store
from .geometry import BLOCK, BLOCK_NO_NOISE, TAIL, Launch, div_magic, geometry, sample_coords, udiv
from .noise import FAST_MATH, block_normals, check_keys, split_counters

# Modes are string constexprs (see geometry.py):
# - NOISE_MODE / ORIG_NOISE_MODE, the noise source: "none", "tensor" or "philox" (drawn
#   in the kernel, noise.py);
# - MASK_MODE, the paint mask layout: "none"; "full", one value per element of the batch
#   (offset e); "sample", one sample's values shared by the batch (offset n); "run", a
#   sample shape whose broadcast dims form one run:
#   offset b * mask_bstride + (n // (mid * inner)) * inner + n % inner.
# In-kernel noise draws stream 0 (x's noise) and 1 (orig's), the "step" and "orig" ids of
# ddim_fused.philox.NOISE_STREAMS (the kernels import nothing else from the host package).


@triton.jit
def _chunk_coords(first, SIZE: tl.constexpr, CHUNK: tl.constexpr, numel, n_magic, n_shift, COORDS: tl.constexpr):
    """(b, n) of the first element of each CHUNK-element chunk of a block, (SIZE // CHUNK,) each."""
    return sample_coords(first, CHUNK * tl.arange(0, SIZE // CHUNK), numel, n_magic, n_shift, COORDS)


@triton.jit
def _gather(ptr, chunk_offs, first, end, SIZE: tl.constexpr, CHUNK: tl.constexpr, SPREAD: tl.constexpr):
    """(SIZE,) block: element j of chunk c reads ptr[chunk_offs[c] + j] (SPREAD) or ptr[chunk_offs[c]].

    With SPREAD the chunk offsets are multiples of CHUNK, so each chunk is one aligned
    vector access; the index arithmetic runs once per chunk, not per element.
    """
    chunk_first = first + CHUNK * tl.arange(0, SIZE // CHUNK)
    if SPREAD:
        lane = tl.arange(0, CHUNK)[None, :]
        offs = tl.multiple_of(chunk_offs, CHUNK)[:, None] + lane
        values = tl.load(ptr + offs, mask=chunk_first[:, None] + lane < end)
    else:
        # One load per chunk, its value repeated in registers. The tail's end may cut
        # a chunk, but a chunk's offset is valid wherever its first element is.
        one = tl.load(ptr + chunk_offs, mask=chunk_first < end)
        values = tl.broadcast_to(one[:, None], [SIZE // CHUNK, CHUNK])
    return tl.reshape(values, [SIZE])


@triton.jit
def _load_f32(ptr, offs, live, first, end, numel, n_magic, n_shift, BCAST: tl.constexpr, SIZE: tl.constexpr,
              CHUNK: tl.constexpr, COORDS: tl.constexpr):
    """(SIZE,) fp32 block of a (B, *s) tensor at offs, or (BCAST) of a (1, *s) one shared by the batch."""
    if BCAST:
        _, n = _chunk_coords(first, SIZE, CHUNK, numel, n_magic, n_shift, COORDS)
        block = _gather(ptr, n, first, end, SIZE, CHUNK, True)
    else:
        block = tl.load(ptr + offs, mask=live)
    return block.to(tl.float32)


@triton.jit
def _step_block(
    x_ptr, eps_ptr, eps_c_ptr, out_ptr, noise_ptr, x0_ptr, eps_out_ptr, orig_ptr, orig_noise_ptr, mask_ptr,
    first, end, total, numel, n_magic, n_shift, g_magic, g_shift,
    x_coef, eps_coef, noise_coef, x0_x_coef, x0_eps_coef, guidance, orig_coef, orig_noise_coef,
    seed, step_key, sample_offset,
    mask_bstride, mask_mid, p_magic, p_shift, mask_inner, i_magic, i_shift,
    SIZE: tl.constexpr, OUT_TWICE: tl.constexpr, HAS_CFG: tl.constexpr, NOISE_MODE: tl.constexpr,
    NOISE_BCAST: tl.constexpr,
    REPEAT_NOISE: tl.constexpr, STORE_X0: tl.constexpr, STORE_EPS: tl.constexpr,
    MASK_MODE: tl.constexpr, ORIG_BCAST: tl.constexpr, ORIG_NOISE_MODE: tl.constexpr, ORIG_NOISE_BCAST: tl.constexpr,
    GROUPED: tl.constexpr, COORDS: tl.constexpr, FAST_MATH: tl.constexpr, SPLIT_COUNTERS: tl.constexpr,
    CHUNK: tl.constexpr, MASK_CHUNK: tl.constexpr, MASK_SPREAD: tl.constexpr, MASK_BATCHED: tl.constexpr,
):
    """The step for the flattened elements first .. first + SIZE that are below `end`.

    Batch-broadcast inputs and paint masks are gathered per chunk of CHUNK (MASK_CHUNK)
    elements that lie in one sample and, for masks, in one run of the mask layout. With
    OUT_TWICE, x_prev is stored at out and again `total` elements past it (the second half
    of a batch-doubled (2B, *s) buffer whose first half is out).
    """
    offs = first + tl.arange(0, SIZE)
    live = offs < end

    b_x = tl.load(x_ptr + offs, mask=live).to(tl.float32)
    if HAS_CFG:
        b_eps_u = tl.load(eps_ptr + offs, mask=live).to(tl.float32)
        b_eps_c = tl.load(eps_c_ptr + offs, mask=live).to(tl.float32)
        b_eps = b_eps_u + guidance * (b_eps_c - b_eps_u)
    else:
        b_eps = tl.load(eps_ptr + offs, mask=live).to(tl.float32)

    b_out = x_coef * b_x + eps_coef * b_eps
    if NOISE_MODE == "tensor":
        b_out += noise_coef * _load_f32(noise_ptr, offs, live, first, end, numel, n_magic, n_shift, NOISE_BCAST,
                                        SIZE, CHUNK, COORDS)
    elif NOISE_MODE == "philox":
        # Scaled here, as a loaded noise tensor is: the normals are the bits the noise
        # kernel stores, so a loop that draws them into a buffer first (a CUDA graph's,
        # ddim_fused.graph) gets this step's result bit for bit.
        b_out += noise_coef * block_normals(seed, sample_offset, step_key, 0, first, numel, n_magic, n_shift,
                                            g_magic, g_shift, SIZE, REPEAT_NOISE, GROUPED, COORDS, FAST_MATH,
                                            SPLIT_COUNTERS)

    if STORE_X0:
        b_x0 = x0_x_coef * b_x + x0_eps_coef * b_eps
        tl.store(x0_ptr + offs, cast_for_store(b_x0, x0_ptr), mask=live)
    if STORE_EPS:
        tl.store(eps_out_ptr + offs, cast_for_store(b_eps, eps_out_ptr), mask=live)

    if MASK_MODE != "none":
        b_orig_t = orig_coef * _load_f32(orig_ptr, offs, live, first, end, numel, n_magic, n_shift, ORIG_BCAST,
                                         SIZE, CHUNK, COORDS)
        if ORIG_NOISE_MODE == "tensor":
            b_orig_t += orig_noise_coef * _load_f32(orig_noise_ptr, offs, live, first, end, numel, n_magic, n_shift,
                                                    ORIG_NOISE_BCAST, SIZE, CHUNK, COORDS)
        elif ORIG_NOISE_MODE == "philox":
            b_orig_t += orig_noise_coef * block_normals(seed, sample_offset, step_key, 1, first, numel, n_magic,
                                                        n_shift, g_magic, g_shift, SIZE, False, GROUPED, COORDS,
                                                        FAST_MATH, SPLIT_COUNTERS)
        if MASK_MODE == "full":
            b_m = tl.load(mask_ptr + offs, mask=live)
        elif MASK_MODE == "sample":
            _, n = _chunk_coords(first, SIZE, CHUNK, numel, n_magic, n_shift, COORDS)
            b_m = _gather(mask_ptr, n, first, end, SIZE, CHUNK, True)
        else:
            # The launcher expands run masks of samples this large to dense ones.
            tl.static_assert(COORDS != "split", "run-layout masks need samples below 2**31 elements")
            if MASK_BATCHED and COORDS == "direct":
                # A mask with a batch dim: its run layout extends over the flattened batch
                # (mask_bstride = numel // mid), so offsets follow from e without b.
                idx = first + MASK_CHUNK * tl.arange(0, SIZE // MASK_CHUNK)
                base = 0
            else:
                b, idx = _chunk_coords(first, SIZE, MASK_CHUNK, numel, n_magic, n_shift, COORDS)
                base = b * mask_bstride
            # (idx // (mid * inner)) * inner + idx % inner, as ((idx // inner) // mid) * inner + idx % inner;
            # idx is an int32 below 2**31 in both modes.
            runs = udiv(idx, i_magic, i_shift)
            within = idx - runs * mask_inner
            offs_m = base + udiv(runs, p_magic, p_shift) * mask_inner + within
            b_m = _gather(mask_ptr, offs_m, first, end, SIZE, MASK_CHUNK, MASK_SPREAD)
        if tl.constexpr(mask_ptr.dtype.element_ty == tl.int1):
            b_out = tl.where(b_m, b_orig_t, b_out)
        else:
            # orig_t * m + out * (1 - m) in two fused multiply-adds, exact at m = 0 and 1.
            b_m = b_m.to(tl.float32)
            b_out = b_m * b_orig_t + (b_out - b_m * b_out)

    b_store = cast_for_store(b_out, out_ptr)
    tl.store(out_ptr + offs, b_store, mask=live)
    if OUT_TWICE:
        # The scalar total (int64 where indices need it) moves the base pointer, so
        # offs keeps its own width and total + offs never overflows an int32.
        tl.store((out_ptr + total) + offs, b_store, mask=live)


@triton.jit(do_not_specialize=["seed", "step_key", "sample_offset", "n_magic", "n_shift", "g_magic", "g_shift",
                               "p_magic", "p_shift", "i_magic", "i_shift"])
def _ddim_step_kernel(
    x_ptr, eps_ptr, eps_c_ptr, out_ptr, noise_ptr, x0_ptr, eps_out_ptr, orig_ptr, orig_noise_ptr, mask_ptr,
    bulk, total, numel, n_magic, n_shift, g_magic, g_shift,
    x_coef, eps_coef, noise_coef, x0_x_coef, x0_eps_coef, guidance, orig_coef, orig_noise_coef,
    seed, step_key, sample_offset,
    mask_bstride, mask_mid, p_magic, p_shift, mask_inner, i_magic, i_shift,
    HAS_CFG: tl.constexpr, NOISE_MODE: tl.constexpr, NOISE_BCAST: tl.constexpr, REPEAT_NOISE: tl.constexpr,
    STORE_X0: tl.constexpr, STORE_EPS: tl.constexpr, OUT_TWICE: tl.constexpr,
    MASK_MODE: tl.constexpr, ORIG_BCAST: tl.constexpr, ORIG_NOISE_MODE: tl.constexpr, ORIG_NOISE_BCAST: tl.constexpr,
    GROUPED: tl.constexpr, COORDS: tl.constexpr, HAS_TAIL: tl.constexpr, FAST_MATH: tl.constexpr,
    SPLIT_COUNTERS: tl.constexpr, CHUNK: tl.constexpr, MASK_CHUNK: tl.constexpr, MASK_SPREAD: tl.constexpr,
    MASK_BATCHED: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr,
):
    pid = tl.program_id(0)
    if COORDS == "direct":
        first = pid * BLOCK
    else:
        first = pid.to(tl.int64) * BLOCK
    _step_block(x_ptr, eps_ptr, eps_c_ptr, out_ptr, noise_ptr, x0_ptr, eps_out_ptr, orig_ptr, orig_noise_ptr, mask_ptr,
                first, bulk, total, numel, n_magic, n_shift, g_magic, g_shift,
                x_coef, eps_coef, noise_coef, x0_x_coef, x0_eps_coef, guidance, orig_coef, orig_noise_coef,
                seed, step_key, sample_offset,
                mask_bstride, mask_mid, p_magic, p_shift, mask_inner, i_magic, i_shift,
                BLOCK, OUT_TWICE, HAS_CFG, NOISE_MODE, NOISE_BCAST, REPEAT_NOISE, STORE_X0, STORE_EPS,
                MASK_MODE, ORIG_BCAST, ORIG_NOISE_MODE, ORIG_NOISE_BCAST, GROUPED, COORDS, FAST_MATH, SPLIT_COUNTERS,
                CHUNK, MASK_CHUNK, MASK_SPREAD, MASK_BATCHED)
    if HAS_TAIL:
        # The last few elements, past the last multiple of TAIL: masked scalar accesses.
        if pid == tl.num_programs(0) - 1:
            _step_block(x_ptr, eps_ptr, eps_c_ptr, out_ptr, noise_ptr, x0_ptr, eps_out_ptr, orig_ptr, orig_noise_ptr,
                        mask_ptr, first * 0 + bulk, total, total, numel, n_magic, n_shift, g_magic, g_shift,
                        x_coef, eps_coef, noise_coef, x0_x_coef, x0_eps_coef, guidance, orig_coef, orig_noise_coef,
                        seed, step_key, sample_offset,
                        mask_bstride, mask_mid, p_magic, p_shift, mask_inner, i_magic, i_shift,
                        TAIL, OUT_TWICE, HAS_CFG, NOISE_MODE, NOISE_BCAST, REPEAT_NOISE, STORE_X0, STORE_EPS,
                        MASK_MODE, ORIG_BCAST, ORIG_NOISE_MODE, ORIG_NOISE_BCAST, GROUPED, COORDS, FAST_MATH,
                        SPLIT_COUNTERS, CHUNK, MASK_CHUNK, MASK_SPREAD, MASK_BATCHED)


def _noise_mode(coef: float, tensor) -> str:
    if coef == 0.0:
        return "none"
    return "tensor" if tensor is not None else "philox"


def _broadcast(t: torch.Tensor | None, batch: int) -> bool:
    """Whether a (1 or B, *s) input holds one sample for a batch of several."""
    return t is not None and t.shape[0] == 1 and batch > 1


def step_launch(x: torch.Tensor, model_out: torch.Tensor, out: torch.Tensor, step,
                x0_out: torch.Tensor | None = None, eps_out: torch.Tensor | None = None,
                out_twice: bool = False) -> Launch | None:
    """The launch of one step (a `ddim_fused.step_args.StepArgs`) on validated inputs.

    Shapes as `launch_ddim_step`; with out_twice, out is the first half of a (2B, *s)
    buffer and x_prev is stored in both halves. Reads only shapes, dtypes and data pointers, so it
    also works on meta tensors (the static compile test builds launches from them).
    Returns None when there is nothing to compute (no elements).
    """
    batch = x.shape[0]
    numel = x.numel() // batch if batch else 0
    if numel == 0:
        return None
    noise_mode = _noise_mode(step.noise_coef, step.noise)
    layout = step.mask
    orig_noise_mode = _noise_mode(step.orig_noise_coef, step.orig_noise) if layout is not None else "none"
    draws = "philox" in (noise_mode, orig_noise_mode)
    if draws:
        check_keys(step.seed, step.step_key, step.sample_offset, batch)
    geo = geometry(batch, numel, BLOCK if draws else BLOCK_NO_NOISE)
    mask_tensor, mask_bstride, mid, inner = None, 0, 1, 1
    if layout is None:
        mask_mode = "none"
    elif layout.dense:
        mask_tensor, mask_bstride = layout.mask, layout.batch_stride
        mask_mode = "full" if mask_bstride == numel or batch == 1 else "sample"
    elif geo.coords == "split":
        # Samples of about 2**31 elements or more index in int64: the run layout would need
        # a 64-bit division per element there, so such a mask is expanded once instead.
        mask_tensor = layout.mask.expand((layout.mask.shape[0],) + tuple(x.shape[1:])).contiguous()
        mask_bstride = 0 if mask_tensor.shape[0] == 1 else numel
        mask_mode = "full" if mask_bstride == numel or batch == 1 else "sample"
    else:
        mask_tensor, mask_bstride, mid, inner = layout
        mask_mode = "run"
    p_magic, p_shift = div_magic(mid)
    i_magic, i_shift = div_magic(inner)
    # Gathers go per chunk of one thread's vector when no chunk can straddle two
    # samples (or two runs of the mask layout).
    vector = 16 // x.element_size()
    chunk = vector if numel % vector == 0 else 1
    mask_spread = inner % chunk == 0
    mask_chunk = chunk if mask_spread or (inner == 1 and mid % chunk == 0) else 1
    guidance = step.guidance
    args = (
        x, model_out, model_out[batch:] if guidance is not None else None, out, step.noise, x0_out, eps_out,
        step.orig, step.orig_noise, mask_tensor,
        geo.bulk, geo.total, numel, geo.n_magic, geo.n_shift, geo.g_magic, geo.g_shift,
        float(step.x_coef), float(step.eps_coef), float(step.noise_coef),
        float(step.x0_coefs[0]), float(step.x0_coefs[1]),
        float(1.0 if guidance is None else guidance), float(step.orig_coef), float(step.orig_noise_coef),
        int(step.seed or 0), int(step.step_key), int(step.sample_offset),
        mask_bstride, mid, p_magic, p_shift, inner, i_magic, i_shift,
    )
    kwargs = dict(
        HAS_CFG=guidance is not None, NOISE_MODE=noise_mode, NOISE_BCAST=_broadcast(step.noise, batch),
        REPEAT_NOISE=bool(step.repeat_noise), STORE_X0=x0_out is not None, STORE_EPS=eps_out is not None,
        OUT_TWICE=bool(out_twice), MASK_MODE=mask_mode, ORIG_BCAST=_broadcast(step.orig, batch),
        ORIG_NOISE_MODE=orig_noise_mode,
        ORIG_NOISE_BCAST=_broadcast(step.orig_noise, batch), MASK_BATCHED=mask_bstride != 0 or batch == 1,
        GROUPED=numel % 4 == 0, COORDS=geo.coords, HAS_TAIL=geo.bulk < geo.total, FAST_MATH=FAST_MATH,
        SPLIT_COUNTERS=split_counters(x.dtype), CHUNK=chunk, MASK_CHUNK=mask_chunk, MASK_SPREAD=mask_spread,
        BLOCK=geo.block, TAIL=TAIL,
        # Explicit, so results do not change when Triton's default flips (3.10 disables it).
        enable_fp_fusion=True,
    )
    return Launch(_ddim_step_kernel, geo.grid, args, kwargs)


def launch_ddim_step(x: torch.Tensor, model_out: torch.Tensor, out: torch.Tensor, step,
                     x0_out: torch.Tensor | None = None, eps_out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the kernel for one step (a `ddim_fused.step_args.StepArgs`) on validated inputs.

    Args:
        x: (B, *s); model_out: (B, *s), or (2B, *s) [uncond; cond] when step.guidance is set.
        out: (B, *s) buffer for x_prev (may be x itself).
        x0_out, eps_out: optional (B, *s) buffers for pred_x0 and the guided eps.

    Returns:
        out. TypeError/ValueError if the step draws in-kernel noise with keys outside
        their 32-bit (seed: 63-bit) words.
    """
    launch = step_launch(x, model_out, out, step, x0_out, eps_out)
    if launch is not None:
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)
    return out
