"""Deformable DETR (Zhu et al. 2021): multi-scale backbone maps -> per-level projections
(+ extra stride-2 levels) -> deformable transformer -> sigmoid class and box heads, trained
with a focal-loss set criterion. Options: iterative box refinement, two-stage proposals,
and the "+" variant (two-stage with Efficient DETR's memory-initialised queries, the
baseline of Sparse DETR). Detector contract as DETR's: losses in training, one dict of
detections per image in eval."""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from .backbones import build_backbone
from .criterion import SetCriterion
from .detr import mask_to_feature, normalized_targets
from .heads.detr_heads import MLP
from .image_batch import ImageBatch
from .matcher import build_matcher
from .position_encoding import PositionEmbeddingSine
from .postprocess import postprocess_sigmoid
from .transformers.deformable_transformer import DeformableTransformer, TokenMap, refine_boxes

DEFAULT_FEATURES = ["res3", "res4", "res5"]  # strides 8, 16, 32


class DeformableDETR(nn.Module):
    # prefixes of the module names that make up each part, for FLOP and latency accounting
    parts = {"backbone": "backbone", "encoder": "transformer.encoder",
             "decoder": "transformer.decoder"}

    def __init__(self, backbone: nn.Module, transformer: DeformableTransformer, num_classes: int,
                 num_queries: int, criterion: SetCriterion, aux_loss: bool = True,
                 with_box_refine: bool = False, two_stage: bool = False):
        super().__init__()
        d = transformer.d_model
        if two_stage != transformer.two_stage:
            raise ValueError("two_stage differs between the model and its transformer")
        self.backbone = backbone
        self.in_features = list(backbone.out_features)
        extra = transformer.n_levels - len(self.in_features)
        if extra < 0:
            raise ValueError(f"{len(self.in_features)} backbone maps for {transformer.n_levels} levels")
        projs = [nn.Sequential(nn.Conv2d(backbone.channels[n], d, 1), nn.GroupNorm(32, d))
                 for n in self.in_features]
        channels = backbone.channels[self.in_features[-1]]
        for _ in range(extra):  # coarser levels: stride-2 convolutions on the last map
            projs.append(nn.Sequential(nn.Conv2d(channels, d, 3, stride=2, padding=1), nn.GroupNorm(32, d)))
            channels = d
        self.input_proj = nn.ModuleList(projs)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.position_embedding = PositionEmbeddingSine(d // 2, normalize=True, offset=-0.5)
        self.transformer = transformer
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, 2 * d)  # (position, content)
        self.class_embed, self.bbox_embed = _heads(d, num_classes, len(transformer.decoder),
                                                   with_box_refine, two_stage)
        self.criterion = criterion
        self.aux_loss, self.with_box_refine, self.two_stage = aux_loss, with_box_refine, two_stage

    def features(self, images: ImageBatch) -> tuple[list[Tensor], list[Tensor]]:
        """Projected maps per level (B, C, H_l, W_l), finest first, and their padding masks
        (B, H_l, W_l), True at padding."""
        maps = self.backbone(images.tensors)
        srcs = [proj(maps[n]) for proj, n in zip(self.input_proj, self.in_features)]
        x = maps[self.in_features[-1]]
        for proj in self.input_proj[len(self.in_features):]:
            x = proj(x)
            srcs.append(x)
        return srcs, [mask_to_feature(images.mask, s.shape[-2:]) for s in srcs]

    def predict(self, srcs: list[Tensor], masks: list[Tensor]) -> dict:
        """Raw outputs from per-level maps and masks (see `features`): pred_logits (B, Q, K),
        pred_boxes (B, Q, 4) normalised cxcywh, aux_outputs for the earlier decoder layers,
        and with two-stage enc_outputs {pred_logits (B, S, K), pred_boxes (B, S, 4)} of the
        encoder proposals (boxes 1.0 where a token has no proposal)."""
        tokens = self.transformer.prepare(srcs, masks, [self.position_embedding(m) for m in masks])
        memory, extra = self.encode(tokens)
        n = len(self.transformer.decoder)
        t = self.transformer.decode(
            tokens, memory, None if self.two_stage else self.query_embed.weight,
            enc_heads=(self.class_embed[n], self.bbox_embed[n]) if self.two_stage else None,
            box_heads=self.bbox_embed[:n] if self.with_box_refine else None)
        logits = [self.class_embed[i](h) for i, h in enumerate(t["hs"])]
        boxes = [refine_boxes(self.bbox_embed[i](h), ref)
                 for i, (h, ref) in enumerate(zip(t["hs"], t["references"]))]
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1])]
        if self.two_stage and t["enc_boxes_unact"] is not None:
            out["enc_outputs"] = {"pred_logits": t["enc_logits"],
                                  "pred_boxes": t["enc_boxes_unact"].sigmoid()}
        return {**out, **extra}

    def encode(self, tokens: TokenMap) -> tuple[Tensor, dict]:
        """The encoder's memory (B, S, C) and any outputs of its own (none here; Sparse DETR
        adds its selection and auxiliary heads)."""
        return self.transformer.encode(tokens), {}

    def forward_raw(self, images: ImageBatch) -> dict:
        return self.predict(*self.features(images))

    def forward(self, images: ImageBatch, targets: list[dict] | None = None):
        out = self.forward_raw(images)
        if self.training:
            if targets is None:
                raise ValueError("Deformable DETR in training mode needs targets")
            return self.criterion(out, normalized_targets(targets, images.sizes))
        return postprocess_sigmoid(out, images.sizes)


def detection_head(d: int, num_classes: int) -> tuple[nn.Linear, MLP]:
    """A sigmoid class head (prior probability 0.01) and a box head predicting logit offsets
    from a reference, starting at zero offset."""
    class_head = nn.Linear(d, num_classes)
    nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))
    box_head = MLP(d, d, 4, 3)
    nn.init.zeros_(box_head.layers[-1].weight)
    nn.init.zeros_(box_head.layers[-1].bias)
    return class_head, box_head


def _heads(d: int, num_classes: int, dec_layers: int, with_box_refine: bool, two_stage: bool):
    """Class and box heads: one per decoder layer, plus one for the encoder proposals with
    two-stage (index dec_layers). Independent copies with box refinement, otherwise the same
    module repeated (shared weights), as in the official code."""
    class_head, box_head = detection_head(d, num_classes)
    n = dec_layers + int(two_stage)
    if with_box_refine:
        class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(n))
        bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(n))
    else:
        class_embed, bbox_embed = nn.ModuleList([class_head] * n), nn.ModuleList([box_head] * n)
    # Heads predict boxes relative to a reference. Only the learnt queries' first reference
    # is a bare centre: its boxes start at a size of sigmoid(-2) ~ 0.12; box references
    # (refined boxes, proposals) start with their own size.
    for i, head in enumerate(bbox_embed):
        centre_reference = not two_stage and (i == 0 or not with_box_refine)
        with torch.no_grad():
            head.layers[-1].bias[2:] = -2.0 if centre_reference else 0.0
    return class_embed, bbox_embed


def build_deformable_detr(cfg, num_classes: int, query_init: str = "embedding",
                          model_cls=DeformableDETR, **model_kwargs) -> DeformableDETR:
    """model.name "deformable_detr"; cfg is the model config. model_cls / model_kwargs: a
    subclass built on the same parts (Sparse DETR)."""
    if query_init == "memory" and not cfg.two_stage:
        raise ValueError(f"model.two_stage: model '{cfg.name}' initialises its queries from "
                         "the encoder proposals and needs model.two_stage=true")
    t = cfg.transformer
    if cfg.with_box_refine and not cfg.loss.aux_loss:
        # each layer's refinement heads learn from that layer's loss only (the reference
        # passed on is detached): without auxiliary losses they get no gradient
        raise ValueError("model.loss.aux_loss: box refinement needs the auxiliary decoder losses")
    if t.num_feature_levels < 1:
        raise ValueError(f"model.transformer.num_feature_levels: must be >= 1, got {t.num_feature_levels}")
    # a single configured map is DETR's default (res5): take the multi-scale default instead
    features = list(cfg.backbone.out_features)
    features = features if len(features) > 1 else DEFAULT_FEATURES
    features = features[-t.num_feature_levels:]  # fewer levels than maps: the coarsest ones
    backbone = build_backbone(cfg.backbone, out_features=tuple(features))
    transformer = DeformableTransformer(
        t.hidden_dim, t.nheads, t.enc_layers, t.dec_layers, t.dim_feedforward, t.dropout,
        t.num_feature_levels, t.enc_n_points, t.dec_n_points, cfg.two_stage, cfg.num_queries,
        query_init)
    loss = cfg.loss
    criterion = SetCriterion(num_classes, build_matcher(loss, focal=True), loss.cls_weight,
                             loss.bbox_weight, loss.giou_weight, loss.eos_coef,
                             focal_alpha=loss.focal_alpha, binary_enc=query_init == "embedding")
    return model_cls(backbone, transformer, num_classes, cfg.num_queries, criterion,
                     loss.aux_loss, cfg.with_box_refine, cfg.two_stage, **model_kwargs)


def build_deformable_detr_plus(cfg, num_classes: int) -> DeformableDETR:
    """model.name "deformable_detr_plus": two-stage with memory-initialised queries and a
    class-specific proposal head (Deformable DETR+, Sparse DETR's dense baseline)."""
    return build_deformable_detr(cfg, num_classes, query_init="memory")
