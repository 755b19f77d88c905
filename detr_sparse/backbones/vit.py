"""Plain ViT / DeiT (patch 16) with ViTDet's simple feature pyramid (Li et al. 2022) as a
detection backbone.

Output names are `res2` .. `res5` (strides 4, 8, 16, 32), the names of the ResNet and Swin
backbones, so a config switches backbones by `model.backbone.name` alone and the DETR-family
defaults (`res3`..`res5`) work unchanged. Unlike ResNet's, these maps are already a pyramid
(`out_channels` each, normalised): ViTDet puts no FPN on top of them.

No class token: detection reads only the patch map, and ViTDet drops it as well; with it
every patch would attend to one extra token whose pretraining role (classification) is gone.
A DeiT / torchvision checkpoint's class (and distillation) token and their position
embeddings are dropped at load time.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.vision_transformer import EncoderBlock
from torchvision.ops import StochasticDepth
from torchvision.ops.misc import Conv2dNormActivation

from ..transformers.attention import attention
from ..transformers.detr_transformer import apply_in_chunks
from .levels import LEVEL_NAMES, check_backbone_args

# embedding dim, depth, heads; deit_mini (DeiT-T's width, 4 blocks) for the synthetic sets
_MODELS = {"deit_mini": (192, 4, 3), "deit_t": (192, 12, 3), "deit_s": (384, 12, 6), "deit_b": (768, 12, 12),
           "vit_b": (768, 12, 12)}
# DeiT (timm) checkpoint names -> torchvision's, inside encoder block i
_TIMM_BLOCK = {"norm1": "ln_1", "attn.qkv.weight": "self_attention.in_proj_weight",
               "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
               "norm2": "ln_2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
_CLASSIFIER = ("class_token", "encoder.ln.", "heads.", "cls_token", "dist_token", "norm.",
               "fc_norm.", "head.", "head_dist.")


def valid_tokens(grid: tuple[int, int], valid: list[tuple[int, int]], device) -> Tensor | None:
    """(B, h*w) True on the tokens of each image's top-left valid[i] corner of an h x w grid;
    None when the whole grid is valid for every image."""
    if all(tuple(v) == tuple(grid) for v in valid):
        return None
    sizes = torch.tensor(valid, device=device)
    rows = torch.arange(grid[0], device=device)[None, :] < sizes[:, :1]
    cols = torch.arange(grid[1], device=device)[None, :] < sizes[:, 1:]
    return (rows[:, :, None] & cols[:, None, :]).flatten(1)


def token_sizes(sizes: list[tuple[int, int]], stride: int) -> list[tuple[int, int]]:
    """Each image's (h, w) in tokens of `stride` (a partly covered token counts)."""
    return [(-(-h // stride), -(-w // stride)) for h, w in sizes]


def zero_outside(x: Tensor, sizes: list[tuple[int, int]] | None) -> tuple[Tensor, list[tuple[int, int]]]:
    """x (B, C, H, W) with zeros beyond each image's top-left (h, w), and the sizes as
    tuples (every image fills x when sizes is None): what a backbone sees of a padded batch."""
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    sizes = [(h, w)] * b if sizes is None else [tuple(int(v) for v in s) for s in sizes]
    inside = valid_tokens((h, w), sizes, x.device)
    return (x if inside is None else x * inside.view(b, 1, h, w)), sizes


def per_image_embedding(embedding, grid: tuple[int, int], valid: list[tuple[int, int]]) -> Tensor:
    """(1 or B, h*w, C): embedding(size) (1, size_h * size_w, C) on each image's own valid
    grid, zero beyond it, so that padding neither shifts nor stretches it."""
    sizes = list(dict.fromkeys(tuple(v) for v in valid))
    if sizes == [tuple(grid)]:  # no padding: the embedding as it is (no copy)
        return embedding(sizes[0])
    out = torch.cat([F.pad(embedding(size).view(1, *size, -1), (0, 0, 0, grid[1] - size[1], 0, grid[0] - size[0]))
                     for size in sizes]).flatten(1, 2)
    return out if len(sizes) == 1 else out[[sizes.index(tuple(v)) for v in valid]]


def resize_pos_embed(pos: Tensor, size: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """pos (1, S*S, C) learned on an S x S grid -> (1, h*w, C) for an h x w grid."""
    side = math.isqrt(pos.shape[1])
    if (side, side) == tuple(size):
        return pos
    grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # channels-last memory: so is the output
    return F.interpolate(grid, size=size, mode=mode, align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)


def read_state(path: str, what: str) -> dict[str, Tensor]:
    """The state dict in the file at `path`, unwrapped from a training checkpoint's "model"
    entry (DeiT's and DGE's released files are such checkpoints)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.backbone.pretrained: {path} not found ({what})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"] if isinstance(state.get("model"), dict) else state


def load_converted_state(module: nn.Module, path: str, wanted: set[str],
                         convert: Callable[[str, Tensor], tuple[str, Tensor] | None], what: str,
                         state: dict[str, Tensor] | None = None) -> None:
    """Load the state dict at `path` (or `state`, read from it) into `module`: `convert(key,
    value)` gives our (key, value) or None for a checkpoint entry this backbone does not use
    (classifier, unbuilt stages). Raises ValueError naming the `wanted` keys the file lacks
    and the file's keys that are neither ours nor known to be unused; module keys not in
    `wanted` keep their initialisation."""
    state = read_state(path, what) if state is None else state
    ours, unexpected = {}, []
    for key, value in state.items():
        converted = convert(key, value)
        if converted is not None and converted[0] in wanted:
            ours[converted[0]] = converted[1]
        elif converted is not None:
            unexpected.append(key)
    missing = sorted(wanted - set(ours))
    if missing or unexpected:
        problems = [f"{label} backbone weights {keys[:8]}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ValueError(f"{path}: not a {what}: {'; '.join(problems)}")
    module.load_state_dict(ours, strict=False)


class ViTBlock(EncoderBlock):
    """torchvision's ViT encoder block (same parameters and names, so torchvision weights
    load) with stochastic depth on both residual branches. Attention goes straight to
    `attention` (scaled_dot_product_attention, or its written-out form in bf16 on a CPU with
    few keys): nn.MultiheadAttention's inference fast path is invisible
    to the FLOP counter. x (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, heads: int, drop_path: float):
        super().__init__(heads, dim, 4 * dim, dropout=0.0, attention_dropout=0.0)
        self.drop_path = StochasticDepth(drop_path, "row")

    def attend(self, x: Tensor, queries: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        """Self-attention of x (B, N, C), or of other `queries` (B, Q, C) against x's keys and
        values (the fused projection's rows split: q the first C, k and v the rest);
        key_mask (B, 1, 1, N) True at keys to attend to."""
        attn, (b, n, c), heads = self.self_attention, x.shape, self.num_heads
        if queries is None:
            qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        else:
            q = F.linear(queries, attn.in_proj_weight[:c], attn.in_proj_bias[:c])
            q = q.view(b, -1, heads, c // heads).transpose(1, 2)
            kv = F.linear(x, attn.in_proj_weight[c:], attn.in_proj_bias[c:])
            k, v = kv.view(b, n, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, key_mask)
        return attn.out_proj(out.transpose(1, 2).reshape(b, q.shape[2], c))

    def forward_queries(self, queries: Tensor, x: Tensor, key_mask: Tensor | None = None,
                        change: bool = False) -> Tensor:
        """The block's update of raw queries (B, Q, C) attending to the map x (B, N, C);
        `change`: their change (attention + MLP terms) instead."""
        q = None if queries is x else self.ln_1(queries)
        attended = self.drop_path(self.attend(self.ln_1(x), q, key_mask))
        moved = queries + attended
        mlp = self.drop_path(apply_in_chunks(self.mlp, self.ln_2(moved)))
        return attended + mlp if change else moved + mlp

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        return self.forward_queries(x, x, key_mask)


def _rescale(dim: int, stride: int) -> tuple[nn.Module, int]:
    """ViTDet's resampling of the stride-16 map to `stride`, and its output channels."""
    if stride == 4:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2, eps=1e-6),
                             nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)), dim // 4
    if stride == 8:
        return nn.ConvTranspose2d(dim, dim // 2, 2, 2), dim // 2
    if stride == 16:
        return nn.Identity(), dim
    # ceil_mode: an odd stride-16 map gives ceil(H / 32) rows, as a strided convolution would
    return nn.MaxPool2d(2, 2, ceil_mode=True), dim


class ViTBackbone(nn.Module):
    """forward(x: (B, 3, H, W)) -> OrderedDict of the requested maps, each
    (B, out_channels, ceil(H / s), ceil(W / s)) for its stride s in 4, 8, 16, 32, left
    channels-last by the last LayerNorm2d (as ResNet's maps: 1x1 projections run faster).

    The image is zero-padded at the bottom/right to a multiple of 16. That padding is less
    than a patch, so every token still covers real pixels and none is pure padding; the
    stride-16 map is ceil(H / 16) x ceil(W / 16) and the upsampled maps are cropped to
    ceil(H / s) x ceil(W / s). Position embeddings, learned on the `pretrain_size` grid
    (224 / 16 = 14 x 14), are resized bicubically to the grid of each input (as ViTDet).
    `freeze_at`: -1 or 0 none, 1 the patch and position embeddings.
    """

    patch_size = 16
    pad_multiple = 16
    is_pyramid = True  # the maps are a pyramid of one width already: no FPN on top
    takes_sizes = True  # a padded batch's image sizes: forward(x, sizes)

    def __init__(self, name: str = "deit_s", out_features: tuple[str, ...] = tuple(LEVEL_NAMES),
                 pretrained: str = "", drop_path_rate: float = 0.1, out_channels: int = 256,
                 freeze_at: int = -1, pretrain_size: int = 224):
        super().__init__()
        check_backbone_args(name, _MODELS, out_features)
        if freeze_at not in (-1, 0, 1):
            raise ValueError(f"model.backbone.freeze_at: {freeze_at}; a ViT freezes nothing "
                             "(-1, 0) or its patch and position embeddings (1)")
        dim, depth, heads = _MODELS[name]
        self.conv_proj = nn.Conv2d(3, dim, self.patch_size, self.patch_size)
        grid = pretrain_size // self.patch_size
        self.pos_embedding = nn.Parameter(torch.empty(1, grid * grid, dim).normal_(std=0.02))
        # "encoder_layer_i" as in torchvision, whose weights then load under one prefix
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", ViTBlock(dim, heads, drop_path_rate * i / max(depth - 1, 1)))
            for i in range(depth)))
        self.out_features = tuple(n for n in LEVEL_NAMES if n in out_features)
        self.strides = {n: 4 * 2 ** LEVEL_NAMES.index(n) for n in self.out_features}
        self.build_outputs(dim, out_channels)
        if pretrained:
            self.load_pretrained(pretrained)
        if freeze_at == 1:
            for p in [self.pos_embedding, *self.conv_proj.parameters()]:
                p.requires_grad_(False)

    def build_outputs(self, dim: int, out_channels: int) -> None:
        """The simple pyramid: each map resampled from the stride-16 one, then projected."""
        self.channels = {n: out_channels for n in self.out_features}
        norm = partial(LayerNorm2d, eps=1e-6)
        self.rescale, self.project = nn.ModuleDict(), nn.ModuleDict()
        for n in self.out_features:
            self.rescale[n], channels = _rescale(dim, self.strides[n])
            self.project[n] = nn.Sequential(
                Conv2dNormActivation(channels, out_channels, 1, norm_layer=norm, activation_layer=None),
                Conv2dNormActivation(out_channels, out_channels, 3, norm_layer=norm, activation_layer=None))

    def load_pretrained(self, path: str) -> None:
        """Load a torchvision ViT state dict (`conv_proj.weight`, `encoder.layers.encoder_layer_0
        ...`) or a DeiT / timm one (`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, ...).
        The classifier is ignored; the pyramid is detection-specific and keeps its
        initialisation. A position embedding learned on another grid is resized to ours."""
        wanted = {k for k in self.state_dict() if not self.fresh(k)}
        load_converted_state(self, path, wanted, self._from_checkpoint,
                             "torchvision or DeiT ViT state dict of the same size")

    def fresh(self, key: str) -> bool:
        """Parameters a classification checkpoint does not hold (the pyramid)."""
        return key.startswith(("rescale.", "project."))

    def _from_checkpoint(self, key: str, value: Tensor) -> tuple[str, Tensor] | None:
        if key.startswith(_CLASSIFIER):
            return None
        if key in ("encoder.pos_embedding", "pos_embed"):
            # class (and DeiT's distillation) tokens come first, then a square patch grid
            extra = value.shape[1] - math.isqrt(value.shape[1]) ** 2
            side = math.isqrt(self.pos_embedding.shape[1])
            return "pos_embedding", resize_pos_embed(value[:, extra:], (side, side))
        if key.startswith("patch_embed.proj."):
            return key.replace("patch_embed.proj.", "conv_proj."), value
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            theirs = next((t for t in _TIMM_BLOCK if rest.startswith(t)), "")
            rest = _TIMM_BLOCK.get(theirs, "") + rest[len(theirs):]
            return f"layers.encoder_layer_{i}.{rest}", value
        return key.removeprefix("encoder."), value

    def output_shape(self) -> dict[str, dict[str, int]]:
        return {n: {"channels": self.channels[n], "stride": self.strides[n]} for n in self.out_features}

    def position_embedding(self, size: tuple[int, int]) -> Tensor:
        """(1, h*w, C) position embeddings for an h x w patch grid."""
        return resize_pos_embed(self.pos_embedding, size, mode="bicubic")

    def embed(self, x: Tensor, sizes: list[tuple[int, int]]
              ) -> tuple[Tensor, tuple[int, int], Tensor | None, Tensor | None]:
        """x (B, 3, H, W) padded to the patch size -> tokens (B, N, C) with position
        embeddings, the grid, each image's (B, N) token mask and the (B, 1, 1, N) key mask
        (None when every image fills the grid)."""
        # channels-last: the tokens are then the patch embedding's own (contiguous) view; a
        # transposed residual stream would cost every block's norms and adds a strided copy
        x = self.conv_proj(x.contiguous(memory_format=torch.channels_last))  # (B, C, ceil(H/16), ceil(W/16))
        grid = tuple(x.shape[-2:])
        valid = token_sizes(sizes, self.patch_size)
        keep = valid_tokens(grid, valid, x.device)
        tokens = x.flatten(2).transpose(1, 2) + per_image_embedding(self.position_embedding, grid, valid)
        return tokens, grid, keep, None if keep is None else keep[:, None, None, :]

    def run_blocks(self, tokens: Tensor, grid: tuple[int, int], keep: Tensor | None,
                   key_mask: Tensor | None, start: int = 0, stop: int | None = None) -> Tensor:
        """The blocks start .. stop - 1 (all by default) over tokens (B, N, C) on the grid;
        keep (B, N) each image's tokens and key_mask its (B, 1, 1, N) view, or None."""
        for layer in list(self.layers)[start:stop]:
            tokens = layer(tokens, key_mask)
        return tokens

    def forward(self, x: Tensor, sizes: list[tuple[int, int]] | None = None) -> "OrderedDict[str, Tensor]":
        """x (B, 3, H, W); sizes: each image's (h, w) inside x (a padded batch), or None when
        every image fills x. With sizes, each image's maps do not depend on the padding
        (its tokens attend to its own, the pyramid sees zeros beyond it)."""
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        x, sizes = zero_outside(x, sizes)
        pad = self.pad_multiple
        tokens, grid, keep, key_mask = self.embed(F.pad(x, (0, -w % pad, 0, -h % pad)), sizes)
        tokens = self.run_blocks(tokens, grid, keep, key_mask)
        x = tokens.transpose(1, 2).reshape(b, -1, *grid)
        out = OrderedDict()
        for n in self.out_features:
            stride = self.strides[n]
            size = (-(-h // stride), -(-w // stride))
            level = x
            if keep is not None:  # padding: zeros to upsample, nothing to max-pool
                outside = ~keep.view(b, 1, *grid)
                level = x.masked_fill(outside, float("-inf") if isinstance(self.rescale[n], nn.MaxPool2d) else 0.0)
            # cropped before the 3x3 convolution, which then zero-pads at the image border
            level = self.rescale[n](level)[..., : size[0], : size[1]]
            if keep is not None:  # a max-pooled cell all padding is -inf: 0, or the 1x1's weight gradient is NaN
                level = level.masked_fill(level == float("-inf"), 0.0)
            level = self.project[n][0](level)
            mask = valid_tokens(size, token_sizes(sizes, stride), x.device)
            if mask is not None:  # and at each image's border in a padded batch
                level = torch.where(mask.view(b, 1, *size), level, 0.0)
            out[n] = self.project[n][1](level)
        return out
