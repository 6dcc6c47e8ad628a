"""A compact class-conditional UNet eps-model for 8x8 single-channel digits."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

N_CLASSES = 10
NULL_CLASS = 10  # extra class index: the unconditional input for classifier-free guidance


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer time steps (Transformer / DDPM style).

    Args:
        t: (B,) long or float time steps.
        dim: even embedding width.

    Returns:
        (B, dim) float32 embedding.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm/SiLU; the embedding sets a per-channel scale and shift."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class DigitsUNet(nn.Module):
    """UNet over 8x8 -> 4x4 -> 2x2 with one residual block per level on each side.

    Args:
        channels: widths at 8x8, 4x4 and 2x2.
        emb_dim: width of the summed time + class embedding.
        n_classes: number of real classes; index n_classes is the null class.
    """

    def __init__(self, channels=(32, 64, 96), emb_dim: int = 128, n_classes: int = N_CLASSES):
        super().__init__()
        c1, c2, c3 = channels
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(n_classes + 1, emb_dim)
        self.inp = nn.Conv2d(1, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim)
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = ResBlock(c2, c2, emb_dim)
        self.pool2 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.mid = ResBlock(c3, c3, emb_dim)
        self.up2 = ResBlock(c3 + c2, c2, emb_dim)
        self.up1 = ResBlock(c2 + c1, c1, emb_dim)
        self.out_norm = nn.GroupNorm(8, c1)
        self.out = nn.Conv2d(c1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps prediction.

        Args:
            x: (B, 1, 8, 8) noisy digits.
            t: (B,) long time steps in [0, T).
            y: (B,) long class labels in [0, n_classes]; n_classes means unconditional.

        Returns:
            (B, 1, 8, 8) predicted noise, in x's dtype.
        """
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim).to(x.dtype)) + self.class_emb(y)
        h1 = self.down1(self.inp(x), emb)
        h2 = self.down2(self.pool1(h1), emb)
        h = self.mid(self.pool2(h2), emb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up2(torch.cat([h, h2], dim=1), emb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))
