"""Launch geometry of the kernels: one 1-D grid over all B * N elements of a batch.

Flattening (B, N) keeps every lane busy whatever the per-sample size N, lifts the
grid-y limit on B (65,535), and leaves each program a block that starts on a multiple
of BLOCK, so contiguous tensors get 128-bit accesses whenever their base pointers are
16-byte aligned, whether or not N is a multiple of 16.

The elements past the last multiple of 16 (the "tail", fewer than 16) are left out of
the vectorised block: the last program handles them with masked scalar accesses. The
block's bound is then a multiple of 16, which is what Triton needs to keep a masked
access vectorised.

Per-sample things (batch-broadcast inputs, paint masks, the noise keys) need the
sample b = e // N of element e. A division per element would cost more than the rest of
the step, so:
- "direct" (every index below 2**31): b = umulhi(2e, m) >> s, with (m, s) from
  `div_magic(N)` computed once on the host.
- "base" (larger launches): one 64-bit division per program for its first element,
  then the multiply-high on the 32-bit offset inside it.
- "split" (samples of 2**31 - BLOCK elements or more, whose offsets need int64):
  a block then spans at most two samples, so b is the first sample's plus one comparison.
The 64-bit divisions of the last two modes are scalar: one per program, never per element.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import triton
import triton.language as tl

# At every ordinary launch Triton compares each global a kernel reads with its value at
# compile time, about 1 us per tl.constexpr on the host. So the kernels read one global
# only, INTERPRETED: modes are string constexprs (COORDS: "direct", "base" or "split"),
# and numeric constants are written where they are used.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

# Elements per program, over 4 warps. With in-kernel noise 1024 (8 per thread: two
# 128-bit accesses in fp32, one in fp16/bf16) keeps the Philox rounds within 32
# registers; without it 2048 spreads each thread's fixed setup over 16 elements.
# The CPU interpreter runs a program as one numpy call, so it gets bigger blocks for
# speed; results do not depend on the block size.
BLOCK = 4096 if INTERPRETED.value else 1024
BLOCK_NO_NOISE = 4096 if INTERPRETED.value else 2048
# Elements left out of the vectorised block are handled in one chunk of this size.
TAIL = 16

_INT32_LIMIT = 2**31


class Launch(NamedTuple):
    """Everything one kernel launch passes: `kernel[grid](*args, **kwargs)`."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


class Geometry(NamedTuple):
    """How one launch covers `total` elements of `numel` each: see the module docstring."""

    grid: tuple[int]
    bulk: int  # elements in vectorised blocks: total rounded down to a multiple of TAIL
    total: int
    coords: str  # "direct", "base" or "split": see the module docstring
    n_magic: int  # division by numel (int32 bit pattern of the magic number)
    n_shift: int
    g_magic: int  # division by numel // 4 (the Philox groups of a sample), when numel % 4 == 0
    g_shift: int
    block: int


def div_magic(divisor: int) -> tuple[int, int]:
    """(m, s) such that n // divisor == umulhi(2 * n, m) >> s for every 0 <= n < 2**31.

    m is returned as the int32 with m's bit pattern, so every launch passes the same
    argument type. With l = ceil(log2(divisor)) and m = ceil(2**(31 + l) / divisor):
    2**(31 + l) <= m * divisor < 2**(31 + l) + 2**l, Granlund and Montgomery's condition
    for an exact quotient of 31-bit numerators; umulhi(2n, m) >> l is floor(n * m / 2**(31 + l)).
    """
    if divisor < 1 or divisor >= _INT32_LIMIT:
        raise ValueError(f"divisor must be in [1, 2**31), got {divisor}")
    shift = (divisor - 1).bit_length()
    magic = -(-(1 << (31 + shift)) // divisor)
    return magic - (1 << 32), shift


@functools.lru_cache(maxsize=64)  # launches repeat their shapes: one computation per shape
def geometry(batch: int, numel: int, block: int = BLOCK) -> Geometry:
    """The launch geometry for `batch` samples of `numel` elements (both >= 1)."""
    total = batch * numel
    bulk = total - total % TAIL
    grid = (max(1, triton.cdiv(bulk, block)),)
    # Offsets of masked-off lanes are computed too: the furthest is the grid's end.
    if grid[0] * block + TAIL < _INT32_LIMIT:
        coords = "direct"
    elif numel + block < _INT32_LIMIT:
        coords = "base"
    else:
        coords = "split"
    n_magic, n_shift = div_magic(min(numel, _INT32_LIMIT - 1))
    g_magic, g_shift = div_magic(max(1, min(numel // 4, _INT32_LIMIT - 1)))
    return Geometry(grid, bulk, total, coords, n_magic, n_shift, g_magic, g_shift, block)


@triton.jit
def udiv(num, magic, shift):
    """num // d for an int32 block 0 <= num < 2**31, with (magic, shift) = div_magic(d)."""
    wide = num.to(tl.uint32, bitcast=True) * 2
    q = tl.umulhi(wide, magic.to(tl.uint32, bitcast=True)) >> shift.to(tl.uint32)
    return q.to(tl.int32, bitcast=True)


@triton.jit
def sample_coords(first, idx, size, magic, shift, COORDS: tl.constexpr):
    """(b, i) for the items first + idx of a flattened (B, size) index space.

    first: the block's first item (int32 under COORDS "direct", else int64 scalar);
    idx: int32 block of offsets from it. b is the sample, i the index inside it.
    """
    if COORDS == "direct":
        item = first + idx
        b = udiv(item, magic, shift)
        i = item - b * size
    elif COORDS == "base":
        b_first = first // size
        local = (first - b_first * size).to(tl.int32) + idx
        step = udiv(local, magic, shift)
        b = b_first + step
        i = local - step * size.to(tl.int32)
    else:
        b_first = first // size
        local = (first - b_first * size) + idx
        wrap = local >= size
        b = b_first + wrap.to(tl.int64)
        i = local - tl.where(wrap, size, 0)
    return b, i
