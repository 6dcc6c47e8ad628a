"""What one benchmarked step does (the cases), its inputs, and the bytes it must move.

Every case is one DDIM update at the middle step (index 25 of 50, "leading" time
steps, the scaled-linear schedule of SD 1.5), on inputs drawn once per size.

Byte model (the minimum traffic of the operation, whoever runs it): with n = B*C*H*W
elements of s bytes,
    read x                 n*s
    read model output      n*s, or 2*n*s under CFG (batch-doubled [uncond; cond])
    read noise             n*s when the noise is an input tensor; 0 when drawn in the step
    write x_prev           n*s
    write pred_x0          n*s (case eta0-x0 only)
    paint: read orig n*s, read orig_noise n*s, read a (B, 1, H, W) mask B*H*W*s.
Intermediates (eager temporaries) are not counted, so every provider's GB/s is the
rate of the same useful work and is directly comparable with the copy bandwidth.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ALPHA_BAR = "scaled_linear"
N_STEPS = 50
DISCRETIZE = "leading"
INDEX = 25
ETA = 0.5
GUIDANCE = 7.5
SEED = 1234


@dataclass(frozen=True)
class Case:
    """One variant of the step.

    Attributes:
        name: id used in tables and files.
        eta: DDIM eta of the sampler.
        noise: "none", "tensor" (noise is an input) or "drawn" (the step draws it:
            in-kernel Philox for the fused step, torch.randn for the baselines).
        cfg: classifier-free guidance on a batch-doubled model output.
        paint: blend with a noised original under a (B, 1, H, W) mask.
        x0: also write pred_x0.
    """

    name: str
    eta: float = 0.0
    noise: str = "none"
    cfg: bool = False
    paint: bool = False
    x0: bool = False

    @property
    def deterministic(self) -> bool:
        return self.noise != "drawn"

    @property
    def outputs(self) -> tuple[str, ...]:
        """Names of the tensors every provider returns for this case, in order."""
        return ("x_prev", "pred_x0") if self.x0 else ("x_prev",)


CASES = {
    c.name: c
    for c in (
        Case("eta0"),
        Case("eta0-x0", x0=True),
        Case("eta-noise", eta=ETA, noise="tensor"),
        Case("eta-drawn", eta=ETA, noise="drawn"),
        Case("cfg", cfg=True),
        Case("paint", paint=True),
    )
}

SIZES = {"3x32x32": (3, 32, 32), "4x64x64": (4, 64, 64), "4x128x128": (4, 128, 128), "3x256x256": (3, 256, 256)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def min_bytes(case: Case, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """The minimum bytes the step must move (see the module docstring).

    Args:
        case: the step variant.
        shape: (B, C, H, W) of x.
        dtype: element type of every tensor.

    Returns:
        bytes read plus written.
    """
    n = 1
    for d in shape:
        n *= d
    s = torch.empty((), dtype=dtype).element_size()
    tensors = 1 + (2 if case.cfg else 1) + 1  # x, model output, x_prev
    tensors += 1 if case.noise == "tensor" else 0
    tensors += 1 if case.x0 else 0
    total = tensors * n * s
    if case.paint:
        B, _, H, W = shape
        total += 2 * n * s + B * H * W * s
    return total


def make_inputs(case: Case, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict:
    """Random inputs of one step, drawn in fp32 from a fixed seed, then cast.

    Returns:
        dict with x, model_out ((2B, ...) under CFG), and noise / orig / orig_noise / mask
        when the case uses them (else None).
    """
    gen = torch.Generator().manual_seed(SEED)
    B = shape[0]

    def draw(*dims):
        return torch.randn(dims, generator=gen).to(device=device, dtype=dtype)

    inputs = {"x": draw(*shape), "model_out": draw(2 * B if case.cfg else B, *shape[1:]),
              "noise": None, "orig": None, "orig_noise": None, "mask": None}
    if case.noise == "tensor":
        inputs["noise"] = draw(*shape)
    if case.paint:
        inputs["orig"] = draw(*shape)
        inputs["orig_noise"] = draw(*shape)
        mask = (torch.rand((B, 1, *shape[2:]), generator=gen) > 0.5).to(dtype)
        inputs["mask"] = mask.to(device)
    return inputs


def n_elements(shape) -> int:
    """Number of elements of a shape."""
    n = 1
    for d in shape:
        n *= d
    return n


def shape_id(shape) -> str:
    """Readable id of (B, C, H, W): B4-4x64x64."""
    return f"B{shape[0]}-" + "x".join(str(d) for d in shape[1:])
