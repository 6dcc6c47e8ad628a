"""Storing fp32 register values in an output's dtype, rounded to nearest even."""
import triton
import triton.language as tl

from .geometry import INTERPRETED


@triton.jit
def cast_for_store(values, ptr):
    """values (fp32 block) converted to ptr's element dtype with round-to-nearest-even."""
    if ptr.dtype.element_ty == tl.bfloat16:
        # The GPU converts fp32 to bf16 with round-to-nearest-even (cvt.rn.bf16.f32, NaN
        # and +-Inf kept), but Triton's CPU interpreter truncates; there the rounding is
        # done by hand, so CPU parity tests judge the arithmetic a GPU runs.
        if INTERPRETED:
            return round_to_bf16(values)
        else:
            return values.to(tl.bfloat16)
    else:
        return values.to(ptr.dtype.element_ty)


@triton.jit
def round_to_bf16(values):
    """fp32 -> bf16 rounded to nearest even by bit arithmetic; NaN stays NaN, +-Inf stays."""
    bits = values.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    # A NaN's payload can carry the rounding into the sign bit (0x7FFFFFFF would become
    # -0.0): keep its sign and top bits, and set the quiet bit so it stays a NaN.
    quiet_nan = (bits >> 16) | 0x40
    return tl.where(values != values, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
