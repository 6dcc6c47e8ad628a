"""The kernel's keyed Philox normal stream, reproduced on the host.

Same counters, key, uniform mapping and Box-Muller as `ddim_fused/kernels/noise.py`, so the
torch backend and the Triton kernel draw the same noise for one seed (bitwise in the
integers, to float rounding of log/cos/sin in the normals). On the CPU the integer half
runs in a small C kernel (`ddim_fused.native`) when one can be built; elsewhere,
or without a C compiler, in torch integer ops. Both give the same bits.
"""
from __future__ import annotations

import math

import torch

from .native import keyed_normal_native, library
from .validation import check_int

NOISE_STREAMS = {"step": 0, "orig": 1, "initial": 2}

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def philox4x32(c0, c1, c2, c3, seed, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values; key = (seed lo32, seed hi32).

    seed: an int, or a 0-d int64 tensor on the counters' device (no host sync).

    Returns:
        four int64 tensors of uint32 values.
    """
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(rounds):
        # The products can pass 2**63 and wrap in int64, but wrapping keeps their low 64
        # bits, which are all that the two 32-bit halves (mulhi, mullo) are made of.
        prod_b, prod_a = c2 * _ROUND_B, c0 * _ROUND_A
        c0 = (prod_b >> 32).bitwise_and_(_MASK32).bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = (prod_a >> 32).bitwise_and_(_MASK32).bitwise_xor_(c3).bitwise_xor_(k1)
        c1, c3 = prod_b.bitwise_and_(_MASK32), prod_a.bitwise_and_(_MASK32)
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def keyed_normal_torch(
    batch: int,
    numel: int,
    seed,
    step_key=0,
    stream: str = "step",
    sample_offset=0,
    *,
    repeat: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Noise of the kernel's keyed stream for `batch` samples of `numel` elements.

    Args:
        batch: number of samples B; sample b is keyed by sample_offset + b (0 if repeat).
        numel: elements per sample.
        seed: int in [0, 2**63), or a 0-d int64 tensor on `device` holding one. A tensor
            key is never read on the host (no sync; its range is the caller's to keep),
            so the draw can be captured in a CUDA graph and replayed with new keys; it
            gives the same bits as the int.
        step_key: DDIM step index, or a sequence of K of them to draw K steps' noise in
            one call (the same values as K separate calls, for far fewer torch ops).
        stream: "step", "orig" or "initial".
        sample_offset: global index of the first sample, an int or a 0-d int64 tensor
            as seed; keys use its low 32 bits, as the kernel does (so do step keys).

    Returns:
        float32 tensor of shape (B, numel), or (K, B, numel) for a sequence of step keys.
    """
    batch = check_int("batch", batch, 0, 2**62)
    numel = check_int("numel", numel, 0, 2**62)
    if stream not in NOISE_STREAMS:
        raise ValueError(f"stream must be one of {', '.join(map(repr, NOISE_STREAMS))}, got {stream!r}")
    device = torch.device(device)
    seed = _key("seed", seed, 2**63 - 1, device)
    sample_offset = _key("sample_offset", sample_offset, 2**62, device)
    steps = torch.as_tensor(step_key, dtype=torch.int64, device=device)
    if steps.dim() > 1:
        raise ValueError(f"step_key must be an int or a 1-D sequence, got shape {tuple(steps.shape)}")
    on_device_keys = isinstance(seed, torch.Tensor) or isinstance(sample_offset, torch.Tensor)
    lib = library() if device.type == "cpu" and not on_device_keys else None
    if lib is None:
        normals = _keyed_normal_ops(batch, numel, seed, steps, NOISE_STREAMS[stream], sample_offset, repeat)
    else:
        rows = (steps.numel(), batch)
        normals = torch.empty(*rows, numel)
        samples = torch.zeros(batch, dtype=torch.int64) if repeat else torch.arange(sample_offset,
                                                                                     sample_offset + batch)
        # Row (k, b) is keyed by (sample b, step k); expand + reshape is far cheaper than repeat.
        keyed_normal_native(lib, normals.view(rows[0] * batch, numel), samples.expand(rows).reshape(-1),
                            steps.view(-1, 1).expand(rows).reshape(-1), NOISE_STREAMS[stream], seed)
    return normals if steps.dim() else normals[0]


def _key(name: str, value, high: int, device: torch.device):
    """An int key checked to [0, high], or a 0-d int64 tensor key on `device` (checked for kind only)."""
    if not isinstance(value, torch.Tensor):
        return check_int(name, value, 0, high)
    same_device = value.device.type == device.type and device.index in (None, value.device.index)
    if value.dim() != 0 or value.dtype != torch.int64 or not same_device:
        raise ValueError(f"{name} as a tensor must be a 0-d torch.int64 tensor on {device}, got "
                         f"shape {tuple(value.shape)}, {value.dtype} on {value.device}")
    return value


def _keyed_normal_ops(batch: int, numel: int, seed, steps: torch.Tensor, stream_id: int, sample_offset,
                      repeat: bool) -> torch.Tensor:
    """keyed_normal_torch in torch ops on steps' device: (K, B, numel) for K = steps.numel().

    seed and sample_offset: ints or 0-d int64 tensors on that device.
    """
    device = steps.device
    n_counters = (numel + 3) // 4
    counter = torch.arange(n_counters, device=device, dtype=torch.int64)
    keys = torch.zeros(batch, 1, device=device, dtype=torch.int64)
    if not repeat:
        # Offset added after arange, so a tensor offset needs no host read.
        keys += (torch.arange(batch, device=device, dtype=torch.int64) + sample_offset).view(batch, 1)
    shape = (steps.numel(), batch, n_counters)
    c0 = (counter & _MASK32).expand(shape)
    c1 = (keys & _MASK32).expand(shape)
    c2 = (steps.view(-1, 1, 1) & _MASK32).expand(shape)
    c3 = ((counter >> 32) * 4 + stream_id).expand(shape)
    r0, r1, r2, r3 = philox4x32(c0, c1, c2, c3, seed)
    u0, u1, u2, u3 = (_uniform_open(r) for r in (r0, r1, r2, r3))
    rad_a = torch.sqrt(-2.0 * torch.log(u0))
    rad_b = torch.sqrt(-2.0 * torch.log(u2))
    angle_a, angle_b = (2 * math.pi) * u1, (2 * math.pi) * u3
    normals = torch.stack(
        (rad_a * torch.cos(angle_a), rad_a * torch.sin(angle_a), rad_b * torch.cos(angle_b), rad_b * torch.sin(angle_b)),
        dim=-1,
    )
    return normals.reshape(shape[:2] + (4 * n_counters,))[..., :numel].contiguous()


def _uniform_open(bits: torch.Tensor) -> torch.Tensor:
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)
