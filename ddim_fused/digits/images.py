"""Writing 8x8 digits as upscaled PNG grids with Pillow."""
from __future__ import annotations

import numpy as np
import torch

from ..atomic import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Digits in [-1, 1] as grey levels (values outside are clipped).

    Args:
        x: (N, 1, H, W) or (N, H, W) float tensor.

    Returns:
        (N, H, W) uint8 array, 0 for -1 (black background) and 255 for 1.
    """
    x = x.detach().float().cpu()
    if x.dim() == 4:
        x = x[:, 0]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def grid_image(x: torch.Tensor, ncols: int, scale: int = 8, pad: int = 1):
    """Tile digits row by row into one upscaled (nearest neighbour) image.

    Args:
        x: (N, 1, H, W) or (N, H, W) float tensor in [-1, 1].
        ncols: digits per row.
        scale: upscaling factor (each pixel becomes scale x scale).
        pad: gap between digits, in source pixels (drawn as mid-grey).

    Returns:
        PIL.Image in mode "L" of size (ncols*(W+pad)+pad)*scale by (nrows*(H+pad)+pad)*scale.
    """
    from PIL import Image  # noqa: PLC0415 - only the CLI writes images

    tiles = to_uint8(x)
    n, h, w = tiles.shape
    nrows = -(-n // ncols)
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad), 96, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top:top + h, left:left + w] = tile
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray(canvas)  # 2-D uint8: mode "L"


def save_grid(x: torch.Tensor, path, ncols: int, scale: int = 8) -> tuple[int, int]:
    """Write digits as a PNG grid (see grid_image); returns the image's (width, height).

    The file is written to an exclusive temporary file and renamed over `path`, so a failed
    write (a full disk) leaves the previous file untouched.
    """
    image = grid_image(x, ncols, scale)
    atomic_write(path, lambda f: image.save(f, format="PNG"))
    return image.size
