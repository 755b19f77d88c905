"""DETR's set criterion: Hungarian matching, then class + L1 + GIoU losses on the matched
pairs, for the final decoder layer, every auxiliary output and (two-stage Deformable DETR)
the encoder proposals. Classification is DETR's softmax with a no-object class, or the
sigmoid focal loss of Deformable DETR. Returns the losses already weighted (the engine sums
every key starting with "loss"); other keys are statistics."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from .matcher import HungarianMatcher


def num_boxes_across_ranks(targets: list[dict], device) -> float:
    """Average count of target boxes per rank, so every rank normalises its loss alike."""
    n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(n.item(), 1.0)


class SetCriterion(nn.Module):
    """outputs: pred_logits (B, Q, K+1) with the no-object class last (softmax), or (B, Q, K)
    (focal_alpha set: sigmoid focal loss, no no-object class); pred_boxes (B, Q, 4)
    normalised cxcywh; optional aux_outputs (list of the same for earlier decoder layers);
    optional enc_outputs (the same for the encoder proposals, Q = tokens), matched against
    targets relabelled to class 0 when `binary_enc` (two-stage Deformable DETR's foreground
    head), against the real labels otherwise (Deformable DETR+); optional extra_outputs
    {suffix: outputs} matched against the real labels, losses named `{key}_{suffix}` (Sparse
    DETR's encoder auxiliary heads and objectness head). An outputs dict may carry query_mask
    (B, Q) bool: the other queries are neither matched nor penalised (focal loss only).
    With pred_masks (B, Q, h, w) mask logits (DETR's panoptic branch), the matched masks
    also get DETR's focal and dice losses against the targets' masks (N, H, W), every
    image's padded to the batch's (H, W) (no auxiliary mask losses, as in DETR).
    targets: labels (N,) in [0, K), boxes (N, 4) normalised cxcywh."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, cls_weight: float = 1.0,
                 bbox_weight: float = 5.0, giou_weight: float = 2.0, eos_coef: float = 0.1,
                 focal_alpha: float | None = None, binary_enc: bool = True,
                 mask_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.focal_alpha, self.binary_enc = focal_alpha, binary_enc
        self.matcher = matcher
        self.weights = {"loss_ce": cls_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight,
                        "loss_mask": mask_weight, "loss_dice": dice_weight}
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def loss_labels(self, logits: Tensor, targets, indices, num_boxes: float,
                    query_mask: Tensor | None = None) -> dict[str, Tensor]:
        batch_idx, query_idx = _flat_indices(indices)
        matched = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        if self.focal_alpha is None:
            target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64,
                                        device=logits.device)
            target_classes[batch_idx, query_idx] = matched
            loss = F.cross_entropy(logits.transpose(1, 2).float(), target_classes, self.empty_weight)
        else:
            # one-hot over the K classes; unmatched queries are negatives for every class
            onehot = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
            d = logits.device
            onehot[batch_idx.to(d), query_idx.to(d), matched.to(d)] = 1.0
            loss = sigmoid_focal_loss(logits.float(), onehot, alpha=self.focal_alpha, gamma=2.0)
            if query_mask is not None:
                loss = loss * query_mask[..., None]
            loss = loss.sum() / num_boxes
        # the same keys for every batch, even one without objects: the engine averages them
        # over ranks in one collective, which needs the same entries on every rank
        error = logits.new_zeros(())
        if matched.numel():
            error = 100 - 100 * (logits[batch_idx, query_idx].argmax(-1) == matched).float().mean()
        return {"loss_ce": loss, "class_error": error.detach()}

    def loss_boxes(self, boxes: Tensor, targets, indices, num_boxes: float) -> dict[str, Tensor]:
        batch_idx, query_idx = _flat_indices(indices)
        src = boxes[batch_idx, query_idx].float()
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float()
        l1 = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        # torchvision's GIoU loss has an eps, so zero-area predictions give a finite loss
        giou = generalized_box_iou_loss(box_convert(src, "cxcywh", "xyxy"),
                                        box_convert(tgt, "cxcywh", "xyxy"), reduction="sum")
        return {"loss_bbox": l1, "loss_giou": giou / num_boxes}

    def loss_masks(self, masks: Tensor, targets, indices, num_boxes: float) -> dict[str, Tensor]:
        """DETR's mask losses: predictions upsampled (bilinear) to the targets' padded size,
        sigmoid focal loss (alpha 0.25, mean over pixels) and dice loss, per matched pair,
        summed and divided by num_boxes."""
        batch_idx, query_idx = _flat_indices(indices)
        if not len(batch_idx):  # zero, but on the graph: every rank's mask head gets gradients
            zero = masks.sum() * 0
            return {"loss_mask": zero, "loss_dice": zero}
        tgt = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)]).float()
        src = F.interpolate(masks[batch_idx, query_idx][:, None].float(), size=tgt.shape[-2:],
                            mode="bilinear", align_corners=False)[:, 0].flatten(1)
        tgt = tgt.flatten(1)
        focal = sigmoid_focal_loss(src, tgt, alpha=0.25, gamma=2.0).mean(1).sum() / num_boxes
        prob = src.sigmoid()
        dice = 1 - (2 * (prob * tgt).sum(1) + 1) / (prob.sum(1) + tgt.sum(1) + 1)
        return {"loss_mask": focal, "loss_dice": dice.sum() / num_boxes}

    def single(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        losses = self.loss_labels(outputs["pred_logits"], targets, indices, num_boxes,
                                  outputs.get("query_mask"))
        losses.update(self.loss_boxes(outputs["pred_boxes"], targets, indices, num_boxes))
        if "pred_masks" in outputs:
            losses.update(self.loss_masks(outputs["pred_masks"], targets, indices, num_boxes))
        return {k: v * self.weights[k] if k in self.weights else v for k, v in losses.items()}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        num_boxes = num_boxes_across_ranks(targets, outputs["pred_logits"].device)
        losses = {}
        for i, out in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.single(out, targets, num_boxes).items()})
        if "enc_outputs" in outputs:
            enc_targets = targets
            if self.binary_enc:
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc = self.single(outputs["enc_outputs"], enc_targets, num_boxes)
            losses.update({f"{k}_enc": v for k, v in enc.items()})
        for suffix, extra in outputs.get("extra_outputs", {}).items():
            losses.update({f"{k}_{suffix}": v for k, v in self.single(extra, targets, num_boxes).items()})
        losses.update(self.single(outputs, targets, num_boxes))
        return losses


def _flat_indices(indices) -> tuple[Tensor, Tensor]:
    batch = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
    query = torch.cat([q for q, _ in indices])
    return batch, query
