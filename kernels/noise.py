"""Counter-based Gaussian noise keyed by (seed, sample, step, stream, element).

One Philox4x32-10 call yields four uniforms, turned into four normals by two
Box-Muller transforms. Element e of a sample uses Philox counter e // 4 and lane
e % 4, so its value never depends on the block size, the batch size or how a batch
is split. `ddim_fused.philox` reproduces the same stream with torch ops on any device.
"""
import torch
import triton
import triton.language as tl

from .cast import cast_for_store

# Stream ids of ddim_fused.philox.NOISE_STREAMS that the step kernel draws itself
# (a test checks they agree; kernels/ imports nothing from the host package).
STREAM_STEP = tl.constexpr(0)
STREAM_ORIG = tl.constexpr(1)

_TWO_PI = tl.constexpr(6.283185307179586)
_INV_2_23 = tl.constexpr(1.0 / 8388608.0)


@triton.jit
def _uniform_open(bits):
    # Top 23 bits plus one half, times 2**-23: exactly representable in fp32 and
    # strictly inside (0, 1), so log() below never sees 0.
    return ((bits >> 9).to(tl.float32) + 0.5) * _INV_2_23


@triton.jit
def keyed_normals(seed, sample_key, step_key, stream, first_elem, QUARTER: tl.constexpr):
    """4 * QUARTER standard normals for elements first_elem .. first_elem + 4 * QUARTER.

    first_elem is a multiple of 4 (int64). Returns an fp32 block of 4 * QUARTER values.
    """
    counter = first_elem // 4 + tl.arange(0, QUARTER).to(tl.int64)
    zero = counter * 0
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (zero + sample_key).to(tl.uint32)
    c2 = (zero + step_key).to(tl.uint32)
    c3 = ((counter >> 32) * 4 + stream).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    u0 = _uniform_open(r0)
    u1 = _uniform_open(r1)
    u2 = _uniform_open(r2)
    u3 = _uniform_open(r3)
    rad_a = tl.sqrt(-2.0 * tl.log(u0))
    rad_b = tl.sqrt(-2.0 * tl.log(u2))
    n0 = rad_a * tl.cos(u1 * _TWO_PI)
    n1 = rad_a * tl.sin(u1 * _TWO_PI)
    n2 = rad_b * tl.cos(u3 * _TWO_PI)
    n3 = rad_b * tl.sin(u3 * _TWO_PI)
    # Lane order n0, n1, n2, n3 for consecutive elements 4c .. 4c + 3.
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit(do_not_specialize=["seed", "step_key", "stream", "sample_offset"])
def _keyed_normal_kernel(out_ptr, N, seed, step_key, stream, sample_offset, BLOCK: tl.constexpr):
    pid_e = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_e = pid_e.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask_e = offs_e < N
    b_noise = keyed_normals(seed, sample_offset + pid_b, step_key, stream, pid_e.to(tl.int64) * BLOCK, BLOCK // 4)
    tl.store(out_ptr + pid_b.to(tl.int64) * N + offs_e, cast_for_store(b_noise, out_ptr), mask=mask_e)


def keyed_normal(
    shape,
    seed: int,
    step_key: int = 0,
    stream: int = 0,
    sample_offset: int = 0,
    *,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.float32,
    block: int = 1024,
) -> torch.Tensor:
    """Standard normal noise, sample b keyed by global index sample_offset + b.

    Args:
        shape: (B, *sample_shape).
        seed: int in [0, 2**63).
        step_key: DDIM step index in [0, 2**32).
        stream: a stream id, one of ddim_fused.philox.NOISE_STREAMS' values.
        sample_offset: global index of the first sample.
        device, dtype: of the result (fp32, fp16 or bf16).

    Returns:
        noise: tensor of `shape`, same values as `ddim_fused.philox.keyed_normal_torch`.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or shape[0] < 1:
        raise ValueError(f"shape must start with a batch size >= 1, got {shape}")
    out = torch.empty(shape, device=device, dtype=dtype)
    n = out[0].numel()
    if n == 0:
        return out
    grid = (triton.cdiv(n, block), shape[0])
    _keyed_normal_kernel[grid](out, n, seed, step_key, stream, sample_offset, BLOCK=block)
    return out
