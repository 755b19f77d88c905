"""The mechanics every token-sparsity method shares (docs/architecture.md, "The token core"):
choose a number of tokens per image, keep the best-scored ones (never padding), gather them
out of the dense token map, put the computed ones back, and report how many were kept, and
where (inside the ground-truth boxes or not). Kept tokens can also be packed end to end into
containers of one length, with the mask that keeps each token to its own group (`pack_layout`).

A kept set is batched as (B, K) with K the largest count of the batch; `KeptTokens.mask`
marks the slots that hold a kept token. The other slots point at real tokens too (the next
best), so computing on them is harmless, but `scatter_tokens` never writes them back: every
image gets exactly its own count, whatever the rest of the batch holds."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
    k = int(counts.max())  # a host read (a sync on CUDA), needed: K is a shape
    scores = scores.detach().masked_fill(padding_mask, float("-inf"))
    index = scores.topk(k, dim=1).indices
    mask = torch.arange(k, device=scores.device)[None, :] < counts[:, None]
    # kept tokens in map order (the slots beyond an image's count last): neighbouring
    # queries then sample neighbouring values, which the deformable attention's reads favour
    order = torch.where(mask, index, index + scores.shape[1]).argsort(dim=1)
    return KeptTokens(index.gather(1, order), mask, counts)


def kept_from_mask(mask: Tensor) -> KeptTokens:
    """The True positions of mask (B, S), each image's in map order, as a KeptTokens padded
    to the batch's largest count (the padding slots point at unselected positions)."""
    if mask.shape[0] == 1:  # one image: no padding slot (a third of the general path's operations)
        index = mask[0].nonzero().view(1, -1)
        return KeptTokens(index, torch.ones_like(index, dtype=torch.bool), index.new_tensor([index.shape[1]]))
    counts = mask.sum(1)
    k = int(counts.max()) if mask.numel() else 0  # like nonzero, a sync on CUDA that the shapes need
    slots = torch.arange(k, device=mask.device)[None, :] < counts[:, None]
    # the padding slots point at the image's first unselected position (a full row has none)
    index = (~mask).to(torch.uint8).argmax(1, keepdim=True).expand(-1, k).clone()
    # nonzero lists the True positions row by row, in map order: 10x faster than sorting the
    # mask on a CPU at DGE's sizes
    index[slots] = mask.nonzero(as_tuple=True)[1]
    return KeptTokens(index, slots, counts)


def straight_through_gates(logits: Tensor, training: bool, tau: float = 1.0) -> Tensor:
    """One-hot choices over the last dim of logits (..., K). Training: hard Gumbel-softmax
    samples whose gradient is the soft sample's (straight-through); otherwise the argmax,
    without noise. Returns floats of logits' dtype."""
    if training:
        return F.gumbel_softmax(logits, tau=tau, hard=True, dim=-1)
    # a scatter, not F.one_hot (which checks its classes' range: several reductions per call)
    return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)


def binary_concrete(logits: Tensor, training: bool, threshold: float = 0.01, tau: float = 1.0) -> Tensor:
    """Select-or-not decisions (floats, 1 selected) from logits (...). Training: a relaxed
    Bernoulli sample u = sigmoid((logits + logistic noise) / tau), selected where u >
    threshold, with u's gradient (straight-through); otherwise sigmoid(logits) > threshold,
    without noise."""
    if not training:
        return (logits.sigmoid() > threshold).to(logits.dtype)
    noise = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    u = ((logits + noise.log() - torch.log1p(-noise)) / tau).sigmoid()
    return (u > threshold).to(u.dtype) - u.detach() + u


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B, S, ...) at index (B, K) -> (B, K, ...). Whole rows by index_select over the
    flattened batch: 3-9x faster on a CPU than torch.gather with an index expanded over the
    channels (`tools/benchmark.py --component gather`)."""
    b, k = index.shape
    if b == 1:
        return x[0].index_select(0, index[0]).unsqueeze(0)
    rows = (index + torch.arange(b, device=index.device)[:, None] * x.shape[1]).flatten()
    return x.flatten(0, 1).index_select(0, rows).view(b, k, *x.shape[2:])


def scatter_tokens(x: Tensor, kept: KeptTokens, values: Tensor) -> Tensor:
    """x (B, S, C) with the kept tokens replaced by values (B, K, C); slots outside
    kept.mask leave their token as it was. Differentiable in both x and values."""
    # the padding slots point at unselected tokens: they rewrite them as they are (the check
    # that there are none would cost a CUDA device a sync); one image has none (K is its count)
    if x.shape[0] > 1 and (x.is_cuda or not bool(kept.mask.all())):
        values = torch.where(kept.mask[..., None], values, gather_tokens(x, kept.index))
    # whole rows by index_copy over the flattened batch (one image, 4000 x 384 tokens, 40% kept:
    # 1.16 -> 0.36 ms against a scatter with an index expanded over the channels)
    b = x.shape[0]
    rows = kept.index if b == 1 else kept.index + torch.arange(b, device=x.device)[:, None] * x.shape[1]
    return x.flatten(0, 1).index_copy(0, rows.flatten(), values.flatten(0, 1)).view_as(x)


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


def token_centres(shapes: Tensor, padded_size: tuple[int, int]) -> Tensor:
    """(S, 2) x, y pixel centres of the tokens of maps `shapes` (L, 2) laid level after
    level, row-major, over a padded batch of `padded_size` (H, W)."""
    centres = []
    for h, w in shapes.tolist():
        ys = (torch.arange(h, device=shapes.device) + 0.5) * padded_size[0] / h
        xs = (torch.arange(w, device=shapes.device) + 0.5) * padded_size[1] / w
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        centres.append(torch.stack([x.flatten(), y.flatten()], 1))
    return torch.cat(centres)


def kept_in_boxes(kept: Tensor, valid: Tensor, shapes: Tensor, targets: list[dict],
                  padded_size: tuple[int, int], is_thing=None) -> Tensor:
    """Does a sparse model keep the tokens of the objects? kept, valid (B, S) bool over maps
    `shapes` (L, 2) of a batch padded to `padded_size`; targets with absolute xyxy boxes
    (only the thing classes when is_thing, per label, is given). Counts (4,): [kept inside a
    box, valid tokens inside, kept outside, valid tokens outside], a token being inside when
    its centre is."""
    x, y = token_centres(shapes.to(kept.device), padded_size).unbind(1)
    counts = kept.new_zeros(4, dtype=torch.float)
    for kept_i, valid_i, target in zip(kept, valid, targets):
        boxes = target["boxes"].to(kept.device)
        if is_thing is not None:
            boxes = boxes[torch.as_tensor(is_thing, device=kept.device)[target["labels"].to(kept.device)]]
        inside = ((x[:, None] >= boxes[:, 0]) & (x[:, None] < boxes[:, 2]) &
                  (y[:, None] >= boxes[:, 1]) & (y[:, None] < boxes[:, 3])).any(1)
        for i, region in enumerate((inside & valid_i, ~inside & valid_i)):
            counts[2 * i] += (kept_i & region).sum()
            counts[2 * i + 1] += region.sum()
    return counts


def box_shares(counts: Tensor, prefix: str) -> dict[str, Tensor]:
    """`kept_in_boxes` counts -> {prefix_in_boxes, prefix_outside}: the kept shares."""
    return {f"{prefix}_in_boxes": counts[0] / counts[1].clamp(min=1),
            f"{prefix}_outside": counts[2] / counts[3].clamp(min=1)}


@dataclass
class Packing:
    """Tokens of a batch laid end to end into containers of `length` slots. Per packed
    token, in pack order (T,): `rows`, its row of the batch's flattened map (B * N);
    `slots`, its slot among the containers' (num * length); `images`, its image; `members`,
    its position in the image's pack order. `ids` (num, length): the group of each slot
    (a token attends only within its group), the padding slots each a group of its own."""

    rows: Tensor
    slots: Tensor
    images: Tensor
    members: Tensor
    ids: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.ids.shape)


def pack_layout(keep: Tensor, num_tokens: int, length: int, order: Tensor | None = None,
                groups: Tensor | None = None, align_images: bool = False) -> Packing:
    """Pack the kept tokens of a batch. keep (B, K) bool over each image's tokens in its pack
    order; order (B, K) their rows in the image's map of `num_tokens` (default: the map
    order); groups (B, K) int < 2**20 within an image (default one group): a token's group
    is its image and group. The images' kept tokens follow one another, only the last
    container padded; `align_images` starts each image in a container of its own (an
    image's containers then do not depend on the rest of the batch)."""
    images, members = keep.nonzero(as_tuple=True)  # image by image, in pack order
    rows = images * num_tokens + (members if order is None else order[images, members])
    ids = images << 20
    if groups is not None:
        ids = ids + groups[images, members]
    if align_images:
        counts = keep.sum(1)
        room = (counts + length - 1) // length * length
        first = torch.cumsum(counts, 0) - counts  # each image's first packed token
        slots = (torch.cumsum(room, 0) - room)[images] + torch.arange(len(images), device=keep.device) \
            - first[images]
        total = int(room.sum())  # a sync on CUDA (as nonzero above), needed: a shape
    else:
        slots = torch.arange(len(images), device=keep.device)
        total = -(-len(images) // length) * length
    slot_ids = -1 - torch.arange(total, device=keep.device)  # padding: a group of its own
    slot_ids[slots] = ids
    return Packing(rows, slots, images, members, slot_ids.view(-1, length))


def pack_tokens(x: Tensor, packing: Packing) -> Tensor:
    """x (B, N, C) -> the packed tokens (num, length, C), zeros in the padding slots."""
    c = x.shape[-1]
    out = x.new_zeros(packing.ids.numel(), c)
    return out.index_copy(0, packing.slots, x.reshape(-1, c).index_select(0, packing.rows)).view(*packing.shape, c)


def unpack_tokens(x: Tensor, packing: Packing, values: Tensor, add: bool = False) -> Tensor:
    """x (B, N, C) with the packed tokens' rows replaced by (or, with `add`, increased by)
    their values (num, length, C). Differentiable in x and values."""
    c = x.shape[-1]
    rows = values.reshape(-1, c).index_select(0, packing.slots)
    flat = x.reshape(-1, c)
    out = flat.index_add(0, packing.rows, rows) if add else flat.index_copy(0, packing.rows, rows)
    return out.view_as(x)


def block_diagonal_mask(ids: Tensor) -> Tensor:
    """ids (num, length) -> (num, length, length) bool: True where a slot may attend to
    another, the two being of one group."""
    return ids[:, :, None] == ids[:, None, :]
