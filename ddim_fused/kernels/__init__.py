"""Triton kernels of ddim-fused and their launchers (GPU code only).

`ddim_fused.backend` is the one module that imports it. Import it after setting TRITON_INTERPRET=1 to run the kernels on CPU tensors
through Triton's interpreter.
"""
from .bound_step import bind_ddim_step, launch_step, launcher_for
from .ddim_step import launch_ddim_step
from .noise import keyed_normal

__all__ = ["bind_ddim_step", "keyed_normal", "launch_ddim_step", "launch_step", "launcher_for"]
