"""DETR's panoptic mask head (Carion et al. 2020, section 4.4): every decoder output attends
over the encoder memory laid out as a 2-D map (multi-head attention maps, no values), and a
small FPN-style convolution stack turns the maps plus the projected backbone features into
one mask logit map per query at stride 4. PnP-DETR reaches the same map through its
reverse projection (detr_sparse.sparsity.pnp.reverse_project)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class AttentionMaps(nn.Module):
    """query (B, Q, C), memory (B, C, H, W), padding mask (B, H, W) True at padding ->
    attention weights (B, Q, heads, H, W). As DETR's MHAttentionMap, one softmax per query
    over heads x valid positions together: the heads share one unit of mass (not one each)."""

    def __init__(self, dim: int = 256, hidden: int = 256, heads: int = 8):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, hidden)
        self.k = nn.Linear(dim, hidden)
        for linear in (self.q, self.k):  # DETR's initialisation
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.scale = (hidden / heads) ** -0.5

    def forward(self, query: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        b, q_len = query.shape[:2]
        h, w = memory.shape[-2:]
        q = self.q(query).view(b, q_len, self.heads, -1) * self.scale
        k = self.k(memory.flatten(2).transpose(1, 2)).view(b, h * w, self.heads, -1)
        logits = torch.einsum("bqnc,bpnc->bqnp", q, k)
        logits = logits.masked_fill(mask.flatten(1)[:, None, None, :], float("-inf"))
        return logits.flatten(2).softmax(-1).view(b, q_len, self.heads, h, w)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(math.gcd(8, cout), cout), nn.ReLU())


class MaskHead(nn.Module):
    """features (B, C, H, W) at the attention maps' stride, maps (B, Q, heads, H, W), and
    finer backbone maps [(B, C_i, H_i, W_i)] coarse to fine (e.g. res4, res3, res2) ->
    mask logits (B, Q, H_last, W_last). Each query runs the stack on [features; its maps]."""

    def __init__(self, dim: int, heads: int, fpn_channels: list[int]):
        super().__init__()
        # halving widths, as DETR's: dim/2 after the first stack, then /2 after each FPN level
        widths = [dim >> (i + 1) for i in range(len(fpn_channels) + 1)]
        self.first = nn.Sequential(_block(dim + heads, dim + heads), _block(dim + heads, widths[0]))
        self.adapters = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(fpn_channels, widths))
        self.blocks = nn.ModuleList(_block(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Conv2d(widths[-1], 1, 3, padding=1)
        for m in self.modules():  # DETR's initialisation of the mask head's convolutions
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: Tensor, maps: Tensor, fpn: list[Tensor]) -> Tensor:
        b, q = maps.shape[:2]
        x = torch.cat([features[:, None].expand(-1, q, -1, -1, -1), maps], 2).flatten(0, 1)
        x = self.first(x)
        for i, level in enumerate(fpn):
            skip = self.adapters[i](level).repeat_interleave(q, dim=0)
            x = self.blocks[i](skip + F.interpolate(x, size=skip.shape[-2:], mode="nearest"))
        return self.out(x).view(b, q, *x.shape[-2:])


class PanopticHead(nn.Module):
    """DETR's segmentation branch: the last decoder layer's outputs attend over the encoder
    memory map, and the mask head turns the maps into mask logits at the finest FPN map's
    stride. forward(hs (B, Q, C), memory (B, C, h, w), mask (B, h, w) True at padding,
    src (B, C, h, w) the projected backbone map, fpn [(B, C_i, H_i, W_i)] coarse to fine)
    -> (B, Q, H_last, W_last) mask logits."""

    def __init__(self, dim: int, heads: int, fpn_channels: list[int]):
        super().__init__()
        self.attention = AttentionMaps(dim, dim, heads)
        self.mask_head = MaskHead(dim, heads, fpn_channels)

    def forward(self, hs: Tensor, memory: Tensor, mask: Tensor, src: Tensor, fpn: list[Tensor]) -> Tensor:
        return self.mask_head(src, self.attention(hs, memory, mask), fpn)
