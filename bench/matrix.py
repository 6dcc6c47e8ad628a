"""Which (case, dtype, size, provider) combinations a run times, per device and mode.

CPU runs trim what would take long on a 2-core machine; what is left out is listed in
`omitted` and written into the results, so no gap is silent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .cases import CASES, SIZES

ALL_CASES = tuple(CASES)


@dataclass
class Matrix:
    """A benchmark plan.

    Attributes:
        groups: list of (case name, dtype id, list of (B, C, H, W)).
        providers: provider names to time.
        compile_cases: cases for which torch.compile is timed (others omit it).
        budget_s: timing budget per measurement.
        omitted: human-readable notes on what this plan leaves out.
        compile_shapes: the (B, C, H, W) at which torch.compile is timed. It compiles with
            static shapes, so each shape is one compile (seconds on a CPU, more with
            max-autotune on a GPU).
        compile_dtypes: the dtype ids for which torch.compile is timed.
    """

    groups: list
    providers: tuple
    compile_cases: tuple
    budget_s: float
    omitted: list = field(default_factory=list)
    compile_shapes: tuple = ()
    compile_dtypes: tuple = ("fp32", "fp16", "bf16")

    def pairs(self):
        """(case, dtype) pairs in plan order."""
        return [(c, d) for c, d, _ in self.groups]

    def times_compile(self, case_name: str, dtype_id: str, shape) -> bool:
        """Whether torch.compile is timed for this case, dtype and shape."""
        return (case_name in self.compile_cases and dtype_id in self.compile_dtypes
                and tuple(shape) in self.compile_shapes)


def _shapes(batches, sizes=tuple(SIZES)):
    return [(b, *SIZES[s]) for s in sizes for b in batches]


def plan(device_type: str, quick: bool) -> Matrix:
    """The matrix for a device type ("cpu" or "cuda") and mode."""
    providers = ("triton", "torch", "labml", "minimal", "compile", "diffusers")
    if device_type == "cuda":
        if quick:
            # Small shapes, where host cost decides: 4x64x64 at batch 1, 2, 4, 8 (fp32 and fp16).
            small = _shapes((1, 2, 4, 8), ("4x64x64",))
            shapes = small + _shapes((64,), ("4x64x64",)) + _shapes((1, 8, 64), ("3x256x256",))
            # Half precision at eta 0 also at batch 128: the 151 MB of traffic of fp32 at batch 64.
            half = shapes + [(128, 3, 256, 256)]
            groups = ([(c, "fp32", shapes) for c in ALL_CASES]
                      + [("eta0", "fp16", half), ("cfg", "fp16", shapes), ("eta0", "bf16", half)])
            return Matrix(groups, providers, ("eta0", "cfg"), 0.05,
                          ["--quick: 4x64x64 at batch 1, 2, 4, 8, 64 and 3x256x256 at batch 1, 8, 64; fp32, "
                           "plus fp16 for eta0 and cfg and bf16 for eta0 (eta0 in fp16 and bf16 also at "
                           "B128-3x256x256)",
                           "--quick: torch.compile only for eta0 and cfg, at B1-4x64x64 and B64-3x256x256"],
                          compile_shapes=((1, 4, 64, 64), (64, 3, 256, 256)))
        shapes = _shapes((1, 4, 8, 16, 64))
        groups = [(c, d, shapes) for d in ("fp32", "fp16", "bf16") for c in ALL_CASES]
        return Matrix(groups, providers, ("eta0", "eta-noise", "cfg"), 0.05,
                      ["GPU: batches 1, 4, 8, 16, 64 (2 and 32 left out to fit one 10-minute device call)",
                       "GPU: torch.compile (max-autotune, one compile per static shape) for eta0, eta-noise "
                       "and cfg in fp32 and bf16, at B1-4x64x64 and B64-3x256x256 only"],
                      compile_shapes=((1, 4, 64, 64), (64, 3, 256, 256)), compile_dtypes=("fp32", "bf16"))
    providers = tuple(p for p in providers if p != "triton")
    if quick:
        shapes = [(1, 3, 32, 32), (4, 4, 64, 64), (16, 4, 128, 128)]
        groups = [(c, "fp32", shapes) for c in ALL_CASES]
        return Matrix(groups, providers, ALL_CASES, 0.05,
                      ["--quick: three sizes (B1-3x32x32, B4-4x64x64, B16-4x128x128), fp32 only",
                       "--quick: torch.compile only at B16-4x128x128 (each CPU compile costs seconds)"],
                      compile_shapes=((16, 4, 128, 128),))
    shapes = _shapes((1, 4, 16, 64))
    groups = [(c, "fp32", shapes) for c in ALL_CASES]
    groups += [(c, d, shapes) for d in ("fp16", "bf16") for c in ("eta0", "cfg")]
    omitted = ["CPU: batches 1, 4, 16, 64 (2, 8 and 32 left out for time)",
               "CPU: fp16 and bf16 only for cases eta0 and cfg (the other cases in fp32 only)",
               "CPU: torch.compile (one compile per static shape) at B1-3x32x32, B16-4x128x128 and B64-3x256x256",
               "CPU: the Triton kernel is not timed (interpreter only; it is checked for parity)"]
    return Matrix(groups, providers, ALL_CASES, 0.25, omitted,
                  compile_shapes=((1, 3, 32, 32), (16, 4, 128, 128), (64, 3, 256, 256)))
