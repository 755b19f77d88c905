"""Sparse DETR (Roh et al., ICLR 2022) parts: what it adds to Deformable DETR.

Sparse DETR refines only a fraction rho of the encoder tokens. Which ones is decided by a
small scoring network trained to predict the tokens the decoder actually reads: the decoder
cross-attention map (DAM), i.e. the decoder's deformable-attention weights splatted back onto
the multi-scale token grid with the same bilinear kernel the sampling used, binarised to the
top keep-count tokens per image. This module holds those pieces:

- `ScoringNetwork`: token features (B, S, C) -> saliency logits (B, S).
- `attention_map`: decoder sampling locations + attention weights -> DAM (B, S).
- `binarize_top`: DAM -> {0, 1} target with counts[i] ones among image i's valid tokens.
- `scoring_loss`: BCE between the logits and that target, per image over all tokens (the
  official normalisation) or over the batch's valid tokens.
- `reference_correlation`: the paper's Corr statistic (share of decoder-referenced tokens
  that the encoder kept), per level and overall.

Token layout (as in the Deformable DETR encoder): every level's map flattened row-major,
levels in order, S = sum_l H_l * W_l; `spatial_shapes` (L, 2) as (H_l, W_l),
`level_start_index` (L,); padding masks (B, S) are True at padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ScoringNetwork(nn.Module):
    """The scoring network (official code: "MaskPredictor").

    LN -> Linear(d_model, hidden) -> GELU, then half of the features (hidden // 2) are
    replaced by their mean over the image's tokens (a global context the token-wise MLP
    would otherwise lack), concatenated back with the local half, then
    Linear(hidden, hidden/2) -> GELU -> Linear(hidden/2, hidden/4) -> GELU -> Linear(., 1).

    forward(x (B, S, d_model), padding_mask (B, S) True at padding or None) -> logits (B, S).
    Unlike the official code the mean skips padded tokens, so an image's scores do not depend
    on how much padding the batch adds. Logits at padded tokens are meaningless; callers mask
    them (`binarize_top`, `scoring_loss`).
    """

    def __init__(self, d_model: int = 256, hidden: int = 256):
        super().__init__()
        if hidden % 4:
            raise ValueError(f"hidden ({hidden}) must be divisible by 4")
        self.norm = nn.LayerNorm(d_model)
        self.embed = nn.Linear(d_model, hidden)
        self.head = nn.Sequential(
            nn.Linear(hidden, hidden // 2), nn.GELU(),
            nn.Linear(hidden // 2, hidden // 4), nn.GELU(),
            nn.Linear(hidden // 4, 1))
        # the official code builds it inside the transformer, before the transformer's xavier
        # reset of every matrix (biases keep PyTorch's default)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        h = F.gelu(self.embed(self.norm(x)))
        local, glob = h.chunk(2, dim=-1)
        if padding_mask is None:
            glob = glob.mean(1, keepdim=True)
        else:
            pad = padding_mask.unsqueeze(-1)
            # masked_fill rather than multiply: padded features may hold non-finite values
            total = glob.masked_fill(pad, 0.0).sum(1, keepdim=True)
            glob = total / (~pad).sum(1, keepdim=True).clamp(min=1).to(glob.dtype)
        h = torch.cat([local, glob.expand_as(local)], dim=-1)
        return self.head(h).squeeze(-1)


# the 4 integer neighbours of a sample, in the order (x0,y0), (x0+1,y0), (x0,y0+1), (x0+1,y0+1)
_DX = (0, 1, 0, 1)
_DY = (0, 0, 1, 1)


@torch.no_grad()
def attention_map(locations: list[Tensor], weights: list[Tensor], spatial_shapes: Tensor,
                  level_start_index: Tensor) -> Tensor:
    """Decoder cross-attention map (paper appendix A.2), a training target (no gradient).

    locations: per decoder layer (B, Q, M, L, P, 2) normalised (x, y) of the padded maps;
    weights: per decoder layer (B, Q, M, L, P). Each weight is split bilinearly onto the 4
    integer neighbours of (x * W_l, y * H_l) (no -0.5 shift, as the official code; this is
    the kernel max(0, 1 - |a - b|) of the appendix), neighbours off the map are dropped, and
    everything is summed over layers, queries, heads and points. No normalisation.
    Returns (B, S) in at least float32 (bf16 would lose small contributions when summing).
    """
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    total = sum(h * w for h, w in shapes)
    batch = weights[0].shape[0]
    dtype = torch.promote_types(weights[0].dtype, torch.float32)
    device = weights[0].device
    dam = torch.zeros(batch, total, dtype=dtype, device=device)
    dx = torch.tensor(_DX, device=device)
    dy = torch.tensor(_DY, device=device)
    for loc, attn in zip(locations, weights):
        for level, ((h, w), start) in enumerate(zip(shapes, starts)):
            scale = torch.tensor([w, h], dtype=dtype, device=device)
            pix = loc[:, :, :, level].to(dtype) * scale               # (B, Q, M, P, 2)
            corner = pix.floor()
            fx, fy = (pix - corner).unsqueeze(-2).unbind(-1)          # (B, Q, M, P, 1)
            x = corner[..., 0].long().unsqueeze(-1) + dx              # (B, Q, M, P, 4)
            y = corner[..., 1].long().unsqueeze(-1) + dy
            share = torch.where(dx == 1, fx, 1 - fx) * torch.where(dy == 1, fy, 1 - fy)
            value = attn[:, :, :, level].to(dtype).unsqueeze(-1) * share
            inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            # off-map neighbours get index 0 and value 0, so one scatter covers all of them
            index = torch.where(inside, start + y * w + x, 0)
            value = torch.where(inside, value, 0.0)
            dam.scatter_add_(1, index.reshape(batch, -1), value.reshape(batch, -1))
    return dam


@torch.no_grad()
def binarize_top(dam: Tensor, counts: Tensor, padding_mask: Tensor) -> Tensor:
    """dam (B, S), counts (B,) int64, padding_mask (B, S) -> (B, S) float target: 1.0 at
    image i's counts[i] highest-DAM valid tokens (fewer if it has fewer valid tokens), else 0.
    Ties are broken in any order."""
    scores = dam.float().masked_fill(padding_mask, float("-inf"))
    order = scores.argsort(dim=1, descending=True)
    # rank[b, s] = position of token s in image b's descending order
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(dam.shape[1], device=dam.device).expand_as(order))
    chosen = (rank < counts.to(dam.device).unsqueeze(1)) & ~padding_mask
    return chosen.to(dam.dtype if dam.is_floating_point() else torch.float32)


@torch.no_grad()
def reference_correlation(dam: Tensor, kept: Tensor, padding_mask: Tensor,
                          level_start_index: Tensor, spatial_shapes: Tensor) -> Tensor:
    """The paper's Corr: sum of DAM over tokens both referenced and kept divided by the sum of
    DAM over referenced tokens, pooled over the batch, per level and over all levels.

    dam (B, S): pass the binarised target for the share of referenced tokens that were kept
    (a raw DAM gives the paper's DAM-weighted form); kept (B, S) bool; padding_mask (B, S).
    Returns (L + 1,) float: levels in order, then all levels. A level with nothing referenced
    gives 0.0 (not NaN), so the statistic can be logged and averaged safely.
    """
    sizes = spatial_shapes.prod(1)
    if int(sizes.sum()) != dam.shape[1]:
        raise ValueError(f"spatial_shapes cover {int(sizes.sum())} tokens, dam has {dam.shape[1]}")
    referenced = dam.float().masked_fill(padding_mask, 0.0)
    tokens = torch.arange(dam.shape[1], device=dam.device)
    level = torch.bucketize(tokens, level_start_index.to(dam.device), right=True) - 1
    count = len(sizes)
    num = referenced.new_zeros(count).index_add_(0, level, (referenced * kept).sum(0))
    den = referenced.new_zeros(count).index_add_(0, level, referenced.sum(0))
    num = torch.cat([num, num.sum().view(1)])
    den = torch.cat([den, den.sum().view(1)])
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), 0.0)


SCORING_LOSS_NORMS = ("image", "token")


def scoring_loss(logits: Tensor, target: Tensor, padding_mask: Tensor, normalization: str = "image") -> Tensor:
    """BCE with logits of the scoring network against the binarised DAM, unweighted.
    logits, target (B, S); padding_mask (B, S). Returns a scalar.

    normalization "image" (the official code's `multilabel_soft_margin_loss`): each image's
    mean over all S tokens of the batch, padded ones included with target 0 and the logit of
    the batch's lowest valid logit (the official code fills padding with the batch minimum),
    then the mean over images: an image with more padding weighs its own tokens less.
    "token": one mean over the batch's valid tokens (padding excluded)."""
    if normalization not in SCORING_LOSS_NORMS:
        raise ValueError(f"model.sparse.scoring_loss_norm: '{normalization}' not in {SCORING_LOSS_NORMS}")
    valid = ~padding_mask
    if not bool(valid.any()):
        return logits[valid].sum()  # 0 for an empty selection, still part of the graph
    target = target.to(logits.dtype)
    if normalization == "token":
        # index first: padded logits may be +-inf, which would give NaN in the loss or gradient
        return F.binary_cross_entropy_with_logits(logits[valid], target[valid])
    filled = torch.where(valid, logits, logits[valid].min())
    return F.multilabel_soft_margin_loss(filled, target.masked_fill(padding_mask, 0.0))
