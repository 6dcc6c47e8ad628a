"""Compile the kernels as real launches specialise them, for sm_90 and sm_80, and read the SASS.

No GPU is needed: a launch is built by the real launchers (`step_launch`, `noise_launch`)
from meta tensors, which carry shapes, dtypes and data pointers (0, so 16-byte aligned,
as CUDA allocations are) but no memory. Triton's own binder then specialises the
arguments as `JITFunction.run` does (pointer alignment, integers divisible by 16 or equal
to 1, constexprs, options such as enable_fp_fusion), `triton.compile` builds the cubin
with the ptxas in the triton wheel, and `cuobjdump -res-usage` and `nvdisasm` read it.

Run without TRITON_INTERPRET (the interpreter hands out plain Python functions):
    python -m tests.compile_kernels [--arch 90 80] [--json]
prints one row per variant (JSON lines with --json). `tests/test_kernel_compiles.py`
asserts the budgets; `bench/static.py` writes the table into the benchmark results.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction

try:  # the runtime's own binder: how a launch specialises its arguments
    from triton.runtime.jit import create_function_from_signature
except ImportError:  # pragma: no cover - other Triton versions
    create_function_from_signature = None

from ddim_fused.backend import kernels

kernels()  # registers ddim_fused.kernels, also from a checkout that was never installed
from ddim_fused.kernels.ddim_step import step_launch  # noqa: E402
from ddim_fused.kernels.geometry import Launch  # noqa: E402
from ddim_fused.kernels.noise import noise_launch  # noqa: E402
from ddim_fused.masks import mask_layout  # noqa: E402
from ddim_fused.step_args import StepArgs  # noqa: E402

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ARCHS = (90, 80)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Budgets: SASS instructions in the whole kernel (cold paths included) per element a
# thread owns, and registers per thread.
BUDGETS = {
    "step": {"sass": 12.0},
    "noise": {"sass": 35.0, "regs": 40},
    "paint": {"sass": 60.0},
}


@dataclass(frozen=True)
class Variant:
    """One kernel variant: how to build its launch, its budget class and what its SASS must show."""

    name: str
    build: Callable[[], Launch]
    budget: Optional[str]  # a BUDGETS key, or None for a row shown without a budget
    max_narrow: Optional[int]  # global accesses per thread narrower than 128 bits allowed (tails, gathers)
    note: str = ""


def meta(shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def step(shape, dtype="fp32", *, cfg=False, noise=None, x0=False, eps_out=False, mask=None, orig_noise=None,
         repeat=False, twice=False) -> Callable[[], Launch]:
    """A step launch on meta tensors. noise / orig_noise: None, "tensor", "tensor1" (batch 1) or "philox";
    twice: x_prev stored in both halves of a batch-doubled buffer (a guided loop's next model input)."""
    def build() -> Launch:
        dt = DTYPES[dtype]
        B = shape[0]
        x = meta(shape, dt)
        model_out = meta((2 * B,) + tuple(shape[1:]), dt) if cfg else meta(shape, dt)
        fields = dict(x_coef=0.9, eps_coef=0.1, guidance=3.0 if cfg else None, x0_coefs=(1.2, -0.3))
        if noise is not None:
            fields.update(noise_coef=0.2, seed=12345, step_key=7, repeat_noise=repeat)
            if noise.startswith("tensor"):
                fields["noise"] = meta((1 if noise == "tensor1" else B,) + tuple(shape[1:]), dt)
        if mask is not None:
            mask_shape, mask_dtype = mask
            fields.update(orig=meta(shape, dt), orig_coef=0.8, orig_noise_coef=0.6, seed=12345, step_key=7,
                          mask=mask_layout(meta(mask_shape, mask_dtype), tuple(shape)))
            if orig_noise == "tensor":
                fields["orig_noise"] = meta(shape, dt)
        return step_launch(x, model_out, meta(shape, dt), StepArgs(**fields),
                           meta(shape, dt) if x0 else None, meta(shape, dt) if eps_out else None, twice)
    return build


def normals(shape, dtype="fp32") -> Callable[[], Launch]:
    return lambda: noise_launch(meta(shape, DTYPES[dtype]), 12345, 7, 0, 0)


LATENT = (16, 4, 64, 64)  # N = 16384: per-sample size a multiple of 16
ODD = (16, 3, 17, 23)  # N = 1173
VARIANTS = [
    Variant("step fp32 eta 0", step(LATENT), "step", 0),
    Variant("step fp16 eta 0", step(LATENT, "fp16"), "step", 0),
    Variant("step bf16 eta 0", step(LATENT, "bf16"), "step", 0),
    Variant("step fp32 noise tensor", step(LATENT, noise="tensor"), "step", 0),
    Variant("step fp16 noise tensor of batch 1", step(LATENT, "fp16", noise="tensor1"), "step", 0),
    Variant("step fp32 guidance", step(LATENT, cfg=True), "step", 0),
    Variant("step bf16 guidance", step(LATENT, "bf16", cfg=True), "step", 0),
    Variant("step fp32 guidance, x_prev in both halves", step(LATENT, cfg=True, twice=True), "step", 0),
    Variant("step fp32 guidance, in-kernel noise, x_prev in both halves",
            step(LATENT, cfg=True, noise="philox", twice=True), "noise", 0),
    Variant("step fp16 x_prev in both halves, 2**31 + 2**20 elements", step((2**11 + 1, 2**20), "fp16", twice=True),
            "step", 0, "int64 offsets"),
    Variant("step fp16 guidance + pred_x0 + eps", step(LATENT, "fp16", cfg=True, x0=True, eps_out=True), None, 0,
            "two extra outputs"),
    Variant("step fp32 eta 0, N = 1173, B = 16", step(ODD), "step", 0, "N % 16 != 0, B * N % 16 == 0"),
    Variant("step fp32 eta 0, N = 1173, B = 1", step((1,) + ODD[1:]), "step", 3,
            "vector blocks + a 5-element scalar tail"),
    Variant("step fp32 eta 0, B = 70000, N = 32", step((70000, 32)), "step", 0, "B above the grid-y limit"),
    Variant("step fp16 eta 0, 2**31 + 2**20 elements", step((2**11 + 1, 2**20), "fp16"), "step", 0,
            "int64 offsets"),
    Variant("step fp32 in-kernel noise", step(LATENT, noise="philox"), "noise", 0),
    Variant("step fp16 in-kernel noise", step(LATENT, "fp16", noise="philox"), "noise", 0),
    Variant("step bf16 in-kernel noise", step(LATENT, "bf16", noise="philox"), "noise", 0),
    Variant("step fp32 in-kernel noise, (4096, 32)", step((4096, 32), noise="philox"), "noise", 0),
    Variant("step fp32 in-kernel noise, N = 1173", step(ODD, noise="philox"), None, 0,
            "N % 4 != 0: one Philox call per element"),
    Variant("paint fp32 run mask (B,1,H,W), two noise streams",
            step(LATENT, noise="philox", mask=((16, 1, 64, 64), torch.float32)), "paint", 0),
    Variant("paint fp16 run mask (1,1,H,W) bool, two noise streams",
            step(LATENT, "fp16", noise="philox", mask=((1, 1, 64, 64), torch.bool)), "paint", 1,
            "bool mask: one 64-bit load"),
    Variant("paint fp32 run mask (B,C,1,1), two noise streams",
            step(LATENT, noise="philox", mask=((16, 4, 1, 1), torch.float32)), "paint", 2,
            "one mask load per 4 elements"),
    Variant("paint fp32 dense mask, noise tensors",
            step(LATENT, noise="tensor", mask=(LATENT, torch.float32), orig_noise="tensor"), "paint", 0),
    Variant("paint fp16 run mask, 2 samples of 2**31 + 16 elements",
            step((2, 2**31 + 16), "fp16", noise="philox", mask=((1, 1), torch.float16)), None, None,
            "int64 sample coordinates; mask gathered without vectors"),
    Variant("normals fp32", normals(LATENT), "noise", 0),
    Variant("normals fp16", normals(LATENT, "fp16"), "noise", 0),
    Variant("normals fp32, keys read from memory",
            lambda: noise_launch(meta(LATENT), meta((), torch.int64), 7, 0, meta((), torch.int64)), "noise", 2,
            "a captured loop's draw: seed and offset are two 8-byte loads"),
]


def specialise_and_compile(launch: Launch, arch: int):
    """triton.compile of `launch` for sm_<arch>, specialised as JITFunction.run would."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def read_cubin(cubin: bytes) -> tuple[dict, list[str]]:
    """(resource usage, SASS opcodes) of a one-kernel cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "-res-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(NVIDIA_BIN, "nvdisasm"), "-c", path],
                              capture_output=True, text=True, check=True).stdout
    resources = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    opcodes = [m.group(1) for m in map(_INSTRUCTION.match, sass.splitlines()) if m]
    return resources, [op for op in opcodes if op != "NOP"]


def row(variant: Variant, arch: int) -> dict:
    """Compile one variant and measure it."""
    launch = variant.build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = specialise_and_compile(launch, arch)
    resources, opcodes = read_cubin(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    threads = compiled.metadata.num_warps * 32
    per_thread = launch.kwargs["BLOCK"] // threads
    counts = collections.Counter(opcodes)
    global_ops = {op: n for op, n in counts.items() if op.startswith(("LDG", "STG"))}
    wide = sum(n for op, n in global_ops.items() if ".128" in op)
    return {
        "arch": f"sm_{arch}",
        "variant": variant.name,
        "budget": variant.budget,
        "limits": BUDGETS.get(variant.budget),
        "note": variant.note,
        "regs": resources.get("reg", 0),
        "stack": resources.get("stack", 0),
        "local": resources.get("local", 0),
        "shared": resources.get("shared", 0),
        "spill_ops": sum(n for op, n in counts.items() if op.startswith(("LDL", "STL"))),
        "sass": len(opcodes),
        "elems_per_thread": per_thread,
        "sass_per_elem": round(len(opcodes) / per_thread, 2),
        "global_128": wide,
        "global_narrow": sum(global_ops.values()) - wide,
        "max_narrow": variant.max_narrow,
        "shared_ops": sum(n for op, n in counts.items() if op.startswith(("LDS", "STS"))),
        "mufu": {op.split(".")[1]: n for op, n in sorted(counts.items()) if op.startswith("MUFU.")},
        "calls": sum(n for op, n in counts.items() if op.startswith("CALL")),
        "bf16_rn_cvt": "cvt.rn.bf16" in ptx,
        "fp_fusion": compiled.metadata.enable_fp_fusion,
        "warnings": [str(w.message)[:200] for w in caught],
    }


# Exit status when this Triton lacks the runtime internals used here (the test skips then).
MISSING_INTERNALS = 3


def main(argv=None) -> int:
    if create_function_from_signature is None or not hasattr(JITFunction, "_pack_args"):
        print(f"triton {triton.__version__} has no create_function_from_signature / JITFunction._pack_args "
              "to specialise launches with", file=sys.stderr)
        return MISSING_INTERNALS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--only", help="compile only variants whose name contains this text")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiles run at once")
    opts = parser.parse_args(argv)
    todo = [(i, arch) for arch in opts.arch for i, v in enumerate(VARIANTS) if not opts.only or opts.only in v.name]
    # Forked workers inherit the imported modules; each compile is independent.
    with concurrent.futures.ProcessPoolExecutor(opts.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for r in pool.map(_row_of, todo):
            if opts.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"{r['arch']} {r['variant']:<55} regs {r['regs']:3d}  SASS/elem {r['sass_per_elem']:6.2f}  "
                      f"128-bit {r['global_128']:2d} narrow {r['global_narrow']:2d}  shared {r['shared']:5d}  "
                      f"stack {r['stack']}  MUFU {sum(r['mufu'].values())}", flush=True)
    return 0


def _row_of(job: tuple[int, int]) -> dict:
    index, arch = job
    return row(VARIANTS[index], arch)

if __name__ == "__main__":
    sys.exit(main())
