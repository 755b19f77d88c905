"""DGE, the Dynamic Grained Encoder (Song et al., NeurIPS 2021): what it adds to a
vision transformer's blocks.

Each block's input map is cut into S x S regions (S = 4 tokens). A router picks, per
region, one of three granularities: 4 x 4, 2 x 2 or 1 x 1 queries (patches of side 1, 2 or
4 tokens), each query the average of the raw tokens of its patch. Only the queries run
through the block (attention with keys / values from the whole normalised map, then the
MLP); each query's change is copied back over its patch and added to the map:

    q_in = Pool_g(x);  q = q_in + Attn(LN1(q_in), LN1(x));  q = q + MLP(LN2(q))
    x_out = x + Unpool_g(q - q_in)

With the finest granularity everywhere this is the dense block. Queries never attend to
each other, so a query's result does not depend on which other queries exist: the training
form (every granularity computed, the gate's one-hot mixing them) and the inference form
(only the chosen queries, per image) agree.

- `GrainRouter`: Linear(C, 3) on the region means; the finest starts at p = 0.95.
- `grain_pools`: each option's queries, the average of the raw tokens of each patch (the
  last regions, when the grid is no multiple of S, completed with zeros).
- `grain_gates`: straight-through Gumbel one-hots in training, argmax in evaluation, regions
  wholly in padding set to the coarsest (and counted nowhere).
- `region_layout`: which regions and patches hold image tokens (a query wholly in padding
  is never computed nor counted).
- `dge_update`: the block applied to the queries: every option's (the exact dense form) or
  only the chosen ones (the sparse form: inference, and training by default).
- `query_counts`, `block_macs`: the differentiable cost the budget loss constrains.

Padding: tokens outside the image are zeroed before pooling (a region across the image
border averages the image's tokens with zeros), so a region's queries depend only on the
image, never on how much padding surrounds it; keys and values come from the map as it is,
so the input needs no padding beyond the dense backbone's.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tokens import gather_tokens, kept_from_mask, straight_through_gates

REGION = 4  # region side S, in tokens
SPLITS = (4, 2, 1)  # queries per region side of each option, finest first (16 / 4 / 1 queries)
GRAIN_NAMES = tuple(f"grain{REGION // n}" for n in SPLITS)  # by patch side: grain1, grain2, grain4


class GrainRouter(nn.Module):
    """Region means (B, Hr, Wr, C) (`grain_pools(...)[-1]`, the coarsest option's queries)
    -> logits (B, Hr, Wr, 3)."""

    def __init__(self, dim: int, p_finest: float = 0.95):
        super().__init__()
        self.gate = nn.Linear(dim, len(SPLITS))
        self.p_finest = p_finest
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: weights trunc_normal(std 0.01), bias [b, -b, -b] with
        b = ln sqrt(p (K - 1) / (1 - p)), so that softmax gives the finest option p. A model
        re-initialising every Linear must call this again afterwards."""
        k = len(SPLITS)
        b = math.log(math.sqrt(self.p_finest * (k - 1) / (1 - self.p_finest)))
        nn.init.trunc_normal_(self.gate.weight, std=0.01)
        with torch.no_grad():
            self.gate.bias.copy_(torch.tensor([b] + [-b] * (k - 1)))

    def forward(self, region_means: Tensor) -> Tensor:
        return self.gate(region_means)


@dataclass
class RegionLayout:
    """Where the image is, for one map (H, W), Hr = ceil(H / S): `regions` (B, Hr, Wr) True
    at the regions holding image tokens; `patches[k]` (B, ceil(H / p_k), ceil(W / p_k)) True
    at option k's patches (of side p_k = 1, 2, 4) holding image tokens (the only queries
    computed); `queries` (B, Hr, Wr, 3) how many queries each option gives each region
    (16 / 4 / 1 inside the image, fewer across its border); `query_regions[k]` (h_k * w_k,)
    the region (flat index) of each of option k's queries and `token_regions` (H * W,) each
    token's: a region's choice spread by one indexing. With every option's patches laid one
    after the other (P of them): `positions` (3, H * W) each token's patch per option,
    `patch_regions` (P,) each patch's region, `patch_options` (P,) its option, `patch_valid`
    (B, P) `patches` flattened, `option_starts` (3,) where each option's patches begin."""

    regions: Tensor
    patches: list[Tensor]
    queries: Tensor
    positions: Tensor
    query_regions: list[Tensor]
    token_regions: Tensor
    patch_regions: Tensor
    patch_options: Tensor
    patch_valid: Tensor
    option_starts: Tensor


def region_layout(token_valid: Tensor | None, grid: tuple[int, int], batch: int, device) -> RegionLayout:
    """The RegionLayout of a map (H, W); token_valid (B, H * W): each image's top-left
    rectangle of valid tokens (as the backbones make it), or None (every token valid). The
    layout of each set of image sizes is kept: its ~40 small operations are a noticeable
    share of a small image's pass."""
    h, w = grid
    if token_valid is None:
        sizes = ((h, w),) * batch
    else:
        valid = token_valid.view(batch, h, w)
        sizes = tuple(zip(valid[:, :, 0].sum(1).tolist(), valid[:, 0, :].sum(1).tolist()))
    return _layout(tuple(grid), sizes, torch.device(device), torch.is_inference_mode_enabled())


@functools.lru_cache(maxsize=256)
def _layout(grid: tuple[int, int], sizes: tuple[tuple[int, int], ...], device: torch.device,
            inference: bool) -> RegionLayout:
    h, w = grid
    batch = len(sizes)
    bounds = torch.tensor(sizes, device=device).view(batch, 2, 1, 1)
    valid = (torch.arange(h, device=device).view(1, h, 1) < bounds[:, 0]) \
        & (torch.arange(w, device=device).view(1, 1, w) < bounds[:, 1])
    valid = F.pad(valid, (0, -w % REGION, 0, -h % REGION))
    hr, wr = valid.shape[1] // REGION, valid.shape[2] // REGION
    patches, queries = [], []
    for n in SPLITS:
        side = REGION // n
        patch = valid.view(batch, hr * n, side, wr * n, side).any(4).any(2)
        patches.append(patch[:, :-(-h // side), :-(-w // side)])
        queries.append(patch.view(batch, hr, n, wr, n).sum((2, 4)))
    positions = _patch_positions(grid, [p.shape[1:] for p in patches], device)

    def regions_of(rows: int, cols: int, per_region: int) -> Tensor:
        r = torch.arange(rows, device=device) // per_region
        return (r[:, None] * wr + torch.arange(cols, device=device)[None, :] // per_region).flatten()

    query_regions = [regions_of(*p.shape[1:], n) for p, n in zip(patches, SPLITS)]
    sizes = [r.numel() for r in query_regions]
    options = torch.repeat_interleave(torch.arange(len(SPLITS), device=device), torch.tensor(sizes, device=device))
    starts = torch.tensor([sum(sizes[:k]) for k in range(len(SPLITS))], device=device)
    return RegionLayout(patches[-1], patches, torch.stack(queries, -1), positions, query_regions,
                        regions_of(h, w, REGION), torch.cat(query_regions), options,
                        torch.cat([p.flatten(1) for p in patches], 1), starts)


def forced_choice(valid_regions: Tensor, shares: tuple[float, ...]) -> Tensor:
    """Options (B, Hr, Wr) long that give each image's valid regions the granularity shares
    (finest first; regions in raster order take the options in turn): for benchmarks on
    random weights, whose cost depends on the query count only."""
    choice = torch.full(valid_regions.shape, len(SPLITS) - 1, dtype=torch.long, device=valid_regions.device)
    bounds = torch.tensor([sum(shares[:i + 1]) for i in range(len(SPLITS))], device=valid_regions.device)
    for i, valid in enumerate(valid_regions):
        rank = valid.flatten().cumsum(0).float() / valid.sum().clamp(min=1)  # (0, 1] over valid regions
        picked = torch.bucketize(rank, bounds.clamp(max=1.0), right=False).clamp(max=len(SPLITS) - 1)
        choice[i] = torch.where(valid.flatten(), picked, len(SPLITS) - 1).view(valid.shape)
    return choice


def grain_gates(logits: Tensor, valid_regions: Tensor, training: bool,
                forced: tuple[float, ...] | None = None) -> Tensor:
    """One-hot gates (B, Hr, Wr, 3): straight-through Gumbel samples in training, the argmax
    otherwise, `forced` shares when given; regions wholly in padding get the coarsest option
    (a constant, no gradient)."""
    if forced is not None:
        gates = F.one_hot(forced_choice(valid_regions, forced), len(SPLITS)).to(logits.dtype)
    else:
        gates = straight_through_gates(logits, training)
    return torch.where(valid_regions[..., None], gates, gates.new_tensor([0.0] * (len(SPLITS) - 1) + [1.0]))


def query_counts(gates: Tensor, layout: RegionLayout) -> Tensor:
    """Queries per image (B,), differentiable through the straight-through gates: over the
    regions, the chosen option's queries that hold image tokens (16 / 4 / 1 inside it)."""
    return (gates * layout.queries).flatten(1).sum(1)


class GrainPools:
    """Each option's queries, finest first (`pools[k]`): (B, ceil(H / p), ceil(W / p), C), the
    mean of each p x p patch (p = 1, 2, 4) of x (B, N, C) on the grid (H, W), tokens outside
    the image (token_valid (B, N) False) and beyond the grid counted as zeros; `pools[-1]` are
    the region means the router reads. An option's map is pooled when first asked for (the
    sparse form skips an option no region chose), as a channels-last image (the tokens'
    view, no padded copy): 10-40x faster on a CPU than a mean over a strided view of a
    padded map."""

    def __init__(self, x: Tensor, grid: tuple[int, int], token_valid: Tensor | None):
        b, _, c = x.shape
        if token_valid is not None:
            x = x * token_valid.unsqueeze(-1)
        self.x_map = x.view(b, *grid, c)
        self.maps: dict[int, Tensor] = {}

    def __getitem__(self, k: int) -> Tensor:
        if not -len(SPLITS) <= k < len(SPLITS):
            raise IndexError(f"option {k} of {len(SPLITS)}")
        k %= len(SPLITS)
        if k not in self.maps:
            side = REGION // SPLITS[k]
            self.maps[k] = self.x_map if side == 1 else F.avg_pool2d(
                self.x_map.permute(0, 3, 1, 2), side, ceil_mode=True, divisor_override=side ** 2).permute(0, 2, 3, 1)
        return self.maps[k]


def grain_pools(x: Tensor, grid: tuple[int, int], token_valid: Tensor | None) -> GrainPools:
    """x's GrainPools (B, N, C) on the grid (H, W), token_valid (B, N) or None."""
    return GrainPools(x, grid, token_valid)


def _unpool(x_map: Tensor, side: int) -> Tensor:
    """(B, h, w, C) -> (B, h * side, w * side, C): each value over its side x side patch."""
    if side == 1:
        return x_map
    b, h, w, c = x_map.shape
    return x_map[:, :, None, :, None].expand(b, h, side, w, side, c).reshape(b, h * side, w * side, c)


def dge_update(block: Callable[[Tensor], Tensor], x: Tensor, grid: tuple[int, int], gates: Tensor,
               layout: RegionLayout, pooled: GrainPools, sparse: bool) -> Tensor:
    """x (B, N, C) on the grid (H, W) -> (B, N, C): the DGE block. `pooled` are x's
    `grain_pools`, whose regions the gates (B, Hr, Wr, 3) choose for.

    `block(queries (B, Q, C)) -> (B, Q, C)` is the dense block's change of raw queries (its
    attention and MLP terms) against the keys / values of x. Dense form (training): every
    option's queries go through the block (1.3125 x the region tokens, one call, so
    stochastic depth drops a whole sample) and the one-hot gates mix their changes, which
    gives the gates their gradient. Sparse form (inference and training by default): each
    image computes only the queries of its chosen options (each option's padded to the
    batch's largest count of it; nothing is padded at batch 1), gathered from that option's
    map, and their changes, times the chosen gate (1, with the straight-through gradient of
    the chosen option only, as the paper's Eq. 6), are put back. Both give the same map at the image tokens for the
    same gates; the sparse form computes no query wholly in padding."""
    b, n, c = x.shape
    h, w = grid
    shapes = [tuple(p.shape[1:]) for p in layout.patches]  # each option's map (h_k, w_k)
    if sparse:
        choice = gates.argmax(-1).flatten(1)  # (B, regions)
        # the chosen queries: every option's patches, laid one after the other, whose region
        # chose the option and which hold image tokens (an option no region chose is not even pooled)
        picked = (choice[:, layout.patch_regions] == layout.patch_options) & layout.patch_valid
        kepts = [kept_from_mask(mask) for mask in picked.split([len(r) for r in layout.query_regions], 1)]
        counts = [kept.index.shape[1] for kept in kepts]
        starts = [sum(counts[:k]) for k in range(len(SPLITS))]
        chosen = [k for k in range(len(SPLITS)) if counts[k]]
        if b == 1 and not torch.is_grad_enabled():  # gathered straight into one buffer, no concatenation
            queries = x.new_empty(1, sum(counts), c)
            for k in chosen:
                torch.index_select(pooled[k].view(-1, c), 0, kepts[k].index[0],
                                   out=queries[0, starts[k]:starts[k] + counts[k]])
        else:
            queries = torch.cat([gather_tokens(pooled[k].flatten(1, 2), kepts[k].index) for k in chosen], 1)
        changes = block(queries)
        if torch.is_grad_enabled() and gates.requires_grad:
            # times the chosen gate (1 forward): its straight-through gradient, as paper Eq. 6
            gate = torch.cat([gather_tokens(gates[..., k].flatten(1)[:, layout.query_regions[k]], kepts[k].index)
                              for k in chosen], 1)
            changes = changes * gate.unsqueeze(-1)
        # each chosen patch's slot among the queries: its option's first slot plus its rank
        # among the option's chosen patches (a running count); an unchosen patch gets a slot
        # in [-1, queries) that nothing reads
        ranks = picked.cumsum(1)
        shift = torch.tensor(starts, device=x.device) - 1 - F.pad(ranks, (1, 0))[:, layout.option_starts]
        slots = ranks + shift[:, layout.patch_options]
        # each image token takes the change of the one chosen query whose patch covers it
        # (one gather, instead of un-pooling every option's map); a token outside the image
        # may have none and takes any query's (the next block zeroes it)
        owner = slots.gather(1, layout.positions.gather(0, choice[:, layout.token_regions]))
        return gather_tokens(changes, owner.clamp_(min=0)).add_(x)
    # (B, M, C), M = 1.3125 x the region tokens
    flat = torch.cat([pooled[k].flatten(1, 2) for k in range(len(SPLITS))], 1)
    changes = block(flat)
    update = torch.zeros_like(pooled[0])
    for k, (part, (hk, wk), regions) in enumerate(zip(changes.split([hh * ww for hh, ww in shapes], 1), shapes,
                                                       layout.query_regions)):
        part = part.view(b, hk, wk, c) * gates[..., k].flatten(1)[:, regions].view(b, hk, wk, 1)
        update = update + _unpool(part, REGION // SPLITS[k])[:, :h, :w]
    return x + update.reshape(b, n, c)


def _patch_positions(grid: tuple[int, int], shapes: list, device) -> Tensor:
    """(3, H * W): for each token of the grid, the position of the patch holding it among the
    concatenated pooled maps of the three options (shapes: their (h_k, w_k))."""
    h, w = grid
    rows, cols = torch.arange(h, device=device)[:, None], torch.arange(w, device=device)[None, :]
    offsets = [0]
    for hh, ww in shapes[:-1]:
        offsets.append(offsets[-1] + hh * ww)
    return torch.stack([(offset + (rows // (REGION // s)) * ww + cols // (REGION // s)).flatten()
                        for offset, (_, ww), s in zip(offsets, shapes, SPLITS)])


def block_macs(queries: Tensor, tokens: float, dim: int, hidden: int, sr_ratio: int = 1) -> Tensor:
    """Multiply-adds of one (DGE) transformer block with `queries` queries over a map of
    `tokens` tokens, counting what the FLOP counter counts (matrix products, convolutions):
    spatial reduction (an sr x sr convolution, when sr > 1) and key / value projections on
    the map, then per query its projection, attention over tokens / sr^2 keys (QK^T and AV,
    the latter left out of the official PVT formula), output projection and MLP."""
    keys = tokens / sr_ratio ** 2
    static = (tokens * dim * dim if sr_ratio > 1 else 0.0) + keys * 2 * dim * dim
    return static + queries * (2 * dim * dim + 2 * keys * dim + 2 * dim * hidden)
