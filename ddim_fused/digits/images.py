"""Writing digits (and other small grey or RGB images) as upscaled PNG grids with Pillow."""
from __future__ import annotations

import numpy as np
import torch

from ..atomic import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] as 8-bit levels (values outside are clipped), as diffusers' VaeImageProcessor
    rounds them: (x / 2 + 0.5) clamped to [0, 1], times 255, rounded half to even.

    Args:
        x: (N, 1, H, W) or (N, H, W) grey, or (N, 3, H, W) RGB float tensor; or (N, H, W, 3)
            uint8 RGB pixels, returned as they are.

    Returns:
        (N, H, W) uint8 array (grey), or (N, H, W, 3) (RGB); 0 for -1 and 255 for 1.
    """
    if x.dtype == torch.uint8:
        return x.detach().cpu().numpy()
    # On x's device: a GPU batch crosses to the host as bytes, a quarter of its floats.
    x = (x.detach() * 0.5 + 0.5).clamp(0, 1).float()
    if x.dim() == 4:
        x = x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)
    return (x * 255).round().to(torch.uint8).contiguous().cpu().numpy()


def is_image_batch(shape, dtype=None) -> bool:
    """Whether a batch of this shape (and dtype) is grey or RGB images: (N, 1 or 3, H, W) floats,
    or (N, H, W, 3) uint8 RGB pixels."""
    if dtype in (torch.uint8, np.uint8):
        return len(shape) == 4 and shape[3] == 3
    return len(shape) == 4 and shape[1] in (1, 3)


def default_scale(height: int, width: int) -> int:
    """Upscaling that draws small images about 64 pixels wide: 8 for 8x8 digits, 1 from 64 up."""
    return max(1, 64 // max(height, width))


def grid_image(x: torch.Tensor, ncols: int, scale: int = 8, pad: int = 1):
    """Tile images row by row into one upscaled (nearest neighbour) image.

    Args:
        x: (N, 1, H, W), (N, H, W) or (N, 3, H, W) float tensor in [-1, 1], or (N, H, W, 3)
            uint8 RGB pixels.
        ncols: images per row.
        scale: upscaling factor (each pixel becomes scale x scale).
        pad: gap between images, in source pixels (drawn as mid-grey).

    Returns:
        PIL.Image in mode "L" (grey) or "RGB" of size (ncols*(W+pad)+pad)*scale by
        (nrows*(H+pad)+pad)*scale.
    """
    from PIL import Image  # noqa: PLC0415 - only the CLI writes images

    if x.dim() != 3 and not is_image_batch(tuple(x.shape), x.dtype):
        raise ValueError(f"a PNG grid needs images of shape (N, 1 or 3, H, W) or uint8 (N, H, W, 3), got "
                         f"{tuple(x.shape)} {x.dtype}")
    tiles = to_uint8(x)
    n, h, w = tiles.shape[:3]
    nrows = -(-n // ncols)
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad) + tiles.shape[3:], 96, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top:top + h, left:left + w] = tile
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray(canvas)  # 2-D uint8: mode "L"; (H, W, 3): "RGB"


def save_grid(x: torch.Tensor, path, ncols: int, scale: int = 8) -> tuple[int, int]:
    """Write images as a PNG grid (see grid_image); returns the image's (width, height).

    The file is written to an exclusive temporary file and renamed over `path`, so a failed
    write (a full disk) leaves the previous file untouched.
    """
    image = grid_image(x, ncols, scale)
    atomic_write(path, lambda f: image.save(f, format="PNG"))
    return image.size
