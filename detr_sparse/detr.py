"""DETR: CNN backbone -> 1x1 projection -> transformer -> class and box heads, trained with
a set loss. Follows the detector contract of DESIGN.md: losses in training, one dict of
detections per image in eval."""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_convert

from .backbones import build_backbone
from .criterion import SetCriterion
from .heads.detr_heads import MLP
from .image_batch import ImageBatch
from .matcher import build_matcher
from .position_encoding import PositionEmbeddingSine
from .postprocess import postprocess_softmax
from .transformers.detr_transformer import Transformer


def normalized_targets(targets: list[dict], sizes: Tensor) -> list[dict]:
    """Absolute xyxy boxes -> cxcywh normalised by each image's unpadded size."""
    out = []
    for t, (h, w) in zip(targets, sizes.tolist()):
        scale = t["boxes"].new_tensor([w, h, w, h])
        out.append({**t, "boxes": box_convert(t["boxes"] / scale, "xyxy", "cxcywh")})
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

    def tokens(self, images: ImageBatch) -> tuple[Tensor, Tensor, Tensor]:
        """The transformer's input: projected features (B, N, C), padding mask (B, N) with
        True at padding, and position embeddings (B, N, C)."""
        src, mask, pos = self.feature_map(images)
        return src.flatten(2).transpose(1, 2), mask.flatten(1), pos.flatten(2).transpose(1, 2)

    def feature_map(self, images: ImageBatch) -> tuple[Tensor, Tensor, Tensor]:
        """`tokens` before flattening: projected features (B, C, h, w), padding mask (B, h, w),
        position embeddings (B, C, h, w)."""
        feature = self.backbone(images.tensors)[self.feature_name]
        mask = mask_to_feature(images.mask, feature.shape[-2:])
        return self.input_proj(feature), mask, self.position_embedding(mask)

    def forward_raw(self, images: ImageBatch) -> dict:
        """Raw outputs: pred_logits (B, Q, K+1), pred_boxes (B, Q, 4) normalised cxcywh,
        aux_outputs for the earlier decoder layers."""
        src, mask, pos = self.tokens(images)
        hs, _ = self.transformer(src, mask, self.query_embed.weight, pos)
        return self.predictions(hs)

    def predictions(self, hs: Tensor) -> dict:
        """Decoder outputs (layers, B, Q, C) -> pred_logits, pred_boxes, aux_outputs."""
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1])]
        return out

    def forward(self, images: ImageBatch, targets: list[dict] | None = None):
        out = self.forward_raw(images)
        if self.training:
            if targets is None:
                raise ValueError("DETR in training mode needs targets")
            return self.criterion(out, normalized_targets(targets, images.sizes))
        return postprocess_softmax(out, images.sizes)


def build_detr(cfg, num_classes: int, model_cls=DETR, **model_kwargs) -> DETR:
    """model.name "detr"; model_cls / model_kwargs: a subclass on the same parts (PnP-DETR)."""
    backbone = build_backbone(cfg.backbone, out_features=tuple(cfg.backbone.out_features))
    t = cfg.transformer
    transformer = Transformer(t.hidden_dim, t.nheads, t.enc_layers, t.dec_layers,
                              t.dim_feedforward, t.dropout, t.pre_norm)
    loss = cfg.loss
    criterion = SetCriterion(num_classes, build_matcher(loss), loss.cls_weight,
                             loss.bbox_weight, loss.giou_weight, loss.eos_coef)
    return model_cls(backbone, transformer, num_classes, cfg.num_queries, criterion, loss.aux_loss,
                     **model_kwargs)
