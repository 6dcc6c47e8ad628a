"""Triton kernels of ddim-fused and their launchers (GPU code only).

Installed as `ddim_fused.kernels`. Import it after setting TRITON_INTERPRET=1 to run
the kernels on CPU tensors through Triton's interpreter.
"""
from .ddim_step import MaskLayout, ddim_step, launch_ddim_step, mask_layout
from .noise import NOISE_STREAMS, keyed_normal

__all__ = ["MaskLayout", "NOISE_STREAMS", "ddim_step", "keyed_normal", "launch_ddim_step", "mask_layout"]
