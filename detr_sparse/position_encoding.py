"""Sine position embedding of a padded feature map (DETR, "Attention is all you need" in 2-D)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """mask (B, H, W) bool, True at padding -> (B, 2 * num_pos_feats, H, W).

    Coordinates are cumulative counts over valid pixels, so padding does not shift them;
    with `normalize` they are scaled to [0, scale] by each image's own valid extent.
    Channels: first y then x, each interleaving sin and cos."""

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0,
                 normalize: bool = True, scale: float = 2 * math.pi, offset: float = 0.0):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset  # Deformable DETR uses -0.5

    def forward(self, mask: Tensor) -> Tensor:
        valid = (~mask).to(torch.float32)
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y = (y + self.offset) / (y[:, -1:, :] + eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x[..., None] / dim_t
        pos_y = y[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
