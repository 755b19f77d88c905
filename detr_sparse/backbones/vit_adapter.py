"""ViT-Adapter (Chen et al., ICLR 2023) on a plain ViT / DeiT: the backbone SViT is evaluated
with. A small convolutional stem (the spatial prior module) gives multi-scale features c
(strides 8, 16, 32, plus a stride-4 map); the ViT's blocks run in four groups (quarters),
and around each group an interaction exchanges information by multi-scale deformable
attention: the injector lets the ViT tokens read c, the extractor lets c read the ViT
tokens (then a convolutional FFN). The ViT blocks are untouched, so dense ImageNet weights
load as they are. Outputs `res2` .. `res5`: c plus the ViT map resampled to each stride,
batch-normalised, with the ViT's width (192 / 384 channels for DeiT-T / S), for an FPN.

Padding: the input is zero-padded to a multiple of 32 (every stride divides). Tokens and
pixels outside each image are zeroed before every convolution and masked as deformable
attention values, the reference points are pixel positions, and the ViT map is resampled with
zeros beyond each image (the official code's bilinear resampling clamps at the border of the
padded map), so an image's maps do not depend on the padding around it.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from ..transformers.ms_deform_attn import MSDeformAttn
from .vit import ViTBackbone, load_converted_state, read_state, token_sizes, valid_tokens, zero_outside

C_STRIDES = (8, 16, 32)  # the levels of c the interactions exchange (the stride-4 map is not)
ADAPTER_PARTS = ("spm.", "level_embed", "interactions.", "up.", "norms.")  # state-dict prefixes


def _masks(sizes: list[tuple[int, int]], shape: tuple[int, int], stride: int, device) -> Tensor | None:
    """(B, 1, h, w) True inside each image on a stride-`stride` map, or None (all inside)."""
    mask = valid_tokens(shape, token_sizes(sizes, stride), device)
    return None if mask is None else mask.view(-1, 1, *shape)


def _zero_outside(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x * mask


def _centres(shapes: list[tuple[int, int]], device) -> Tensor:
    """(1, sum h*w, 1, 2) normalised (x, y) centres of the tokens of maps `shapes` laid one
    after the other (all covering the same padded image)."""
    points = []
    for h, w in shapes:
        y, x = torch.meshgrid((torch.arange(h, device=device) + 0.5) / h, (torch.arange(w, device=device) + 0.5) / w,
                              indexing="ij")
        points.append(torch.stack([x.flatten(), y.flatten()], -1))
    return torch.cat(points)[None, :, None, :]


class SpatialPrior(nn.Module):
    """Conv stem (3x3 convs, stride 4 after a max-pool) then stride-2 stages: x (B, 3, H, W),
    each image's sizes -> [c1, c2, c3, c4] (B, dim, H / s, W / s) at s = 4, 8, 16, 32."""

    def __init__(self, planes: int, dim: int):
        super().__init__()

        def unit(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.stem = nn.ModuleList([unit(3, planes, 2), unit(planes, planes, 1), unit(planes, planes, 1)])
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.stages = nn.ModuleList([unit(planes, 2 * planes, 2), unit(2 * planes, 4 * planes, 2),
                                     unit(4 * planes, 4 * planes, 2)])
        self.project = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in (planes, 2 * planes, 4 * planes, 4 * planes))

    def forward(self, x: Tensor, sizes: list[tuple[int, int]]) -> list[Tensor]:
        h, w = x.shape[-2:]
        # channels-last throughout (the convolutions run 1.5-2x faster; the maps flatten to
        # tokens without a copy)
        x = x.contiguous(memory_format=torch.channels_last)
        for unit in self.stem:
            x = _zero_outside(unit(x), _masks(sizes, (h // 2, w // 2), 2, x.device))
        maps = [self.pool(x)]  # values >= 0: a zero beyond the image never wins the max
        for stage in self.stages:
            stride = 2 * h // maps[-1].shape[-2]
            maps.append(_zero_outside(stage(maps[-1]), _masks(sizes, (h // stride, w // stride), stride, x.device)))
        return [project(m) for project, m in zip(self.project, maps)]


class ConvFFN(nn.Module):
    """Linear -> 3x3 depthwise convolution on each level's map -> GELU -> Linear over the
    tokens of c (B, S, C), laid level after level on `shapes`, zero outside the images
    (`masks`, per level (B, 1, h, w) or None) before the convolution."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)

    def forward(self, x: Tensor, shapes: list[tuple[int, int]], masks: list[Tensor | None]) -> Tensor:
        x = self.fc1(x)
        b, _, c = x.shape
        levels = x.split([h * w for h, w in shapes], 1)
        # channels-last maps (views of the tokens for one image): the depthwise convolution
        # reads and writes tokens without transposing copies (measured: 5.3 -> 1.0 ms)
        x = torch.cat([self.dwconv(_zero_outside(level.reshape(b, *shape, c).permute(0, 3, 1, 2)
                                                 .contiguous(memory_format=torch.channels_last), mask))
                       .permute(0, 2, 3, 1).reshape(b, -1, c) for level, shape, mask in zip(levels, shapes, masks)], 1)
        return self.fc2(F.gelu(x))


class Injector(nn.Module):
    """ViT tokens (B, N, C) read c by deformable attention over its three levels; the result
    is scaled by a learned per-channel gamma (starting at `init_values`, 0: no change)."""

    def __init__(self, dim: int, heads: int, points: int, init_values: float):
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, len(C_STRIDES), heads, points)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor, reference: Tensor, c: Tensor, shapes: Tensor, starts: Tensor,
                padding: Tensor | None) -> Tensor:
        return x + self.gamma * self.attn(self.query_norm(x), reference, self.feat_norm(c), shapes, starts, padding)


class Extractor(nn.Module):
    """c (B, S, C) reads the ViT tokens by deformable attention (one level), then a ConvFFN."""

    def __init__(self, dim: int, heads: int, points: int, cffn_ratio: float, drop_path: float):
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, 1, heads, points)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, c: Tensor, reference: Tensor, x: Tensor, shape: Tensor, start: Tensor,
                padding: Tensor | None, c_shapes: list[tuple[int, int]], c_masks: list[Tensor | None]) -> Tensor:
        c = c + self.attn(self.query_norm(c), reference, self.feat_norm(x), shape, start, padding)
        return c + self.drop_path(self.ffn(self.ffn_norm(c), c_shapes, c_masks))


class Interaction(nn.Module):
    """One injector before a group of ViT blocks, one extractor after it (three for the last
    group, as the official `extra_extractor`)."""

    def __init__(self, dim: int, heads: int, points: int, cffn_ratio: float, drop_path: float,
                 init_values: float, extractors: int):
        super().__init__()
        self.injector = Injector(dim, heads, points, init_values)
        self.extractors = nn.ModuleList(Extractor(dim, heads, points, cffn_ratio, drop_path)
                                        for _ in range(extractors))


def _resample(x: Tensor, factor: float) -> Tensor:
    """The ViT map x (B, C, h, w), zero beyond the images, to `factor` times its size:
    bilinear upsampling (align_corners=False) that reads zeros beyond the map's bottom/right
    edge as beyond an image's, or the 2x2 mean (what bilinear halving computes on even sizes)."""
    h, w = x.shape[-2:]
    if factor < 1:
        return F.avg_pool2d(x, 2, ceil_mode=True, divisor_override=4)
    f = int(factor)
    return F.interpolate(F.pad(x, (0, 1, 0, 1)), size=((h + 1) * f, (w + 1) * f), mode="bilinear",
                         align_corners=False)[..., : h * f, : w * f]


class ViTAdapterBackbone(ViTBackbone):
    """forward(x: (B, 3, H, W), sizes) -> OrderedDict of the requested maps, each (B, dim,
    ceil(H / s), ceil(W / s)) at s = 4, 8, 16, 32 (dim the ViT's width). Names `deit_t_adapter`,
    `deit_s_adapter`; the official detection settings: conv stem width 64, 6 deformable
    heads of 4 points, ConvFFN ratio 0.25, injector gamma from 0. Dense ViT weights load as
    for the ViT (the adapter starts fresh); `freeze_at` as the ViT's."""

    pad_multiple = 32
    is_pyramid = False  # an FPN goes on top, as in the paper's Mask R-CNN

    def __init__(self, name: str = "deit_s_adapter", out_features: tuple[str, ...] = ("res2", "res3", "res4", "res5"),
                 pretrained: str = "", drop_path_rate: float = 0.1, freeze_at: int = -1, pretrain_size: int = 224,
                 conv_planes: int = 64, deform_heads: int = 6, points: int = 4, cffn_ratio: float = 0.25,
                 init_values: float = 0.0):
        self._adapter = dict(conv_planes=conv_planes, deform_heads=deform_heads, points=points,
                             cffn_ratio=cffn_ratio, init_values=init_values, drop_path=drop_path_rate)
        super().__init__(name.removesuffix("_adapter"), out_features, "", drop_path_rate, freeze_at=freeze_at,
                         pretrain_size=pretrain_size)
        depth = len(self.layers)
        if depth % 4:
            raise ValueError(f"model.backbone.name: {name} has {depth} blocks; the adapter needs four equal groups")
        self.groups = [(i * depth // 4, (i + 1) * depth // 4) for i in range(4)]
        if pretrained:
            self.load_pretrained(pretrained)

    def build_outputs(self, dim: int, out_channels: int) -> None:
        a = self._adapter
        self.channels = {n: dim for n in self.out_features}
        self.spm = SpatialPrior(a["conv_planes"], dim)
        self.level_embed = nn.Parameter(torch.randn(len(C_STRIDES), dim))
        self.interactions = nn.ModuleList(
            Interaction(dim, a["deform_heads"], a["points"], a["cffn_ratio"], a["drop_path"], a["init_values"],
                        3 if i == 3 else 1) for i in range(4))
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        # a map not asked for has no norm (an unused parameter would stop DDP)
        self.norms = nn.ModuleList(nn.BatchNorm2d(dim) if n in self.out_features else nn.Identity()
                                   for n in ("res2", "res3", "res4", "res5"))
        for module in [self.spm, self.interactions, self.up]:
            module.apply(_init_adapter)

    def fresh(self, key: str) -> bool:
        """The adapter, which a classification checkpoint does not hold."""
        return key.startswith(ADAPTER_PARTS)

    def learnt_in_pretraining(self, key: str) -> bool:
        """What tools/pretrain_backbone.py saves: the ViT and the adapter, trained together."""
        return not self.fresh(key) or key.startswith(ADAPTER_PARTS)

    def load_pretrained(self, path: str) -> None:
        """A dense DeiT / ViT state dict (the adapter starts fresh), or one this project's
        pretraining wrote of a ViT-Adapter (the adapter loads too)."""
        what = "DeiT / ViT state dict of the same size, or a pretrained ViT-Adapter of it"
        state = read_state(path, what)
        # the norms of maps this backbone does not output (pretrained with them) are not needed
        unused = tuple(f"norms.{i}." for i, norm in enumerate(self.norms) if isinstance(norm, nn.Identity))
        state = {k: v for k, v in state.items() if not (unused and k.startswith(unused))}
        with_adapter = any(k.startswith(ADAPTER_PARTS) for k in state)
        wanted = {k for k in self.state_dict() if not self.fresh(k) or (with_adapter and k.startswith(ADAPTER_PARTS))}
        load_converted_state(self, path, wanted, self._from_checkpoint, what, state)

    def forward(self, x: Tensor, sizes: list[tuple[int, int]] | None = None) -> "OrderedDict[str, Tensor]":
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        x, sizes = zero_outside(x, sizes)
        x = F.pad(x, (0, -w % self.pad_multiple, 0, -h % self.pad_multiple))
        big_h, big_w = x.shape[-2:]
        device = x.device
        c1, *cs = self.spm(x, sizes)
        c_shapes = [tuple(m.shape[-2:]) for m in cs]
        c_masks = [_masks(sizes, shape, s, device) for shape, s in zip(c_shapes, C_STRIDES)]
        c = torch.cat([m.flatten(2).transpose(1, 2) + e for m, e in zip(cs, self.level_embed)], 1)
        c_padding = None if all(m is None for m in c_masks) else ~torch.cat(
            [torch.ones(b, h_ * w_, dtype=torch.bool, device=device) if m is None else m.flatten(1)
             for m, (h_, w_) in zip(c_masks, c_shapes)], 1)
        tokens, grid, keep, key_mask = self.embed(x, sizes)
        padding = None if keep is None else ~keep
        shapes = torch.tensor(c_shapes, device=device)
        starts = torch.tensor([0] + [h_ * w_ for h_, w_ in c_shapes[:-1]], device=device).cumsum(0)
        grid_shape, grid_start = torch.tensor([grid], device=device), torch.zeros(1, dtype=torch.long, device=device)
        token_ref = _centres([grid], device).expand(1, -1, len(C_STRIDES), 2)
        c_ref = _centres(c_shapes, device)
        for (start, stop), interaction in zip(self.groups, self.interactions):
            tokens = interaction.injector(tokens, token_ref, c, shapes, starts, c_padding)
            tokens = self.run_blocks(tokens, grid, keep, key_mask, start, stop)
            for extractor in interaction.extractors:
                c = extractor(c, c_ref, tokens, grid_shape, grid_start, padding, c_shapes, c_masks)
        # channels-last views of the tokens (a copy for c's levels beyond the first image)
        c2, c3, c4 = (level.reshape(b, *shape, -1).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
                      for level, shape in zip(c.split([h_ * w_ for h_, w_ in c_shapes], 1), c_shapes))
        vit = _zero_outside(tokens.reshape(b, *grid, -1).permute(0, 3, 1, 2), None if keep is None else keep.view(b, 1, *grid))
        maps = [self.up(_zero_outside(c2, c_masks[0])) + c1, c2, c3, c4]
        out = OrderedDict()
        for name, level, factor, norm in zip(("res2", "res3", "res4", "res5"), maps, (4, 2, 1, 0.5), self.norms):
            if name not in self.out_features:
                continue
            stride = self.strides[name]
            level = norm(level + (vit if factor == 1 else _resample(vit, factor)))
            size = (-(-h // stride), -(-w // stride))
            mask = _masks(sizes, (big_h // stride, big_w // stride), stride, device)
            out[name] = _zero_outside(level, mask)[..., : size[0], : size[1]]
        return out


def _init_adapter(m: nn.Module) -> None:
    """The official initialisation of the adapter's layers; `apply` reaches a deformable
    attention after its linear layers, and it resets them to its own."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, MSDeformAttn):
        m.reset_parameters()
