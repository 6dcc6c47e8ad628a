"""Compile the Triton kernels for real GPUs with the ptxas shipped in the triton wheel.

Run without TRITON_INTERPRET (tests/test_kernel_compiles.py starts it in a subprocess):
the interpreter hands out plain Python functions instead of compilable kernels.
Prints one line per compiled variant; exits non-zero on the first failure.
"""
import sys

import triton
from triton.backends.compiler import GPUTarget

from ddim_fused.kernels.ddim_step import _ddim_step_kernel
from ddim_fused.kernels.noise import _keyed_normal_kernel

FLOAT_ARGS = {"x_coef", "eps_coef", "noise_coef", "x0_x_coef", "x0_eps_coef", "guidance", "orig_coef", "orig_noise_coef"}
VARIANTS = {
    "fp32-plain": ("fp32", "fp32", dict(HAS_CFG=False, NOISE_MODE=0, REPEAT_NOISE=False, STORE_X0=False,
                                        STORE_EPS=False, MASK_MODE=0, ORIG_NOISE_MODE=0)),
    "bf16-everything-philox": ("bf16", "i1", dict(HAS_CFG=True, NOISE_MODE=2, REPEAT_NOISE=True, STORE_X0=True,
                                                  STORE_EPS=True, MASK_MODE=2, ORIG_NOISE_MODE=2)),
    "fp16-tensors-dense-mask": ("fp16", "fp16", dict(HAS_CFG=False, NOISE_MODE=1, REPEAT_NOISE=False,
                                                     STORE_X0=True, STORE_EPS=False, MASK_MODE=1, ORIG_NOISE_MODE=1)),
}


def step_signature(dtype: str, mask_dtype: str) -> dict:
    sig = {}
    for name in _ddim_step_kernel.arg_names:
        if name.endswith("_ptr"):
            sig[name] = "*" + (mask_dtype if name == "mask_ptr" else dtype)
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        elif name.isupper() and len(name) > 1:
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


def main() -> int:
    for arch in (90, 80):
        target = GPUTarget("cuda", arch, 32)
        for label, (dtype, mask_dtype, flags) in VARIANTS.items():
            src = triton.compiler.ASTSource(_ddim_step_kernel, step_signature(dtype, mask_dtype), dict(flags, BLOCK=1024))
            ptx = triton.compile(src, target=target).asm["ptx"]
            print(f"sm_{arch} ddim_step {label}: {len(ptx.splitlines())} PTX lines")
        for dtype in ("fp32", "bf16"):
            sig = {"out_ptr": "*" + dtype, "N": "i32", "seed": "i64", "step_key": "i32", "stream": "i32",
                   "sample_offset": "i32", "BLOCK": "constexpr"}
            ptx = triton.compile(triton.compiler.ASTSource(_keyed_normal_kernel, sig, {"BLOCK": 1024}), target=target).asm["ptx"]
            print(f"sm_{arch} keyed_normal {dtype}: {len(ptx.splitlines())} PTX lines, mul.hi {'mul.hi' in ptx}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
