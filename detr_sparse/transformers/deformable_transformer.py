"""Deformable DETR's transformer (Zhu et al. 2021): multi-scale deformable attention in the
encoder and in the decoder's cross-attention, optional iterative box refinement and
two-stage proposals, including the memory-initialised queries of Efficient DETR that
Deformable DETR+ and Sparse DETR use.

Tensors are batch-first. The encoder's tokens are every level's map flattened row-major,
levels in order: S = sum over levels of H_l * W_l. Normalised coordinates are (x, y) in
[0, 1] of the padded map unless said otherwise."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .detr_transformer import FFN
from .ms_deform_attn import MSDeformAttn

QUERY_INITS = ("embedding", "memory")


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [eps, 1 - eps], so references at 0 or 1 stay finite."""
    return torch.special.logit(x, eps=eps)


def refine_boxes(delta: Tensor, reference: Tensor) -> Tensor:
    """Box logits `delta` (..., 4) relative to `reference`: (..., 4) normalised cxcywh boxes,
    or (..., 2) centres, which only anchor (cx, cy). -> boxes (..., 4) normalised cxcywh."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()


def valid_ratios(masks: list[Tensor]) -> Tensor:
    """Per-level padding masks (B, H_l, W_l), True at padding -> (B, L, 2) as
    (valid width / W_l, valid height / H_l). Padding is at the bottom and right, so the
    first row and column hold the valid extent."""
    ratios = []
    for m in masks:
        valid_h = (~m[:, :, 0]).sum(1).float() / m.shape[1]
        valid_w = (~m[:, 0, :]).sum(1).float() / m.shape[2]
        ratios.append(torch.stack([valid_w, valid_h], -1))
    return torch.stack(ratios, 1)


def _grid(h: int, w: int, device) -> tuple[Tensor, Tensor]:
    """Pixel centres of an h x w map, flattened row-major: x (h*w,), y (h*w,)."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                          torch.arange(w, dtype=torch.float32, device=device) + 0.5, indexing="ij")
    return x.flatten(), y.flatten()


def encoder_reference_points(shapes: list[tuple[int, int]], ratios: Tensor) -> Tensor:
    """Every token's centre normalised to its image's valid region, then expressed in the
    padded coordinates of every level. ratios (B, L, 2) -> (B, S, L, 2) as (x, y)."""
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        x, y = _grid(h, w, ratios.device)
        x = x[None] / (ratios[:, None, lvl, 0] * w)
        y = y[None] / (ratios[:, None, lvl, 1] * h)
        refs.append(torch.stack([x, y], -1))
    return torch.cat(refs, 1)[:, :, None] * ratios[:, None]


def encoder_proposals(mask: Tensor, shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """One box proposal per token: its centre normalised to the valid region, side
    0.05 * 2**level. mask (B, S) True at padding -> (box logits (B, S, 4) as
    inverse-sigmoid cxcywh, +inf at padded tokens and at boxes not inside (0.01, 0.99);
    valid (B, S) bool, False there)."""
    b = mask.shape[0]
    boxes, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        m = mask[:, start:start + h * w].view(b, h, w)
        start += h * w
        x, y = _grid(h, w, mask.device)
        cx = x[None] / (~m[:, 0, :]).sum(1, keepdim=True)
        cy = y[None] / (~m[:, :, 0]).sum(1, keepdim=True)
        side = torch.full_like(cx, 0.05 * 2.0**lvl)
        boxes.append(torch.stack([cx, cy, side, side], -1))
    boxes = torch.cat(boxes, 1)
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1) & ~mask
    # padded tokens' centres exceed 1: log of a negative ratio would be NaN before the fill
    boxes = torch.where(valid[..., None], boxes, torch.full_like(boxes, 0.5))
    logits = torch.log(boxes / (1 - boxes)).masked_fill(~valid[..., None], float("inf"))
    return logits, valid


def proposal_pos_embed(box_logits: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of boxes given as logits (B, Q, 4) -> (B, Q, 4 * num_feats): for each
    of cx, cy, w, h (sigmoid, scaled to [0, 2 pi]) num_feats channels alternating sin, cos."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=box_logits.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos = box_logits.float().sigmoid()[..., None] * (2 * math.pi) / dim_t  # (B, Q, 4, F)
    return torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], -1).flatten(2)


class DeformableEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention over all levels, then an FFN."""

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, dropout: float, n_levels: int,
                 n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.ffn = FFN(d_model, d_ffn, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, shapes: Tensor,
                starts: Tensor, mask: Tensor | None, value: Tensor | None = None) -> Tensor:
        """src, pos (B, Q, C); value (B, S, C), the whole token map the queries sample from:
        src itself (dense) or the map a subset of it (src) was gathered from (Sparse DETR)."""
        value = src if value is None else value
        x = self.self_attn(src + pos, reference_points, value, shapes, starts, mask)
        src = self.norm1(src + self.dropout1(x))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DeformableDecoderLayer(nn.Module):
    """Post-norm: self-attention among the queries, deformable cross-attention into the
    encoder memory around each query's reference, FFN."""

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, dropout: float, n_levels: int,
                 n_points: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.ffn = FFN(d_model, d_ffn, dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                shapes: Tensor, starts: Tensor, mask: Tensor | None) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        x = self.cross_attn(tgt + query_pos, reference_points, memory, shapes, starts, mask)
        tgt = self.norm2(tgt + self.dropout2(x))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class DeformableEncoder(nn.ModuleList):
    """The encoder layers. A ModuleList (with a forward) so activation checkpointing and FLOP
    accounting see one block per layer."""

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, shapes: Tensor,
                starts: Tensor, mask: Tensor | None) -> Tensor:
        for layer in self:
            src = layer(src, pos, reference_points, shapes, starts, mask)
        return src


class DeformableDecoder(nn.ModuleList):
    """The decoder layers, optionally refining the reference boxes after each layer."""

    def forward(self, tgt: Tensor, reference: Tensor, memory: Tensor, shapes: Tensor,
                starts: Tensor, ratios: Tensor, query_pos: Tensor, mask: Tensor | None,
                box_heads=None) -> tuple[Tensor, list[Tensor]]:
        """tgt, query_pos (B, Q, C); reference (B, Q, 2) centres or (B, Q, 4) boxes,
        normalised to the valid region; ratios (B, L, 2); box_heads: one per layer for
        iterative refinement, or None. -> (outputs (n_layers, B, Q, C), the reference
        each layer's boxes are relative to: n_layers tensors (B, Q, 2 or 4))."""
        outputs, references = [], []
        for i, layer in enumerate(self):
            scale = ratios if reference.shape[-1] == 2 else torch.cat([ratios, ratios], -1)
            tgt = layer(tgt, query_pos, reference[:, :, None] * scale[:, None], memory, shapes,
                        starts, mask)
            outputs.append(tgt)
            references.append(reference)
            if box_heads is not None and i < len(self) - 1:
                # detached, as in the official code: each layer learns its own offset only
                reference = refine_boxes(box_heads[i](tgt), reference).detach()
        return torch.stack(outputs), references


class DeformableTransformer(nn.Module):
    """Encoder over multi-scale tokens, queries (learnt, or the top-k encoder proposals
    with two-stage), decoder. See `forward` for the inputs and outputs.

    query_init (two-stage only): "embedding" = Deformable DETR, the queries' content and
    position both come from the proposal's sine embedding, proposals ranked by the class-0
    (foreground) logit; "memory" = Efficient DETR / Deformable DETR+, the content is the
    selected encoder token itself and proposals are ranked by their best class logit."""

    def __init__(self, d_model: int = 256, nhead: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 enc_n_points: int = 4, dec_n_points: int = 4, two_stage: bool = False,
                 num_queries: int = 300, query_init: str = "embedding"):
        super().__init__()
        if query_init not in QUERY_INITS:
            raise ValueError(f"query_init '{query_init}' not in {QUERY_INITS}")
        if query_init == "memory" and not two_stage:
            raise ValueError("query_init 'memory' needs two-stage proposals")
        self.d_model, self.n_levels, self.num_queries = d_model, n_levels, num_queries
        self.two_stage, self.query_init = two_stage, query_init
        enc = DeformableEncoderLayer(d_model, nhead, dim_feedforward, dropout, n_levels, enc_n_points)
        dec = DeformableDecoderLayer(d_model, nhead, dim_feedforward, dropout, n_levels, dec_n_points)
        self.encoder = DeformableEncoder(copy.deepcopy(enc) for _ in range(enc_layers))
        self.decoder = DeformableDecoder(copy.deepcopy(dec) for _ in range(dec_layers))
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            pos_dim = 2 * d_model if query_init == "embedding" else d_model
            self.pos_trans = nn.Linear(2 * d_model, pos_dim)
            self.pos_trans_norm = nn.LayerNorm(pos_dim)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # the deformable attention's own init (offset ring, uniform weights) overrides xavier
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def flatten(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor]):
        """Per-level maps -> tokens (B, S, C), mask (B, S), position + level embedding
        (B, S, C), shapes (L, 2) int64 as (H, W), level start indices (L,) int64."""
        if len(srcs) != self.n_levels:
            raise ValueError(f"the transformer was built for {self.n_levels} levels, got {len(srcs)}")
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl]
                         for lvl, p in enumerate(pos_embeds)], 1)
        shapes = torch.as_tensor([s.shape[-2:] for s in srcs], dtype=torch.int64, device=src.device)
        starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
        return src, mask, pos, shapes, starts

    def two_stage_queries(self, memory: Tensor, mask: Tensor, shapes: list[tuple[int, int]],
                          class_head: nn.Module, box_head: nn.Module):
        """Encoder proposals and the decoder queries from the best num_queries of them.
        -> tgt (B, Q, C), query_pos (B, Q, C), reference boxes (B, Q, 4),
        {enc_logits (B, S, K), enc_boxes_unact (B, S, 4)}; in eval mode the boxes of the
        unselected tokens are left out (only the loss needs them): enc_boxes_unact is None."""
        proposals, valid = encoder_proposals(mask, shapes)
        out_memory = memory.masked_fill(~valid[..., None], 0.0)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        enc_logits = class_head(out_memory)
        score = enc_logits[..., 0] if self.query_init == "embedding" else enc_logits.max(-1).values
        # tokens without a proposal (padding, image border) are never picked (the official
        # code may pick them): a padded batch then gives what its images give alone
        score = score.masked_fill(~valid, float("-inf"))
        topk = score.topk(self.num_queries, dim=1).indices
        if self.training:
            enc_boxes = box_head(out_memory) + proposals
            boxes = enc_boxes.gather(1, topk[..., None].expand(-1, -1, 4)).detach()
        else:
            take = lambda x: x.gather(1, topk[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
            enc_boxes, boxes = None, box_head(take(out_memory)) + take(proposals)
        pos = self.pos_trans_norm(self.pos_trans(proposal_pos_embed(boxes, self.d_model // 2)))
        if self.query_init == "embedding":
            query_pos, tgt = pos.split(self.d_model, -1)
        else:
            query_pos = pos
            tgt = memory.gather(1, topk[..., None].expand(-1, -1, memory.shape[-1]))
        enc = {"enc_logits": enc_logits, "enc_boxes_unact": enc_boxes}
        return tgt, query_pos, boxes.sigmoid(), enc

    def prepare(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor]) -> "TokenMap":
        """The encoder's input from per-level maps (B, C, H_l, W_l), masks (B, H_l, W_l) True
        at padding, and position embeddings like srcs."""
        src, mask, pos, shapes, starts = self.flatten(srcs, masks, pos_embeds)
        shape_list = [tuple(s.shape[-2:]) for s in srcs]
        ratios = valid_ratios(masks)
        return TokenMap(src, mask, pos, shapes, starts, shape_list, ratios,
                        encoder_reference_points(shape_list, ratios))

    def encode(self, t: "TokenMap") -> Tensor:
        """The dense encoder: every token attends and is updated. -> memory (B, S, C)."""
        return self.encoder(t.src, t.pos, t.reference_points, t.shapes, t.starts, t.mask)

    def decode(self, t: "TokenMap", memory: Tensor, query_embed: Tensor | None = None,
               enc_heads=None, box_heads=None) -> dict:
        """Queries (learnt, or the top-k encoder proposals with two-stage) and the decoder;
        see `forward`."""
        out = {"memory": memory, "mask": t.mask}
        if self.two_stage:
            if enc_heads is None:
                raise ValueError("a two-stage transformer needs enc_heads")
            tgt, query_pos, reference, enc = self.two_stage_queries(memory, t.mask, t.shape_list, *enc_heads)
            out.update(enc)
        else:
            if query_embed is None:
                raise ValueError("a transformer without two-stage needs query_embed")
            # repeat, not expand: FlopCounterMode's module tracker fails on a no-grad view
            # of a parameter that requires grad
            query_pos, tgt = query_embed.unsqueeze(0).repeat(t.src.shape[0], 1, 1).split(self.d_model, -1)
            reference = self.reference_points(query_pos).sigmoid()
        out["hs"], out["references"] = self.decoder(tgt, reference, memory, t.shapes, t.starts, t.ratios,
                                                    query_pos, t.mask, box_heads)
        return out

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                query_embed: Tensor | None = None, enc_heads=None, box_heads=None) -> dict:
        """srcs, pos_embeds: per level (B, C, H_l, W_l); masks: per level (B, H_l, W_l), True
        at padding; query_embed (Q, 2C) (position, content) without two-stage; enc_heads:
        (class head, box head) of the encoder proposals with two-stage; box_heads: one per
        decoder layer for iterative box refinement, or None.

        Returns hs (n_dec, B, Q, C); references: n_dec tensors (B, Q, 2 or 4) each layer's
        boxes are relative to; memory (B, S, C); mask (B, S); with two-stage enc_logits
        (B, S, K) and enc_boxes_unact (B, S, 4) (+inf where a token has no proposal)."""
        t = self.prepare(srcs, masks, pos_embeds)
        return self.decode(t, self.encode(t), query_embed, enc_heads, box_heads)


@dataclass
class TokenMap:
    """The encoder's input: tokens src, position + level embeddings pos (B, S, C); mask (B, S)
    True at padding; shapes (L, 2) int64 as (H, W) and as a list; starts (L,) level start
    indices; valid ratios (B, L, 2); reference_points (B, S, L, 2) of every token."""
    src: Tensor
    mask: Tensor
    pos: Tensor
    shapes: Tensor
    starts: Tensor
    shape_list: list[tuple[int, int]]
    ratios: Tensor
    reference_points: Tensor
