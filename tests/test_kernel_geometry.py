"""Launch geometry: the flattened grid, exact division by multiply-high, sample coordinates."""
import random

import pytest
import torch
import triton
import triton.language as tl

from ddim_fused.backend import kernels

geometry_module = kernels().geometry


def host_udiv(n: int, magic: int, shift: int) -> int:
    """What the kernel's udiv computes, in Python integers."""
    return ((2 * n) * (magic & 0xFFFFFFFF) >> 32) >> shift


def test_div_magic_is_exact_for_every_31_bit_numerator_edge():
    rng = random.Random(0)
    divisors = list(range(1, 1200)) + [rng.randrange(1, 2**31) for _ in range(2000)] + [2**30, 2**30 + 1, 2**31 - 1]
    for d in divisors:
        magic, shift = geometry_module.div_magic(d)
        assert -2**31 <= magic < 2**31  # passed as an int32 bit pattern
        top = (2**31 - 1) // d * d
        for n in {0, 1, d - 1, d, d + 1, top - 1, top, 2**31 - 1, rng.randrange(2**31)}:
            if 0 <= n < 2**31:
                assert host_udiv(n, magic, shift) == n // d, (n, d)


def test_div_magic_refuses_divisors_out_of_range():
    for bad in (0, -3, 2**31):
        with pytest.raises(ValueError, match="divisor"):
            geometry_module.div_magic(bad)


@triton.jit
def _coords_kernel(b_ptr, i_ptr, first, size, magic, shift, COORDS: tl.constexpr, SIZE: tl.constexpr):
    b, i = geometry_module.sample_coords(first, tl.arange(0, SIZE), size, magic, shift, COORDS)
    tl.store(b_ptr + tl.arange(0, SIZE), b.to(tl.int64))
    tl.store(i_ptr + tl.arange(0, SIZE), i.to(tl.int64))


@pytest.mark.parametrize("mode", ["direct", "base", "split"])
@pytest.mark.parametrize("size", [64, 67, 1000])
def test_sample_coords_of_every_mode_match_divmod(mode, size, device):
    # "split" assumes a block spans at most two samples: size >= SIZE.
    SIZE = 64
    magic, shift = geometry_module.div_magic(size)
    for first in (0, 64, 960, 64 * 37):
        b = torch.empty(SIZE, dtype=torch.int64, device=device)
        i = torch.empty(SIZE, dtype=torch.int64, device=device)
        _coords_kernel[(1,)](b, i, first, size, magic, shift, COORDS=mode, SIZE=SIZE)
        items = torch.arange(first, first + SIZE)
        assert torch.equal(b.cpu(), items // size) and torch.equal(i.cpu(), items % size), (mode, size, first)


def test_grid_is_one_dimensional_for_any_batch():
    block = geometry_module.BLOCK
    geo = geometry_module.geometry(70000, 32, block)  # B above CUDA's grid-y limit of 65,535
    assert len(geo.grid) == 1 and geo.grid[0] == triton.cdiv(70000 * 32, block)
    assert geo.coords == "direct" and geo.bulk == geo.total == 70000 * 32
    # (4096, 32): every block is full, not 4096 blocks of 32 busy lanes each.
    small = geometry_module.geometry(4096, 32, block)
    assert small.grid == (4096 * 32 // block,)


def test_tail_and_wide_geometries():
    geo = geometry_module.geometry(1, 1173, 1024)
    assert (geo.bulk, geo.total, geo.grid) == (1168, 1173, (2,))
    tiny = geometry_module.geometry(1, 5, 1024)
    assert (tiny.bulk, tiny.grid) == (0, (1,))  # one program handles the 5-element tail
    wide = geometry_module.geometry(2**11 + 1, 2**20, 1024)
    assert wide.coords == "base"
    huge = geometry_module.geometry(2, 2**31 + 16, 1024)
    assert huge.coords == "split"
