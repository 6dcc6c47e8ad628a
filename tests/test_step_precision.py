"""Low-precision steps: fp32 arithmetic inside, one rounding at the store, ties to even.

Both step functions (the Triton kernel and the torch path) read fp16/bf16 inputs, compute
the whole update in fp32 and round once when they store. So each output element must be
the exact result (float64 on the same inputs) rounded once to the output dtype, except
where fp32's own error happens to straddle a rounding boundary of that dtype: about
2**-13 of fp16 elements and 2**-16 of bf16 ones. Arithmetic in the storage dtype rounds
two to four times per element and lands on a neighbour for a large share of them, which
a bound such as "at most twice eager's error" cannot tell apart.

Exact ties are built bit by bit: x + half an ulp of x is exactly halfway between two
neighbours, and round-to-nearest-even must pick the one whose last mantissa bit is 0.
"""
import pytest
import torch

from ddim_fused.ops import ddim_step

BACKENDS = ["torch", "triton"]
LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}
# (exponent bits, mantissa bits) of each storage format.
FORMAT = {torch.float16: (5, 10), torch.bfloat16: (8, 7)}


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of b's magnitude (a, b of one fp16/bf16 dtype)."""
    _, mant = FORMAT[b.dtype]
    exp = torch.frexp(b.float().abs().clamp_min(torch.finfo(b.dtype).tiny))[1]
    ulp = torch.ldexp(torch.ones_like(b, dtype=torch.float64), (exp - 1 - mant).to(torch.int64))
    return ((a.double() - b.double()).abs() / ulp)


@pytest.mark.parametrize("dtype", LOW.values(), ids=LOW.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_step_rounds_once_from_fp32(backend, dtype, backend_device):
    B, n = 4, 4096
    g = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(backend_device, dtype)

    x, model_out, noise = draw(B, n), draw(2 * B, n), draw(B, n)
    coefs = dict(x_coef=1.0137, eps_coef=-0.4113, guidance=3.7, noise_coef=0.2917, x0_coefs=(1.3371, -0.6125))
    out, x0_out, eps_out = (torch.empty_like(x) for _ in range(3))
    ddim_step(x, model_out, out=out, x0_out=x0_out, eps_out=eps_out, noise=noise, backend=backend, **coefs)

    xd, ud, cd, nd = x.double(), model_out[:B].double(), model_out[B:].double(), noise.double()
    eps = ud + coefs["guidance"] * (cd - ud)
    exact = {"x_prev": coefs["x_coef"] * xd + coefs["eps_coef"] * eps + coefs["noise_coef"] * nd,
             "pred_x0": coefs["x0_coefs"][0] * xd + coefs["x0_coefs"][1] * eps, "eps": eps}
    for name, got in (("x_prev", out), ("pred_x0", x0_out), ("eps", eps_out)):
        once = exact[name].to(dtype)  # the exact value rounded once (via fp32, as the step does)
        off = ulps_apart(got, once)
        # One ulp, or fp32's absolute error where terms cancel to almost nothing.
        slack = (got.double() - once.double()).abs() <= 2.0**-20 * once.double().abs().max()
        assert bool(((off <= 1.0) | slack).all()), f"{name}: up to {off.max().item():.1f} ulps from the " \
                                                   "once-rounded exact value"
        share = (off > 0).double().mean().item()
        assert share <= 2e-3, f"{name}: {share:.2%} of elements are not the once-rounded exact value " \
                              f"(arithmetic in {dtype} instead of fp32?)"


def ties(dtype, toward_zero: bool):
    """(x, half_ulp, expected): x + half_ulp is an exact tie; expected its round-to-even.

    x runs over every mantissa of several binades, both signs; half_ulp is half an ulp of
    x, with x's sign (away from zero) or the other sign (toward zero). The expected value
    is built from the bits: keep x when its last mantissa bit is 0, else step one ulp.
    """
    exp_bits, mant = FORMAT[dtype]
    bias = 2 ** (exp_bits - 1) - 1
    mantissas = torch.arange(1 if toward_zero else 0, 2**mant, dtype=torch.int64)
    rows = []
    for exponent in range(bias - 3, bias + 4):
        for sign in (0, 1):
            rows.append((sign << (exp_bits + mant)) | (exponent << mant) | mantissas)
    bits = torch.cat(rows)
    x = bits.to(torch.int16).view(dtype)
    exponent = (bits >> mant) & (2**exp_bits - 1)
    sign = torch.where(bits >> (exp_bits + mant) == 1, -1.0, 1.0).double()
    half_ulp = sign * torch.ldexp(torch.ones_like(sign), exponent - bias - mant - 1)
    odd = (bits & 1) == 1
    step = -1 if toward_zero else 1  # in sign-magnitude bits, +1 is one ulp away from zero
    expected = torch.where(odd, bits + step, bits).to(torch.int16).view(dtype)
    if toward_zero:
        half_ulp = -half_ulp
    return x, half_ulp.to(dtype), expected


@pytest.mark.parametrize("toward_zero", [False, True], ids=["away-from-zero", "toward-zero"])
@pytest.mark.parametrize("dtype", LOW.values(), ids=LOW.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_round_to_even(backend, dtype, toward_zero, backend_device):
    x, half_ulp, expected = ties(dtype, toward_zero)
    x, half_ulp = x.view(1, -1).to(backend_device), half_ulp.view(1, -1).to(backend_device)
    # x + 1.0 * half_ulp is exact in fp32 (at most mantissa + 2 significant bits), so the
    # store alone decides; the pred_x0 store goes through the same rounding.
    x0_out = torch.empty_like(x)
    out = ddim_step(x, half_ulp, x_coef=1.0, eps_coef=1.0, x0_out=x0_out, x0_coefs=(1.0, 1.0), backend=backend)
    moved = expected.view(torch.int16) != x.view(-1).cpu().view(torch.int16)
    assert moved.any() and not moved.all()  # both outcomes of a tie are exercised
    for name, got in (("x_prev", out), ("pred_x0", x0_out)):
        got = got.view(-1).cpu()
        wrong = (got.view(torch.int16) != expected.view(torch.int16)).nonzero().view(-1).tolist()
        if wrong:
            i = wrong[0]
            pytest.fail(f"{name}: {len(wrong)} of {got.numel()} ties not rounded to even, e.g. "
                        f"{x.view(-1)[i].item()!r} + {half_ulp.view(-1)[i].item()!r} -> {got[i].item()!r}, "
                        f"expected {expected[i].item()!r}")
