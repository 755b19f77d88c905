"""What the two ViT formats (vtpack.py: DGE DeiT classification weights; svit.py: mmdet ViT-Adapter /
SViT-Adapter Mask R-CNN) share: the names of a ViT block, the position embedding, the classifier
parts a detection backbone drops, and the widths of the DeiT sizes.

- A block is timm's (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`) or, in
  SViT's blocks, PyTorch's nn.TransformerEncoderLayer with pre-norm (`norm1`, `self_attn.
  in_proj_weight`, `self_attn.out_proj`, `norm2`, `linear1`, `linear2`); ours is torchvision's
  EncoderBlock (`ln_1`, `self_attention.in_proj_*`, `self_attention.out_proj`, `ln_2`, `mlp.0`,
  `mlp.3`). The fused projection holds the same rows (q, k, v) in all three.
- The authors' position embedding has a row per extra token (class, distillation) before the
  square patch grid; the project's backbones have no extra token (backbones/vit.py): those rows
  go, and a grid of another side is resampled bicubically to the backbone's, as the backbone's
  own loader does for any DeiT (and as every forward pass does to the image's grid).
"""
from __future__ import annotations

import math
import re

from torch import Tensor

from ..backbones.vit import resize_pos_embed
from .errors import ConversionError

DEIT_SIZES = {192: "Ti", 384: "S", 768: "B"}  # width -> DeiT size
# a classification model's parts no detection backbone has (the class and distillation tokens,
# the final norm, the heads); the final norm is `norm.` (a detection adapter's are `norm1` ..)
CLASSIFIER = re.compile(r"(cls_token|dist_token|(norm|fc_norm|head|head_dist|pre_logits\.fc)\..+)")

_BLOCK = (  # (their name within a block, ours), timm's then nn.TransformerEncoderLayer's
    ("norm1.", "ln_1."), ("attn.qkv.weight", "self_attention.in_proj_weight"),
    ("attn.qkv.bias", "self_attention.in_proj_bias"), ("attn.proj.", "self_attention.out_proj."),
    ("norm2.", "ln_2."), ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.3."),
    ("self_attn.in_proj_weight", "self_attention.in_proj_weight"),
    ("self_attn.in_proj_bias", "self_attention.in_proj_bias"),
    ("self_attn.out_proj.", "self_attention.out_proj."), ("linear1.", "mlp.0."), ("linear2.", "mlp.3."))


def block_name(rest: str) -> str | None:
    """Our name within `layers.encoder_layer_i` of a timm or nn.TransformerEncoderLayer block's
    key `rest` (weight / bias included), None when it is neither."""
    for theirs, ours in _BLOCK:
        if rest == theirs or (theirs.endswith(".") and rest.startswith(theirs) and "." not in rest[len(theirs):]):
            return ours + rest[len(theirs):]
    return None


def deit_size(width: int) -> str:
    """'Ti', 'S' or 'B' for a DeiT width, '<width>-wide' for another."""
    return DEIT_SIZES.get(width, f"{width}-wide")


def patch_positions(value: Tensor, shape: tuple[int, ...], key: str = "pos_embed") -> Tensor:
    """An authors' position embedding (1, extra + S * S, C) -> ours of `shape` (1, s * s, C):
    the extra tokens' rows dropped, the S x S grid resampled to s x s (bicubic) when s != S."""
    side = math.isqrt(value.shape[1])
    ours = math.isqrt(shape[1])
    if value.dim() != 3 or value.shape[-1] != shape[-1] or ours * ours != shape[1]:
        raise ConversionError(f"{key}: {tuple(value.shape)} is no (1, extra + S * S, C) position embedding "
                              f"for the model's {tuple(shape)}")
    return resize_pos_embed(value[:, value.shape[1] - side * side:], (ours, ours)).contiguous()
