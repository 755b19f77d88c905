"""The mechanics every token-sparsity method shares (DESIGN.md): choose a number of tokens
per image, keep the best-scored ones (never padding), gather them out of the dense token
map, put the computed ones back, and report how many were kept.

A kept set is batched as (B, K) with K the largest count of the batch; `KeptTokens.mask`
marks the slots that hold a kept token. The other slots point at real tokens too (the next
best), so computing on them is harmless, but `scatter_tokens` never writes them back: every
image gets exactly its own count, whatever the rest of the batch holds."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KeptTokens:
    """index (B, K) int64: positions in the dense map, in map order; mask (B, K) bool:
    True at slots holding a kept token; counts (B,) int64: kept tokens per image."""

    index: Tensor
    mask: Tensor
    counts: Tensor

    def dense(self, num_tokens: int) -> Tensor:
        """(B, num_tokens) bool, True at the kept tokens."""
        out = torch.zeros(self.index.shape[0], num_tokens, dtype=torch.bool, device=self.index.device)
        return out.scatter(1, self.index, self.mask)


def keep_counts(padding_mask: Tensor, ratio: float) -> Tensor:
    """Tokens to keep per image: int(valid * ratio) + 1 (Sparse DETR), at most the valid
    count. padding_mask (B, S) True at padding -> (B,) int64."""
    if not 0 < ratio <= 1:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    valid = (~padding_mask).sum(1)
    return torch.minimum((valid * ratio).long() + 1, valid)


def select_top(scores: Tensor, counts: Tensor, padding_mask: Tensor) -> KeptTokens:
    """Each image's `counts[i]` best tokens by `scores` (B, S); padded tokens are never kept."""
    k = int(counts.max())
    scores = scores.detach().masked_fill(padding_mask, float("-inf"))
    index = scores.topk(k, dim=1).indices
    mask = torch.arange(k, device=scores.device)[None, :] < counts[:, None]
    # kept tokens in map order (the slots beyond an image's count last): neighbouring
    # queries then sample neighbouring values, which the deformable attention's reads favour
    order = torch.where(mask, index, index + scores.shape[1]).argsort(dim=1)
    return KeptTokens(index.gather(1, order), mask, counts)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B, S, ...) at index (B, K) -> (B, K, ...)."""
    shape = index.shape + (1,) * (x.dim() - 2)
    return x.gather(1, index.view(shape).expand(*index.shape, *x.shape[2:]))


def scatter_tokens(x: Tensor, kept: KeptTokens, values: Tensor) -> Tensor:
    """x (B, S, C) with the kept tokens replaced by values (B, K, C); slots outside
    kept.mask leave their token as it was. Differentiable in both x and values."""
    values = torch.where(kept.mask[..., None], values, gather_tokens(x, kept.index))
    return x.scatter(1, kept.index[..., None].expand_as(values), values)


def keep_statistics(kept: KeptTokens, padding_mask: Tensor, level_start_index: Tensor | None = None,
                    prefix: str = "keep_ratio") -> dict[str, Tensor]:
    """Kept share of the valid tokens, averaged over images, and with `level_start_index`
    (L,) per level of the flattened multi-level map (`{prefix}_level{l}`)."""
    valid = ~padding_mask
    stats = {prefix: (kept.counts.float() / valid.sum(1).clamp(min=1)).mean()}
    if level_start_index is not None:
        dense = kept.dense(padding_mask.shape[1])
        bounds = level_start_index.tolist() + [padding_mask.shape[1]]
        for level, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            share = dense[:, a:b].sum(1).float() / valid[:, a:b].sum(1).clamp(min=1)
            stats[f"{prefix}_level{level}"] = share.mean()
    return {k: v.detach() for k, v in stats.items()}
