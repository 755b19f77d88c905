"""SViT, Selective Vision Transformer (Liu et al., WACV 2024): token pruning with
reactivation, for dense prediction.

Before each gated block a small gate decides, per token, whether the token goes through the
block. A pruned token is not dropped: it passes the block unchanged and is back in the map for
the next gate, which may select it again (reactivation), and the detection heads read the
whole map at the end.

- `SelectGate`: LayerNorm -> Linear C -> C/4 -> GELU -> Linear C/4 -> 2 -> log-softmax
  (index 0 = keep), PyTorch's default initialisation (as the authors': about half the tokens
  kept at random at the start).
- `keep_decisions`: straight-through Gumbel-softmax one-hots in training; in evaluation keep
  when the keep log-probability wins (deterministic; `stochastic` samples as the authors'
  released evaluation does by mistake). Padding is never kept.
- `svit_update`: the block on the kept tokens. Training form: every token is computed as a
  query, the pruned ones are left out as keys (masked before the softmax), and x + m (y - x)
  keeps a pruned token as it was while giving the gate its gradient. Inference form: each
  image's kept tokens are gathered (the shared token core), the block runs on them alone,
  and the results are put back: the compute falls with the kept count.
- `keep_ratio_loss`: the mean over gated blocks of (kept share - target)^2, the share over
  the batch's valid tokens together ("dynamic": images may differ) or per image.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tokens import gather_tokens, keep_counts, kept_from_mask, scatter_tokens, select_top

# the paper's targets for the nine gated blocks 3..11 of a 12-block DeiT: 0.7 ** (1, 2, 3)
KEEP_TARGETS = (0.7, 0.7, 0.7, 0.49, 0.49, 0.49, 0.343, 0.343, 0.343)


def keep_targets(depth: int) -> tuple[list[int], list[float]]:
    """The gated blocks of a `depth`-block ViT and their keep targets: the first quarter of
    the blocks stays dense, the other three quarters are gated with targets 0.7, 0.49, 0.343
    by quarter (DeiT's 12 blocks: 3..11 and KEEP_TARGETS)."""
    if depth % 4:
        raise ValueError(f"SViT gates quarters of the blocks: depth {depth} is not a multiple of 4")
    quarter = depth // 4
    return list(range(quarter, depth)), [0.7 ** (1 + (i - quarter) // quarter) for i in range(quarter, depth)]


class SelectGate(nn.Module):
    """x (B, N, C) -> log-probabilities (B, N, 2) of keep (index 0) and prune."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim // 4), nn.GELU(), nn.Linear(dim // 4, 2))

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.net(x), dim=-1)


def keep_decisions(log_probs: Tensor, valid: Tensor | None, training: bool, stochastic: bool = False) -> Tensor:
    """(B, N) keep decisions of floats, 1 kept and 0 pruned: straight-through Gumbel samples
    (training, or `stochastic`), else keep where log p(keep) > log p(prune). valid (B, N) or
    None: tokens outside it are pruned, without gradient."""
    if training or stochastic:
        keep = F.gumbel_softmax(log_probs, tau=1.0, hard=True, dim=-1)[..., 0]
    else:
        keep = (log_probs[..., 0] > log_probs[..., 1]).to(log_probs.dtype)
    return keep if valid is None else keep * valid


def forced_keep(log_probs: Tensor, valid: Tensor | None, share: float) -> Tensor:
    """(B, N) decisions keeping `share` of each image's valid tokens (the token core's
    count, int(valid * share) + 1), the best by keep log-probability: an operating point for
    benchmarks on random weights, whose cost depends on the kept count only."""
    padding = torch.zeros(log_probs.shape[:2], dtype=torch.bool, device=log_probs.device) if valid is None else ~valid
    kept = select_top(log_probs[..., 0] - log_probs[..., 1], keep_counts(padding, share), padding)
    return kept.dense(log_probs.shape[1]).to(log_probs.dtype)


def svit_update(block: Callable[[Tensor, Tensor | None], Tensor], x: Tensor, keep: Tensor,
                key_mask: Tensor | None) -> Tensor:
    """x (B, N, C) after one gated block; block(tokens, key_mask (B, 1, 1, n) True at keys to
    attend to, or None) is the dense block; keep (B, N) the decisions (`keep_decisions`);
    key_mask (B, 1, 1, N) the image's tokens or None.

    With gradients (training), the masked form; without, the gathered form: each image's
    kept tokens only, padded to the batch's largest count (the padding slots masked as keys,
    never written back). An image that keeps nothing is left as it is in both."""
    if torch.is_grad_enabled():
        keys = keep.detach().bool()
        # an image that keeps no token would attend to nothing (NaN): let it attend to its
        # image; its tokens all pass through, so the result is unused
        keys = keys | ~keys.any(1, keepdim=True)
        keys = keys[:, None, None, :] if key_mask is None else keys[:, None, None, :] & key_mask
        y = block(x, keys)
        return x + keep.unsqueeze(-1) * (y - x)
    kept = kept_from_mask(keep.bool())
    if kept.index.shape[1] == 0:
        return x
    # one image fills every slot: no need to check (a sync on CUDA); a batch's check is one
    # more, but spares the keys' mask (and the faster unmasked attention) when counts are equal
    full = x.shape[0] == 1 or bool(kept.mask.all())
    slots = None if full else (kept.mask | ~kept.mask.any(1, keepdim=True))[:, None, None, :]
    return scatter_tokens(x, kept, block(gather_tokens(x, kept.index), slots))


def keep_ratio_loss(keeps: list[Tensor], valid: Tensor | None, targets: list[float],
                    per_image: bool = False) -> tuple[Tensor, Tensor]:
    """The ratio loss (mean over gated blocks of (kept share - target)^2) and each block's
    realised share (L,), detached. keeps: each gated block's decisions (B, N); valid (B, N)
    or None; the share over the batch's valid tokens together, or per image then squared
    and averaged (`per_image`, the paper's fixed-rate baseline)."""
    keep = torch.stack(keeps)  # (L, B, N)
    count = keep.new_full(keep.shape[1:2], keep.shape[2]) if valid is None else valid.sum(1).to(keep.dtype)
    per = keep.sum(2)  # (L, B) kept per image
    target = keep.new_tensor(targets)[:, None]
    if per_image:
        loss = ((per / count.clamp(min=1) - target) ** 2).mean(1)
    else:
        loss = (per.sum(1, keepdim=True) / count.sum().clamp(min=1) - target) ** 2
    shares = per.sum(1).detach() / count.sum().clamp(min=1)
    return loss.mean(), shares
