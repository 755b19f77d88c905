"""Pyramid Vision Transformer v1 (Wang et al. 2021) as a detection backbone, with the same
named maps as the ResNet backbone (`res2` .. `res5` at strides 4 .. 32)."""
from __future__ import annotations

import math
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from ..transformers.attention import attention
from .swin import ChunkedMLP
from .levels import LEVEL_NAMES, check_backbone_args, checked_freeze_at
from .vit import (load_converted_state, per_image_embedding, resize_pos_embed, token_sizes, valid_tokens,
                  zero_outside)

_DEPTHS = {"pvt_t": [2, 2, 2, 2], "pvt_s": [3, 4, 6, 3]}
_DIMS, _HEADS, _MLP_RATIOS = [64, 128, 320, 512], [1, 2, 5, 8], [8, 8, 4, 4]
_SR_RATIOS, _PATCH = [8, 4, 2, 1], [4, 2, 2, 2]


class PatchEmbed(nn.Module):
    """Convolution with kernel = stride, then LayerNorm:
    x (B, C, H, W) -> tokens (B, H/s * W/s, C'), grid (H/s, W/s)."""

    def __init__(self, in_channels: int, dim: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, stride, stride)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        return self.norm(x.flatten(2).transpose(1, 2)), tuple(x.shape[-2:])


class SRAttention(nn.Module):
    """Spatial-reduction attention: every token queries keys/values pooled over sr x sr
    tokens by a strided convolution (then LayerNorm), so stage 1 attends to 1/64 of its map.
    x (B, N, C) on an h x w grid -> (B, N, C). `keep` (N,) or (B, N): tokens inside the
    image, the others are zeroed before the reduction; `key_mask` (1 or B, 1, 1, N / sr^2):
    keys with some image inside them. The queries may be other tokens than the map's
    (`attend`): DGE queries pooled tokens against the full map's keys."""

    def __init__(self, dim: int, heads: int, sr_ratio: int):
        super().__init__()
        self.heads, self.sr_ratio = heads, sr_ratio
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def keys_values(self, x: Tensor, grid: tuple[int, int], keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """x (B, N, C) -> keys, values (B, heads, N / sr^2, C / heads)."""
        b, n, c = x.shape
        if self.sr_ratio > 1:
            if keep is not None:
                x = x * keep.unsqueeze(-1)  # as if the map were zero-padded, whatever the amount
            # the tokens as a channels-last map (a view): 2-3x faster convolution than NCHW plus its copy
            x = self.norm(self.sr(x.view(b, *grid, c).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2))
        return self.kv(x).view(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(self, queries: Tensor, keys_values: tuple[Tensor, Tensor], key_mask: Tensor | None) -> Tensor:
        """queries (B, Q, C) -> (B, Q, C)."""
        b, q_len, c = queries.shape
        q = self.q(queries).view(b, q_len, self.heads, c // self.heads).transpose(1, 2)
        out = attention(q, *keys_values, key_mask)
        return self.proj(out.transpose(1, 2).reshape(b, q_len, c))

    def forward(self, x: Tensor, grid: tuple[int, int], keep: Tensor | None,
                key_mask: Tensor | None) -> Tensor:
        return self.attend(x, self.keys_values(x, grid, keep), key_mask)


class PVTBlock(nn.Module):
    """Pre-norm transformer block with SR attention; x (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, sr_ratio: int, drop_path: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = SRAttention(dim, heads, sr_ratio)
        self.mlp = ChunkedMLP(dim, [dim * mlp_ratio, dim], activation_layer=nn.GELU, inplace=None)
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward_queries(self, queries: Tensor, x: Tensor, grid: tuple[int, int], keep: Tensor | None,
                        key_mask: Tensor | None, change: bool = False) -> Tensor:
        """The block's update of queries (B, Q, C) (raw, not normalised) attending to the
        keys / values of the map x (B, N, C): queries = x is the plain block. `change`:
        return the queries' change (attention + MLP terms) instead of the updated queries."""
        normed = self.norm1(x)
        q = normed if queries is x else self.norm1(queries)
        attended = self.drop_path(self.attn.attend(q, self.attn.keys_values(normed, grid, keep), key_mask))
        moved = queries + attended
        mlp = self.drop_path(self.mlp(self.norm2(moved)))
        return attended + mlp if change else moved + mlp

    def forward(self, x: Tensor, grid: tuple[int, int], keep: Tensor | None,
                key_mask: Tensor | None) -> Tensor:
        return self.forward_queries(x, x, grid, keep, key_mask)


class PVTStage(nn.Module):
    """Patch embedding, position embedding (learned on the pretraining grid), blocks."""

    def __init__(self, in_channels: int, index: int, depth: int, drop_paths: list[float],
                 pretrain_grid: int):
        super().__init__()
        dim, self.sr_ratio = _DIMS[index], _SR_RATIOS[index]
        self.patch_embed = PatchEmbed(in_channels, dim, _PATCH[index])
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, pretrain_grid ** 2, dim), std=0.02))
        self.blocks = nn.ModuleList(PVTBlock(dim, _HEADS[index], _MLP_RATIOS[index], self.sr_ratio, p)
                                    for p in drop_paths)

    def embed(self, x: Tensor, valid: list[tuple[int, int]]
              ) -> tuple[Tensor, tuple[int, int], Tensor | None, Tensor | None]:
        """x (B, C, H, W), zero outside each image's top-left valid area -> tokens (B, h*w,
        C') with position embeddings, the grid (h, w), the (B, h*w) mask of each image's
        valid[i] tokens and the (B, 1, 1, keys) mask of the keys with some image in them
        (None: all)."""
        tokens, grid = self.patch_embed(x)
        # resized to each image's valid grid, not the padded one, so padding does not shift it
        tokens = tokens + per_image_embedding(
            lambda size: resize_pos_embed(self.pos_embed, size, mode="bilinear"), grid, valid)
        keep = valid_tokens(grid, valid, x.device)
        sr = self.sr_ratio
        key_mask = valid_tokens((grid[0] // sr, grid[1] // sr), token_sizes(valid, sr), x.device)
        return tokens, grid, keep, None if key_mask is None else key_mask[:, None, None, :]

    def forward(self, x: Tensor, valid: list[tuple[int, int]]) -> tuple[Tensor, tuple[int, int], Tensor | None]:
        """-> tokens (B, h*w, C'), the grid (h, w), each image's valid-token mask or None."""
        tokens, grid, keep, key_mask = self.embed(x, valid)
        for block in self.blocks:
            tokens = block(tokens, grid, keep, key_mask)
        return tokens, grid, keep


class PVTBackbone(nn.Module):
    """forward(x: (B, 3, H, W)) -> OrderedDict of the requested maps, each (B, C, ceil(H / s),
    ceil(W / s)) with C = 64, 128, 320, 512 at s = 4, 8, 16, 32, in channels-last memory as
    ResNet's (the normalised tokens' view, copied only when cropped: a transposing copy was
    2-4% of the backbone's time).

    The image is zero-padded at the bottom/right to a multiple of `pad_multiple` (32) so
    every stage divides. What holds: the maps inside the image do not depend on that
    padding's amount (tested against 64), because each stage sees its padded tokens as
    zeros (before the next patch embedding and before the key/value reduction), never
    attends to keys made of padding only, and resizes its position embedding to the valid
    ceil(H / s) x ceil(W / s) grid. Outputs are cropped to that grid. Padding the caller
    adds (a batch of mixed sizes) is handled the same way when `sizes` names each image's
    size; without it, it is image content, as for any backbone.
    Each output has its own LayerNorm (as Swin's); classification's class token and final
    norm are not built. `freeze_at`: 0 none, 1 the first patch embedding, 2 it and res2,
    3 up to res3, ...; -1 means 0.
    """

    pad_multiple = 32
    takes_sizes = True  # a padded batch's image sizes: forward(x, sizes)

    def __init__(self, name: str = "pvt_s", out_features: tuple[str, ...] = tuple(LEVEL_NAMES),
                 pretrained: str = "", drop_path_rate: float = 0.1, freeze_at: int = -1,
                 pretrain_size: int = 224):
        super().__init__()
        check_backbone_args(name, _DEPTHS, out_features)
        depths = _DEPTHS[name]
        last = max(LEVEL_NAMES.index(n) for n in out_features)
        # the schedule spans all 4 stages even when fewer are built (as in Swin)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i in range(last + 1):
            first, stride = sum(depths[:i]), 4 * 2 ** i
            self.stages.append(PVTStage(_DIMS[i - 1] if i else 3, i, depths[i],
                                        rates[first:first + depths[i]], pretrain_size // stride))
        for m in self.modules():
            if isinstance(m, nn.Linear):  # PVT's initialisation
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.out_features = tuple(n for n in LEVEL_NAMES if n in out_features)
        self.channels = {n: _DIMS[LEVEL_NAMES.index(n)] for n in self.out_features}
        self.strides = {n: 4 * 2 ** LEVEL_NAMES.index(n) for n in self.out_features}
        self.norms = nn.ModuleDict({n: nn.LayerNorm(self.channels[n], eps=1e-6) for n in self.out_features})
        if pretrained:
            self.load_pretrained(pretrained)
        freeze_at = checked_freeze_at(freeze_at, last)
        frozen = [self.stages[0].pos_embed, *self.stages[0].patch_embed.parameters()] if freeze_at else []
        for i in range(freeze_at - 1):  # a frozen stage includes the patch embedding feeding it
            frozen += [*self.stages[i].parameters(),
                       *(self.norms[LEVEL_NAMES[i]].parameters() if LEVEL_NAMES[i] in self.norms else [])]
        for p in frozen:
            p.requires_grad_(False)

    def load_pretrained(self, path: str) -> None:
        """Load an official PVT v1 state dict (`patch_embed1.proj.weight`, `pos_embed1`,
        `block1.0.attn.q.weight`, ...); its class token, final norm, head and the stages not
        built are ignored. The output LayerNorms keep their initialisation."""
        wanted = {k for k in self.state_dict() if not self.fresh(k)}
        load_converted_state(self, path, wanted, self._from_checkpoint, "PVT v1 state dict of the same size")

    def fresh(self, key: str) -> bool:
        """Parameters a classification checkpoint does not hold (the output norms)."""
        return key.startswith("norms.")

    def _from_checkpoint(self, key: str, value: Tensor) -> tuple[str, Tensor] | None:
        if key.startswith(("cls_token", "norm.", "head.")):
            return None
        match = re.fullmatch(r"(patch_embed|pos_embed|block)(\d)(.*)", key)
        if match is None:
            return key, value
        part, stage, rest = match.group(1), int(match.group(2)) - 1, match.group(3)
        if stage >= len(self.stages):
            return None
        if part == "pos_embed":  # stage 4's starts with the class token's
            side = math.isqrt(self.stages[stage].pos_embed.shape[1])
            value = resize_pos_embed(value[:, value.shape[1] - math.isqrt(value.shape[1]) ** 2:],
                                     (side, side), mode="bilinear")
        rest = rest.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.3.")
        return f"stages.{stage}.{'blocks' if part == 'block' else part}{rest}", value

    def output_shape(self) -> dict[str, dict[str, int]]:
        return {n: {"channels": self.channels[n], "stride": self.strides[n]} for n in self.out_features}

    def run_stage(self, stage: PVTStage, x: Tensor, valid: list[tuple[int, int]]):
        return stage(x, valid)

    def forward(self, x: Tensor, sizes: list[tuple[int, int]] | None = None) -> "OrderedDict[str, Tensor]":
        """x (B, 3, H, W); sizes: each image's (h, w) inside x (a padded batch), or None when
        every image fills x. Inside each image the maps do not depend on the padding."""
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        x, sizes = zero_outside(x, sizes)  # the patch embedding must see zeros beyond each image
        # channels-last maps throughout: the strided convolutions run 2-3x faster on a CPU and the
        # tokens are their views (no transposing copies)
        x = F.pad(x, (0, -w % self.pad_multiple, 0, -h % self.pad_multiple)).contiguous(
            memory_format=torch.channels_last)
        out = OrderedDict()
        for name, stage in zip(LEVEL_NAMES, self.stages):
            stride = 4 * 2 ** LEVEL_NAMES.index(name)
            tokens, grid, keep = self.run_stage(stage, x, token_sizes(sizes, stride))
            if name in self.norms:
                out[name] = (self.norms[name](tokens).view(b, *grid, -1)[:, :-(-h // stride), :-(-w // stride)]
                             .permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
            if keep is not None:  # the next patch embedding then sees zero padding
                tokens = tokens * keep.unsqueeze(-1)
            x = tokens.view(b, *grid, -1).permute(0, 3, 1, 2)
        return out
