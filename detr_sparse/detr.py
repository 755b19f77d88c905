"""DETR: CNN backbone -> 1x1 projection -> transformer -> class and box heads, trained with
a set loss. Follows the detector contract of docs/architecture.md ("The detector contract"):
losses in training, one dict of detections per image in eval. With `enable_panoptic` it also
segments (DETR section 4.4): a mask per query from the encoder memory and the finer backbone
maps, mask losses on the matched queries, and a panoptic map per image in eval; the detector
can be frozen so that only the mask branch trains, as DETR trains it."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_convert

from .backbones import build_backbone
from .criterion import SetCriterion
from .heads.detr_heads import MLP
from .heads.detr_panoptic import PanopticHead
from .image_batch import ImageBatch
from .matcher import build_matcher
from .position_encoding import PositionEmbeddingSine
from .postprocess import postprocess_panoptic, postprocess_softmax
from .transformers.detr_transformer import Transformer


def normalized_targets(targets: list[dict], sizes: Tensor) -> list[dict]:
    """Absolute xyxy boxes -> cxcywh normalised by each image's unpadded size."""
    out = []
    for t, (h, w) in zip(targets, sizes.tolist()):
        scale = t["boxes"].new_tensor([w, h, w, h])
        out.append({**t, "boxes": box_convert(t["boxes"] / scale, "xyxy", "cxcywh")})
    return out


def padded_masks(targets: list[dict], shape) -> list[dict]:
    """Each target's masks (N, h, w) zero-padded to the batch's padded (H, W)."""
    out = []
    for t in targets:
        m = t["masks"]
        out.append({**t, "masks": F.pad(m, (0, shape[1] - m.shape[-1], 0, shape[0] - m.shape[-2]))})
    return out


def mask_to_feature(mask: Tensor, shape) -> Tensor:
    """Image padding mask (B, H, W) -> padding mask at a feature map's (h, w)."""
    return F.interpolate(mask[None].float(), size=tuple(shape))[0].bool()


class DETR(nn.Module):
    # prefixes of the module names that make up each part, for FLOP and latency accounting
    parts = {"backbone": "backbone", "encoder": "transformer.encoder",
             "decoder": "transformer.decoder"}

    def __init__(self, backbone: nn.Module, transformer: Transformer, num_classes: int,
                 num_queries: int, criterion: SetCriterion, aux_loss: bool = True):
        super().__init__()
        d = transformer.d_model
        self.backbone = backbone
        self.feature_name = backbone.out_features[-1]
        self.input_proj = nn.Conv2d(backbone.channels[self.feature_name], d, kernel_size=1)
        self.position_embedding = PositionEmbeddingSine(d // 2, normalize=True)
        self.transformer = transformer
        self.query_embed = nn.Embedding(num_queries, d)
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.criterion = criterion
        self.aux_loss = aux_loss
        self.panoptic_head: PanopticHead | None = None
        self.freeze_detector = False

    def enable_panoptic(self, is_thing: list[bool], heads: int, threshold: float = 0.85,
                        freeze_detector: bool = False) -> None:
        """Add DETR's segmentation branch on the backbone's maps finer than the detection map
        (e.g. out_features [res2, res3, res4, res5]). is_thing[label]: a thing class (one
        segment per query) or stuff (the queries of a class merge into one segment);
        threshold: the class score a query needs to take part in the panoptic map;
        freeze_detector: train the mask branch only (requires_grad off elsewhere, and the
        detector runs without autograd)."""
        finer = list(self.backbone.out_features[:-1])[::-1]
        if not finer:
            raise ValueError("model.panoptic: the mask head needs backbone maps finer than the detection "
                             f"map; model.backbone.out_features is {list(self.backbone.out_features)}, "
                             "e.g. [res2, res3, res4, res5]")
        self.mask_features = finer
        d = self.transformer.d_model
        self.panoptic_head = PanopticHead(d, heads, [self.backbone.channels[n] for n in finer])
        self.parts = {**self.parts, "mask head": "panoptic_head"}
        self.eval_types = ("bbox", "panoptic")
        self.register_buffer("is_thing", torch.tensor(is_thing, dtype=torch.bool))
        self.panoptic_threshold = threshold
        self.freeze_detector = freeze_detector
        for name, p in self.named_parameters():
            if freeze_detector and not name.startswith("panoptic_head."):
                p.requires_grad_(False)

    def tokens(self, images: ImageBatch) -> tuple[Tensor, Tensor, Tensor]:
        """The transformer's input: projected features (B, N, C), padding mask (B, N) with
        True at padding, and position embeddings (B, N, C)."""
        src, mask, pos = self.feature_map(self.backbone(images.tensors), images.mask)
        return src.flatten(2).transpose(1, 2), mask.flatten(1), pos.flatten(2).transpose(1, 2)

    def feature_map(self, features: dict, image_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Backbone maps and the image padding mask (B, H, W) -> projected detection map
        (B, C, h, w), its padding mask (B, h, w) and position embeddings (B, C, h, w)."""
        feature = features[self.feature_name]
        mask = mask_to_feature(image_mask, feature.shape[-2:])
        return self.input_proj(feature), mask, self.position_embedding(mask)

    def run_transformer(self, src: Tensor, mask: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, dict]:
        """The maps of feature_map -> decoder outputs (layers, B, Q, C), encoder memory
        (B, N, C) and extra raw outputs (none here)."""
        hs, memory = self.transformer(src.flatten(2).transpose(1, 2), mask.flatten(1),
                                      self.query_embed.weight, pos.flatten(2).transpose(1, 2))
        return hs, memory, {}

    def memory_map(self, memory: Tensor, out: dict, shape) -> Tensor:
        """Encoder memory (B, N, C) -> (B, C, h, w) for the mask head; shape (B, C, h, w)."""
        return memory.transpose(1, 2).reshape(shape)

    def forward_raw(self, images: ImageBatch) -> dict:
        """Raw outputs: pred_logits (B, Q, K+1), pred_boxes (B, Q, 4) normalised cxcywh,
        aux_outputs for the earlier decoder layers; with the panoptic branch pred_masks
        (B, Q, H/s, W/s) mask logits at the stride s of the finest backbone map."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_detector):
            features = self.backbone(images.tensors)
            src, mask, pos = self.feature_map(features, images.mask)
            hs, memory, extra = self.run_transformer(src, mask, pos)
            out = {**self.predictions(hs), **extra}
        if self.panoptic_head is not None:
            out["pred_masks"] = self.panoptic_head(hs[-1], self.memory_map(memory, out, src.shape), mask, src,
                                                   [features[n] for n in self.mask_features])
        return out

    def predictions(self, hs: Tensor) -> dict:
        """Decoder outputs (layers, B, Q, C) -> pred_logits, pred_boxes, aux_outputs."""
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1])]
        return out

    def losses(self, out: dict, images: ImageBatch, targets: list[dict] | None) -> dict:
        """The criterion's losses for forward_raw's outputs (targets in absolute xyxy)."""
        if targets is None:
            raise ValueError(f"{type(self).__name__} in training mode needs targets")
        targets = normalized_targets(targets, images.sizes)
        if "pred_masks" in out:
            targets = padded_masks(targets, images.tensors.shape[-2:])
        return self.criterion(out, targets)

    def forward(self, images: ImageBatch, targets: list[dict] | None = None):
        out = self.forward_raw(images)
        if self.training:
            return self.losses(out, images, targets)
        detections = postprocess_softmax(out, images.sizes)
        if "pred_masks" in out:
            panoptic = postprocess_panoptic(out, images.sizes, tuple(images.tensors.shape[-2:]),
                                            self.is_thing, self.panoptic_threshold)
            detections = [{**d, **p} for d, p in zip(detections, panoptic)]
        return detections


def build_detr(cfg, num_classes: int, is_thing: list[bool] | None = None, model_cls=DETR,
               **model_kwargs) -> DETR:
    """model.name "detr"; model_cls / model_kwargs: a subclass on the same parts (PnP-DETR).
    is_thing (per label): the dataset's thing / stuff split, needed by model.panoptic."""
    backbone = build_backbone(cfg.backbone, out_features=tuple(cfg.backbone.out_features))
    t = cfg.transformer
    transformer = Transformer(t.hidden_dim, t.nheads, t.enc_layers, t.dec_layers,
                              t.dim_feedforward, t.dropout, t.pre_norm)
    loss = cfg.loss
    criterion = SetCriterion(num_classes, build_matcher(loss), loss.cls_weight,
                             loss.bbox_weight, loss.giou_weight, loss.eos_coef,
                             mask_weight=loss.mask_weight, dice_weight=loss.dice_weight)
    model = model_cls(backbone, transformer, num_classes, cfg.num_queries, criterion, loss.aux_loss,
                      **model_kwargs)
    pan = cfg.panoptic
    if pan.enabled:
        if is_thing is None or len(is_thing) != num_classes:
            raise ValueError("model.panoptic.enabled needs the thing / stuff split of a panoptic "
                             "dataset (data.panoptic: true)")
        model.enable_panoptic(list(is_thing), t.nheads, pan.threshold, pan.freeze_detector)
    return model
