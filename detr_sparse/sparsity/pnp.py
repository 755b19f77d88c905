"""PnP-DETR's poll-and-pool sampler (Wang et al. 2021): a score network polls each image's
best tokens as fine tokens (normalised features times their score, the score network's only
gradient path); the remaining tokens are pooled into M coarse tokens by a softmax over them
per coarse token. The transformer then runs on fine + coarse tokens; `reverse_project` puts
its output back on the 2-D map for dense tasks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .tokens import KeptTokens, gather_tokens, select_top


@dataclass
class SampledTokens:
    """The transformer's input: src, pos (B, K + M, C) with the K fine slots first, mask
    (B, K + M) True at padded fine slots (coarse tokens are never masked); polled: the fine
    tokens' positions in the map; pool_weights (B, N, M): each map token's share in each
    coarse token (zero at polled and padded tokens); scores (B, N) poll scores in [0, 1];
    map_mask (B, N) the map's padding mask; map_shape (h, w) of the map."""

    src: Tensor
    pos: Tensor
    mask: Tensor
    polled: KeptTokens
    pool_weights: Tensor
    scores: Tensor
    map_mask: Tensor
    map_shape: tuple[int, int] = (0, 0)

    def density(self) -> Tensor:
        """The computation density map (B, N): 1 at polled tokens, elsewhere the token's
        summed pool weights."""
        polled = self.polled.dense(self.pool_weights.shape[1]).float()
        return polled + (1 - polled) * self.pool_weights.sum(-1)


def poll_counts(padding_mask: Tensor, ratio: float) -> Tensor:
    """Fine tokens per image: int(valid * ratio), at least 1. padding_mask (B, N) -> (B,)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"model.pnp.poll_ratio must be in (0, 1], got {ratio}")
    valid = (~padding_mask).sum(1)
    return (valid * ratio).long().clamp(min=1)


class PollAndPool(nn.Module):
    """forward(src (B, N, C), padding_mask (B, N), pos (B, N, C), ratio) -> SampledTokens."""

    def __init__(self, d_model: int = 256, num_coarse: int = 30):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, 1))
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)
        self.num_coarse = num_coarse
        if num_coarse:  # M = 0: poll only
            self.pool_logits = nn.Linear(d_model, num_coarse)
            self.pool_values = nn.Linear(d_model, d_model)

    def forward(self, src: Tensor, padding_mask: Tensor, pos: Tensor, ratio: float,
                map_shape: tuple[int, int] = (0, 0)) -> SampledTokens:
        scores = self.score(src).squeeze(-1).sigmoid()
        polled = select_top(scores, poll_counts(padding_mask, ratio), padding_mask)
        x = self.norm(src)
        fine = gather_tokens(x, polled.index) * gather_tokens(scores, polled.index)[..., None]
        b, n, m = *src.shape[:2], self.num_coarse
        if m:
            remaining = ~padding_mask & ~polled.dense(n)
            logits = self.pool_logits(x)
            # the lowest finite value rather than -inf: an image with every token polled then
            # gets a finite softmax (zeroed just after), not NaN values and gradients
            logits = logits.masked_fill(~remaining[..., None], torch.finfo(logits.dtype).min)
            weights = logits.softmax(1) * remaining[..., None]  # (B, N, M)
            coarse = weights.transpose(1, 2) @ self.pool_values(x)
        else:
            weights, coarse = x.new_zeros(b, n, 0), x.new_zeros(b, 0, x.shape[-1])
        coarse_pos = weights.transpose(1, 2) @ pos
        return SampledTokens(
            src=torch.cat([fine, coarse], 1),
            pos=torch.cat([gather_tokens(pos, polled.index), coarse_pos], 1),
            mask=torch.cat([~polled.mask, padding_mask.new_zeros(b, m)], 1),
            polled=polled, pool_weights=weights, scores=scores, map_mask=padding_mask,
            map_shape=tuple(map_shape))


def reverse_project(out: Tensor, sampled: SampledTokens) -> Tensor:
    """Transformer outputs on fine + coarse tokens (B, K + M, C) -> the dense map (B, N, C):
    fine outputs at their tokens, each other token the pool-weighted sum of the coarse
    outputs (zero at padding)."""
    k = sampled.polled.index.shape[1]
    dense = sampled.pool_weights @ out[:, k:]
    fine = torch.where(sampled.polled.mask[..., None], out[:, :k], gather_tokens(dense, sampled.polled.index))
    return dense.scatter(1, sampled.polled.index[..., None].expand_as(fine), fine)


def score_regulariser(sampled: SampledTokens) -> Tensor:
    """Mean poll score of the polled tokens (weighted 1e-4 in the official code)."""
    selected = gather_tokens(sampled.scores, sampled.polled.index)
    return (selected * sampled.polled.mask).sum() / sampled.polled.mask.sum().clamp(min=1)
