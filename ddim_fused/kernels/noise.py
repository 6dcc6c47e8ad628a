"""Counter-based Gaussian noise keyed by (seed, sample, step, stream, element).

One Philox4x32-10 call yields four uniforms, turned into four normals by two
Box-Muller transforms. Element n of a sample uses Philox counter n // 4 and lane
n % 4, so its value never depends on the block size, the batch size or how a batch
is split. `ddim_fused.philox` reproduces the same stream with torch ops on any device.

Two ways to compute the normals from the same Philox integers (FAST_MATH):
- precise (the CPU interpreter): log, sqrt, cos and sin in fp32, as the torch copy does;
  within 2e-6 of it (NOISE_ATOL[False]).
- fast (every compiled launch): the GPU's approximate lg2, sin and cos instructions
  (MUFU), which the interpreter cannot run. The CUDA math documentation bounds their
  absolute errors by 2**-22 (lg2 on [0.5, 2]) and 2**-21.19 (sin, cos on [-pi, pi], so
  the angle is shifted into that range). Where u > 1 - 2**-8, -2 log(u) is the series
  2w + w^2 (w = 1 - u, exact) instead, since there lg2's absolute error would swamp
  the tiny result. With the radius at most 5.8, the angle (3.5e-7 from exact, the torch
  copy's 4.2e-7) and trig errors give at most about 7e-6, the radius about 3e-6: a
  normal sits within 1e-5 of the torch copy, NOISE_ATOL[True] = 1.5e-5 with margin
  (tests/test_noise.py checks it on a GPU).
"""
from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from .cast import cast_for_store
from .geometry import INTERPRETED, TAIL, Launch, geometry, sample_coords

# Every compiled launch takes the fast path; the interpreter takes the precise one.
FAST_MATH = not INTERPRETED.value
# How far a normal may sit from ddim_fused.philox's copy, by FAST_MATH.
NOISE_ATOL = {False: 2e-6, True: 1.5e-5}

# Noise keys are 32-bit Philox words: a wider value would wrap onto another key.
SEED_LIMIT = 2**63
KEY_LIMIT = 2**32


def check_keys(seed, step_key, sample_offset, batch: int) -> None:
    """TypeError/ValueError unless every noise key fits its Philox word.

    seed: int in [0, 2**63); step_key: int in [0, 2**32); sample_offset: int with the
    batch's last sample index sample_offset + batch - 1 below 2**32.
    """
    for name, value, high in (("seed", seed, SEED_LIMIT), ("step_key", step_key, KEY_LIMIT),
                              ("sample_offset", sample_offset, KEY_LIMIT - batch + 1)):
        if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 0 <= value < high:
            raise ValueError(f"{name} must be in [0, {high}), got {value}")


@triton.jit
def _approx(x, OP: tl.constexpr):
    """The GPU's approximate OP ("lg2", "sin" or "cos") of an fp32 block.

    The interpreter cannot run inline PTX; there the exact function stands in, so CPU
    tests can still run the fast path's arithmetic around these instructions.
    """
    if INTERPRETED:
        if OP == "lg2":
            return tl.log2(x)
        elif OP == "sin":
            return tl.sin(x)
        else:
            return tl.cos(x)
    else:
        return tl.inline_asm_elementwise(OP + ".approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _box_muller(r_rad, r_angle, FAST_MATH: tl.constexpr):
    """(radius * cos, radius * sin) of two uint32 Philox words, as the torch copy."""
    if FAST_MATH:
        # Top 23 bits as a float in [1, 2) by bit pattern (0x3F800000 is 1.0f), so no
        # int-to-float convert.
        v_rad = ((r_rad >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
        v_ang = ((r_angle >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
        u = v_rad - (1.0 - 0.5 * (1.0 / 8388608.0))  # (k + 0.5) * 2**-23, exact
        # The angle shifted by pi into [-pi, pi], where sin.approx and cos.approx keep
        # their documented accuracy: 2 * pi * (u - 1/2) in one fused multiply-add, within
        # 3.5e-7 of exact for every u (the torch copy's fp32 2 * pi * u: 4.2e-7).
        angle = v_ang * 6.283185307179586 + (-3.0 * 3.141592653589793 + 0.5 * (1.0 / 8388608.0) * 6.283185307179586)
        # lg2's absolute error would swamp -2 log(u) as u -> 1: there the series
        # 2w + w^2 (w = 1 - u, exact) is within w^2 / 3 of it, relatively.
        w = 1.0 - u
        log_term = tl.where(w < 2.0**-8, w * (2.0 + w), _approx(u, "lg2") * (-2.0 * 0.6931471805599453))  # ln 2
        # The shifted angle flips the signs of cos and sin.
        radius = -tl.sqrt(log_term)
        return radius * _approx(angle, "cos"), radius * _approx(angle, "sin")
    else:
        # Uniforms (k + 0.5) * 2**-23 of the top 23 bits.
        u_rad = ((r_rad >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        u_ang = ((r_angle >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        radius = tl.sqrt(-2.0 * tl.log(u_rad))
        return radius * tl.cos(u_ang * 6.283185307179586), radius * tl.sin(u_ang * 6.283185307179586)


@triton.jit
def _philox_words(seed, key, step_key, stream, counter):
    """Philox4x32-10 of (counter low word, key, step_key, counter high word * 4 + stream), key = seed.

    The same rounds as tl.philox, with each 32x32-bit product taken whole from one
    64-bit multiply: the GPU does that in one instruction (IMAD.WIDE.U32) instead of
    two (the high and the low half).
    """
    if tl.constexpr(counter.dtype.primitive_bitwidth == 64):
        c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
        c3 = ((counter >> 32) * 4 + stream).to(tl.uint32)
    else:  # an int32 counter (below 2**31) has no high word
        c0 = counter.to(tl.uint32, bitcast=True)
        c3 = (counter * 0 + stream).to(tl.uint32)
    c1 = key.to(tl.uint32)
    c2 = (counter * 0 + step_key).to(tl.uint32)
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    # Philox4x32's round multipliers and key increments (Salmon et al. 2011), as in
    # ddim_fused.philox.
    for _ in tl.static_range(10):
        prod_a = c0.to(tl.uint64) * 0xD2511F53
        prod_b = c2.to(tl.uint64) * 0xCD9E8D57
        c0, c2 = (prod_b >> 32).to(tl.uint32) ^ c1 ^ k0, (prod_a >> 32).to(tl.uint32) ^ c3 ^ k1
        c1, c3 = prod_b.to(tl.uint32), prod_a.to(tl.uint32)
        k0 += 0x9E3779B9
        k1 += 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _group_normals(seed, sample_offset, step_key, stream, first_group, idx, groups, g_magic, g_shift,
                   REPEAT: tl.constexpr, COORDS: tl.constexpr, FAST_MATH: tl.constexpr):
    """The four normals (lane 0..3) of the Philox groups first_group + idx."""
    b, counter = sample_coords(first_group, idx, groups, g_magic, g_shift, COORDS)
    if REPEAT:
        key = b * 0
    else:
        key = sample_offset + b
    r0, r1, r2, r3 = _philox_words(seed, key, step_key, stream, counter)
    n0, n1 = _box_muller(r0, r1, FAST_MATH)
    n2, n3 = _box_muller(r2, r3, FAST_MATH)
    return n0, n1, n2, n3


@triton.jit
def block_normals(seed, sample_offset, step_key, stream, first, numel, n_magic, n_shift, g_magic, g_shift,
                  SIZE: tl.constexpr, REPEAT: tl.constexpr, GROUPED: tl.constexpr, COORDS: tl.constexpr,
                  FAST_MATH: tl.constexpr, SPLIT_COUNTERS: tl.constexpr):
    """The normals of the flattened elements first .. first + SIZE of (B, numel) samples.

    Sample b is keyed by sample_offset + b (0 for every sample if REPEAT). GROUPED
    (numel % 4 == 0, first % 4 == 0): one Philox call serves four neighbours, laid out
    in registers as the loads and stores are, so no shuffle is needed: SPLIT_COUNTERS
    1 gives each thread runs of 4 (fp32 tensors), 2 runs of 8 (fp16/bf16). Otherwise
    each element runs its own Philox call and keeps its lane. Returns fp32 (SIZE,).
    """
    if GROUPED:
        groups = numel // 4
        first_group = first // 4
        if SPLIT_COUNTERS == 1:
            idx = tl.arange(0, SIZE // 4)
            n0, n1, n2, n3 = _group_normals(seed, sample_offset, step_key, stream, first_group, idx, groups,
                                            g_magic, g_shift, REPEAT, COORDS, FAST_MATH)
            # Nested joins: the first join's axis ends up outermost, so element
            # 4g + 2z + y holds lane 2z + y of group g.
            return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [SIZE])
        else:
            idx = 2 * tl.arange(0, SIZE // 8)
            a0, a1, a2, a3 = _group_normals(seed, sample_offset, step_key, stream, first_group, idx, groups,
                                            g_magic, g_shift, REPEAT, COORDS, FAST_MATH)
            c0, c1, c2, c3 = _group_normals(seed, sample_offset, step_key, stream, first_group, idx + 1, groups,
                                            g_magic, g_shift, REPEAT, COORDS, FAST_MATH)
            # Element 8t + 4x + 2z + y holds lane 2z + y of group 2t + x.
            even = tl.join(tl.join(a0, c0), tl.join(a2, c2))
            odd = tl.join(tl.join(a1, c1), tl.join(a3, c3))
            return tl.reshape(tl.join(even, odd), [SIZE])
    else:
        b, n = sample_coords(first, tl.arange(0, SIZE), numel, n_magic, n_shift, COORDS)
        if REPEAT:
            key = b * 0
        else:
            key = sample_offset + b
        r0, r1, r2, r3 = _philox_words(seed, key, step_key, stream, n >> 2)
        lane = n & 3
        cos_part, sin_part = _box_muller(tl.where(lane < 2, r0, r2), tl.where(lane < 2, r1, r3), FAST_MATH)
        return tl.where((lane & 1) == 0, cos_part, sin_part)


@triton.jit(do_not_specialize=["seed_arg", "step_key", "stream", "offset_arg", "n_magic", "n_shift", "g_magic",
                               "g_shift"])
def _keyed_normal_kernel(out_ptr, bulk, total, numel, n_magic, n_shift, g_magic, g_shift,
                         seed_arg, step_key, stream, offset_arg,
                         KEYS_IN_MEMORY: tl.constexpr, GROUPED: tl.constexpr, COORDS: tl.constexpr,
                         HAS_TAIL: tl.constexpr, FAST_MATH: tl.constexpr, SPLIT_COUNTERS: tl.constexpr,
                         BLOCK: tl.constexpr, TAIL: tl.constexpr):
    # KEYS_IN_MEMORY: seed_arg and offset_arg point to int64 values read here, so a captured
    # CUDA graph draws the noise of whatever keys each replay writes there.
    if KEYS_IN_MEMORY:
        seed = tl.load(seed_arg)
        sample_offset = tl.load(offset_arg)
    else:
        seed = seed_arg
        sample_offset = offset_arg
    pid = tl.program_id(0)
    if COORDS == "direct":
        first = pid * BLOCK
    else:
        first = pid.to(tl.int64) * BLOCK
    _store_normals(out_ptr, first, bulk, numel, n_magic, n_shift, g_magic, g_shift, seed, step_key, stream,
                   sample_offset, BLOCK, GROUPED, COORDS, FAST_MATH, SPLIT_COUNTERS)
    if HAS_TAIL:
        if pid == tl.num_programs(0) - 1:
            _store_normals(out_ptr, first * 0 + bulk, total, numel, n_magic, n_shift, g_magic, g_shift, seed,
                           step_key, stream, sample_offset, TAIL, GROUPED, COORDS, FAST_MATH, SPLIT_COUNTERS)


@triton.jit
def _store_normals(out_ptr, first, end, numel, n_magic, n_shift, g_magic, g_shift, seed, step_key, stream,
                   sample_offset, SIZE: tl.constexpr, GROUPED: tl.constexpr, COORDS: tl.constexpr,
                   FAST_MATH: tl.constexpr, SPLIT_COUNTERS: tl.constexpr):
    offs = first + tl.arange(0, SIZE)
    normals = block_normals(seed, sample_offset, step_key, stream, first, numel, n_magic, n_shift, g_magic,
                            g_shift, SIZE, False, GROUPED, COORDS, FAST_MATH, SPLIT_COUNTERS)
    tl.store(out_ptr + offs, cast_for_store(normals, out_ptr), mask=offs < end)


def split_counters(dtype: torch.dtype) -> int:
    """Groups per thread run (see block_normals) for tensors of `dtype`."""
    return 1 if dtype.itemsize >= 4 else 2


def noise_launch(out: torch.Tensor, seed, step_key: int, stream: int, sample_offset) -> Launch:
    """The launch that fills a contiguous (B, *s) `out` (B * s elements >= 1) with keyed normals.

    seed and sample_offset: both ints, or both 0-d int64 tensors on out's device that the
    kernel reads when it runs.
    """
    batch = out.shape[0]
    geo = geometry(batch, out[0].numel())
    numel = geo.total // batch
    args = (out, geo.bulk, geo.total, numel, geo.n_magic, geo.n_shift, geo.g_magic, geo.g_shift,
            seed, step_key, stream, sample_offset)
    kwargs = dict(KEYS_IN_MEMORY=isinstance(seed, torch.Tensor), GROUPED=numel % 4 == 0, COORDS=geo.coords,
                  HAS_TAIL=geo.bulk < geo.total, FAST_MATH=FAST_MATH,
                  SPLIT_COUNTERS=split_counters(out.dtype), BLOCK=geo.block, TAIL=TAIL,
                  # Explicit, so results do not change when Triton's default flips (3.10 disables it).
                  enable_fp_fusion=True)
    return Launch(_keyed_normal_kernel, geo.grid, args, kwargs)


def keyed_normal(
    shape,
    seed,
    step_key: int = 0,
    stream: int = 0,
    sample_offset=0,
    *,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Standard normal noise, sample b keyed by global index sample_offset + b.

    Args:
        shape: (B, *sample_shape).
        seed: int in [0, 2**63), or a 0-d int64 tensor on `device` holding one, read by
            the kernel when it runs (never on the host: the launch can be captured in a
            CUDA graph and replayed with new values; their range is the caller's to keep).
        step_key: DDIM step index, int in [0, 2**32).
        stream: a stream id, one of ddim_fused.philox.NOISE_STREAMS' values.
        sample_offset: global index of the first sample; sample_offset + B <= 2**32. An int,
            or a tensor as seed (both or neither).
        device, dtype: of the result (fp32, fp16 or bf16).
        out: a contiguous tensor of `shape`, `device` and `dtype` to write into instead of a new one.

    Returns:
        noise: tensor of `shape` (out, if given), the values of
        `ddim_fused.philox.keyed_normal_torch` within NOISE_ATOL[FAST_MATH].
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or shape[0] < 1:
        raise ValueError(f"shape must start with a batch size >= 1, got {shape}")
    if out is None:
        out = torch.empty(shape, device=device, dtype=dtype)
    elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape}, got {out.dtype} "
                         f"{tuple(out.shape)}{'' if out.is_contiguous() else ' (strided)'}")
    if isinstance(seed, torch.Tensor) or isinstance(sample_offset, torch.Tensor):
        for name, key in (("seed", seed), ("sample_offset", sample_offset)):
            if not (isinstance(key, torch.Tensor) and key.dim() == 0 and key.dtype == torch.int64
                    and key.device == out.device):
                raise ValueError(f"{name}: tensor keys must both be 0-d int64 tensors on {out.device}")
        check_keys(0, step_key, 0, shape[0])
    else:
        check_keys(seed, step_key, sample_offset, shape[0])
    if out.numel() == 0:
        return out
    launch = noise_launch(out, seed, step_key, stream, sample_offset)
    launch.kernel[launch.grid](*launch.args, **launch.kwargs)
    return out
