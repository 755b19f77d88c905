"""SPA, select-and-pack attention (the SPT backbone's token sparsity): in a Swin block, a
linear gate scores every token; the selected ones (the objects', as the selection loss
teaches) are packed, images end to end, into containers of one window's length and attend
within them; the others skip the attention and only go through the FFN.

- The score is carried across scales: a block's score is the max of its gate's and the
  max-pooled score of the previous, finer scale (`pooled_score`).
- Selection (`binary_concrete`, the token core): a relaxed Bernoulli sample above 0.01 in
  training (straight-through), sigmoid(score) > 0.01 in evaluation; padding is never selected.
- The selected tokens' normalised values are scaled by sigmoid(score) (after the block's
  first LayerNorm, which would cancel any scaling before it).
- Pack order (`window_order`): each image's tokens in Swin's (shifted) window order on the
  image's own grid (its own padding to whole windows, its own cyclic shift), so container
  membership changes from block to block and does not depend on the rest of the batch.
  A token attends only to the tokens of its image and of its shifted-window region in its
  container (the region term makes SPA with every token selected and images packed apart
  equal Swin's window attention); the relative position bias is Swin's, indexed by the
  clamped offset between the tokens' positions on the shifted map.
- `selection_labels`: the union of the ground-truth boxes (or masks) on a stage's grid, a
  token positive when its cell overlaps the union; `selection_loss`: binary cross-entropy
  on the score, the mean over the batch's valid tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..transformers.attention import attention
from .tokens import Packing, binary_concrete, block_diagonal_mask, keep_counts, pack_layout, select_top

CONTAINER = 49  # Swin's window of 7 x 7 tokens
PAD_SCORE = -1e4  # the score of padding: never selected, and lost in every max


class SPAGate(nn.Linear):
    """The block's gate: a token's selection logit, Linear C -> 1 (trunc-normal 0.02, bias 0)."""

    def __init__(self, dim: int):
        super().__init__(dim, 1)
        nn.init.trunc_normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., C) -> scores (...)."""
        return super().forward(x).squeeze(-1)


def shift_regions(ph: int, pw: int, window: int, sh: int, sw: int, device=None) -> Tensor:
    """(ph, pw) long: Swin's shifted-window regions on a map padded to whole windows and
    rolled by (-sh, -sw): 3 x 3 bands (the body, the last window, the wrapped rows/columns),
    all 0 without a shift. Tokens of different regions of one window must not attend."""
    region = torch.zeros(ph, pw, dtype=torch.long, device=device)
    if sh or sw:
        for i, rows in enumerate((slice(0, ph - window), slice(ph - window, ph - sh), slice(ph - sh, ph))):
            for j, cols in enumerate((slice(0, pw - window), slice(pw - window, pw - sw), slice(pw - sw, pw))):
                region[rows, cols] = 3 * i + j
    return region


@lru_cache(maxsize=256)
def window_order(h: int, w: int, window: int, shift: int) -> tuple[Tensor, Tensor, Tensor]:
    """An h x w map's tokens in Swin's window order: the map padded to whole windows,
    rolled by -shift (no shift along a side one window covers, as torchvision), windows
    row-major, tokens row-major inside each. -> (rows (h*w,) each token's row of the map,
    coords (h*w, 2) its (y, x) on the rolled padded map, region (h*w,) its shifted-window
    region, 0 when not shifted). On the CPU; the caller moves them."""
    ph, pw = -(-h // window) * window, -(-w // window) * window
    sh, sw = (0 if window >= ph else shift), (0 if window >= pw else shift)
    ys, xs = torch.meshgrid(torch.arange(ph), torch.arange(pw), indexing="ij")  # rolled coordinates

    def windowed(t: Tensor) -> Tensor:
        return t.view(ph // window, window, pw // window, window).permute(0, 2, 1, 3).flatten()

    ry, rx = windowed(ys), windowed(xs)
    oy, ox = (ry + sh) % ph, (rx + sw) % pw  # where each rolled position comes from
    region = shift_regions(ph, pw, window, sh, sw)
    real = (oy < h) & (ox < w)
    return (oy * w + ox)[real], torch.stack([ry, rx], 1)[real], windowed(region)[real]


@dataclass
class StageLayout:
    """A batch's tokens at one scale and shift, each image's in its window order, padded to
    the batch's largest count K: rows (B, K) in the batch's flattened map, coords (B, K, 2),
    region (B, K), real (B, K) bool."""

    rows: Tensor
    coords: Tensor
    region: Tensor
    real: Tensor


def stage_layout(sizes: list[tuple[int, int]], width: int, window: int, shift: int, device) -> StageLayout:
    """The layout of images of (h, w) tokens at the top-left of a map `width` tokens wide."""
    orders = [window_order(h, w, window, shift) for h, w in sizes]
    k = max(len(o[0]) for o in orders)
    rows = torch.zeros(len(sizes), k, dtype=torch.long)
    coords = torch.zeros(len(sizes), k, 2, dtype=torch.long)
    region = torch.zeros(len(sizes), k, dtype=torch.long)
    real = torch.zeros(len(sizes), k, dtype=torch.bool)
    for i, ((h, w), (r, c, g)) in enumerate(zip(sizes, orders)):
        n = len(r)
        rows[i, :n] = r // w * width + r % w
        coords[i, :n], region[i, :n], real[i, :n] = c, g, True
    return StageLayout(rows.to(device), coords.to(device), region.to(device), real.to(device))


def pooled_score(score: Tensor, valid: Tensor | None) -> Tensor:
    """A finer scale's scores (B, H, W) -> the next scale's s_up (B, ceil(H/2), ceil(W/2)):
    the max over each 2 x 2 cell (as patch merging pads odd sizes), padding left out."""
    if valid is not None:
        score = score.masked_fill(~valid, PAD_SCORE)
    return F.max_pool2d(score.unsqueeze(1), 2, ceil_mode=True).squeeze(1)


def relative_bias(table: Tensor, coords: Tensor, window: int) -> Tensor:
    """Swin's relative position bias between packed tokens: table ((2M-1)^2, heads), coords
    (n, L, 2) on the shifted map -> (n, heads, L, L), offsets clamped to the window's."""
    offset = (coords[:, :, None] - coords[:, None, :]).clamp(-(window - 1), window - 1) + window - 1
    index = offset[..., 0] * (2 * window - 1) + offset[..., 1]
    return table[index].permute(0, 3, 1, 2)


def packed_attention(attn: nn.Module, tokens: Tensor, ids: Tensor, coords: Tensor, backend: str = "sdpa",
                     chunk_tokens: int = 2048) -> Tensor:
    """Attention within containers: tokens (n, L, C), ids (n, L) the group of each slot,
    coords (n, L, 2) -> (n, L, C). `attn` holds a Swin window attention's qkv, proj,
    relative_position_bias_table, num_heads, window_size and dropouts. `backend`: "sdpa"
    (`attention` with each container's mask and bias; without gradients
    the containers go in chunks, so a chunk's query/key/value stay in cache) or "flex"
    (flex_attention over the containers laid end to end, with a block mask)."""
    n, length, c = tokens.shape
    heads, window = attn.num_heads, attn.window_size[0]
    if backend not in ("sdpa", "flex"):
        raise ValueError(f"model.backbone.spt.attention: '{backend}' is not sdpa or flex")
    step = max(n, 1) if backend == "flex" or torch.is_grad_enabled() else max(chunk_tokens // length, 1)
    outs = []
    # no selected token: one empty pass still, so the block's weights get their (zero) gradient
    for i in range(0, max(n, 1), step):
        part = tokens[i:i + step]
        qkv = F.linear(part, attn.qkv.weight, attn.qkv.bias)
        q, k, v = qkv.view(len(part), length, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        if backend == "flex":
            out = _flex_containers(q, k, v, ids, coords, attn.relative_position_bias_table, window)
        else:
            bias = relative_bias(attn.relative_position_bias_table, coords[i:i + step], window)
            bias = bias.masked_fill(~block_diagonal_mask(ids[i:i + step])[:, None], float("-inf"))
            out = attention(q, k, v, bias.to(q.dtype), attn.attention_dropout if attn.training else 0.0)
        out = F.linear(out.transpose(1, 2).reshape(len(part), length, c), attn.proj.weight, attn.proj.bias)
        outs.append(F.dropout(out, p=attn.dropout, training=attn.training))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


FLEX_COMPILED = True  # flex_attention through torch.compile (eager: the reference form, for tests)
FLEX_BUCKET = 16  # containers are padded to a multiple of this: each new length compiles anew
_flex = None


def _flex_containers(q: Tensor, k: Tensor, v: Tensor, ids: Tensor, coords: Tensor, table: Tensor,
                     window: int) -> Tensor:
    """flex_attention over containers laid end to end: q, k, v (n, heads, L, d) -> (n, heads,
    L, d); a slot sees the slots of its container and group, plus the relative position bias.
    Compiled with static shapes (the C++ kernel does not compile with dynamic ones here)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _flex
    if _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False) if FLEX_COMPILED else flex_attention
    n, heads, length, d = q.shape
    extra = -n % FLEX_BUCKET if FLEX_COMPILED else 0
    if extra:  # padding containers: each slot a group of its own
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, 0, 0, extra)) for t in (q, k, v))
        ids = torch.cat([ids, ids.min() - 1 - torch.arange(extra * length, device=ids.device).view(extra, length)])
        coords = F.pad(coords, (0, 0, 0, 0, 0, extra))
    total = (n + extra) * length
    q, k, v = (t.transpose(0, 1).reshape(1, heads, total, d) for t in (q, k, v))
    # contiguous captured tensors: views of one buffer do not lower into the CPU kernel
    ids, (cy, cx) = ids.flatten(), (t.contiguous() for t in coords.reshape(total, 2).unbind(1))
    side = 2 * window - 1

    def same_group(b, h, qi, ki):
        return (qi // length == ki // length) & (ids[qi] == ids[ki])

    def position_bias(score, b, h, qi, ki):
        dy = (cy[qi] - cy[ki]).clamp(-(window - 1), window - 1) + window - 1
        dx = (cx[qi] - cx[ki]).clamp(-(window - 1), window - 1) + window - 1
        return score + table[dy * side + dx, h]

    mask = create_block_mask(same_group, 1, 1, total, total, device=q.device)
    out = _flex(q, k, v, score_mod=position_bias, block_mask=mask)
    return out.view(heads, n + extra, length, d)[:, :n].transpose(0, 1)


def sample_drop(p: float, batch: int, training: bool, device) -> Tensor | None:
    """Stochastic depth by sample: (B,) factors 0 or 1 / (1 - p), None when nothing drops."""
    if not training or p == 0.0:
        return None
    return torch.empty(batch, device=device).bernoulli_(1 - p) / (1 - p)


def select(score: Tensor, valid: Tensor | None, training: bool, threshold: float, tau: float,
           forced: float | None = None) -> Tensor:
    """(B, H, W) selections (floats, 1 selected; straight-through in training) from scores;
    `forced`: each image's best `forced` share of its valid tokens instead, for benchmarks
    on random weights (the cost depends on the selected count only)."""
    if forced is not None:
        flat = score.flatten(1)
        padding = torch.zeros_like(flat, dtype=torch.bool) if valid is None else ~valid.flatten(1)
        return select_top(flat, keep_counts(padding, forced), padding).dense(flat.shape[1]).view_as(score).to(
            score.dtype)
    picked = binary_concrete(score, training, threshold, tau)
    return picked if valid is None else picked * valid


def packing_of(picked: Tensor, layout: StageLayout, region_mask: bool = True, align_images: bool = False) -> Packing:
    """The containers of the selected tokens (`picked` (B, H, W), `select`) in the layout's
    order, grouped by image (and by shifted-window region with `region_mask`)."""
    keep = picked.flatten(1).gather(1, layout.rows).bool() & layout.real
    return pack_layout(keep, picked[0].numel(), CONTAINER, order=layout.rows,
                       groups=layout.region if region_mask else None, align_images=align_images)


def spa_attention(block: nn.Module, x: Tensor, normed: Tensor, score: Tensor, picked: Tensor, packing: Packing,
                  layout: StageLayout, backend: str = "sdpa") -> Tensor:
    """x (B, H, W, C) after the attention half of an SPA block (a torchvision Swin block's
    attn and stochastic_depth; `normed` is its norm1(x)): the selected tokens (`picked`,
    packed by `packing_of`), scaled by sigmoid(score), attend in their containers and add
    the result; the others stay as they are."""
    c = x.shape[-1]
    rows = packing.rows
    weight = (picked * score.sigmoid()).reshape(-1)[rows, None]
    values = normed.reshape(-1, c).index_select(0, rows) * weight
    tokens = values.new_zeros(packing.ids.numel(), c).index_copy(0, packing.slots, values)
    coords = layout.coords.new_zeros(packing.ids.numel(), 2).index_copy(
        0, packing.slots, layout.coords[packing.images, packing.members])
    out = packed_attention(block.attn, tokens.view(*packing.shape, c), packing.ids, coords.view(*packing.shape, 2),
                           backend)
    out = out.reshape(-1, c).index_select(0, packing.slots)
    drop = sample_drop(block.stochastic_depth.p, x.shape[0], block.training, x.device)
    if drop is not None:
        out = out * drop[packing.images, None]
    return x.reshape(-1, c).index_add(0, rows, out.to(x.dtype)).view_as(x)  # bf16 training: drop is fp32


def spa_block(block: nn.Module, x: Tensor, normed: Tensor, score: Tensor, picked: Tensor, packing: Packing,
              layout: StageLayout, backend: str = "sdpa") -> Tensor:
    """One SPA block (`spa_attention`, then every token through the FFN)."""
    x = spa_attention(block, x, normed, score, picked, packing, layout, backend)
    return x + block.stochastic_depth(block.mlp(block.norm2(x)))


def selection_labels(targets: list[dict], shape: tuple[int, int], stride: int, from_masks: bool = False) -> Tensor:
    """(B, H, W) float: 1 at the tokens of a stride-`stride` grid of `shape` whose cell
    overlaps the union of the image's boxes (absolute xyxy) by some area, or with
    `from_masks` of its masks (N, h, w) at input resolution."""
    h, w = shape
    out = []
    for t in targets:
        if from_masks:
            masks = t["masks"]
            union = masks.any(0) if len(masks) else masks.new_zeros(masks.shape[1:], dtype=torch.bool)
            union = F.pad(union.float(), (0, w * stride - union.shape[1], 0, h * stride - union.shape[0]))
            out.append(F.max_pool2d(union[None, None], stride)[0, 0])
            continue
        boxes = t["boxes"].float()
        edges_y = torch.arange(h + 1, device=boxes.device) * stride
        edges_x = torch.arange(w + 1, device=boxes.device) * stride
        rows = (boxes[:, 1:2] < edges_y[1:]) & (boxes[:, 3:4] > edges_y[:-1])  # (N, H)
        cols = (boxes[:, 0:1] < edges_x[1:]) & (boxes[:, 2:3] > edges_x[:-1])  # (N, W)
        out.append((rows[:, :, None] & cols[:, None, :]).any(0).float() if len(boxes) else
                   boxes.new_zeros(h, w))
    return torch.stack(out)


def selection_loss(score: Tensor, labels: Tensor, valid: Tensor | None) -> Tensor:
    """Binary cross-entropy of scores (B, H, W) against labels, the mean over valid tokens."""
    loss = F.binary_cross_entropy_with_logits(score, labels, reduction="none")
    if valid is None:
        return loss.mean()
    return (loss * valid).sum() / valid.sum().clamp(min=1)
