"""Hungarian matching between predictions and ground truth (DETR, Deformable DETR)."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

# A finite stand-in for NaN / inf costs: scipy refuses non-finite matrices, and a bad
# prediction must lose the assignment rather than crash the run.
_BAD_COST = 1e8


class HungarianMatcher(nn.Module):
    """Costs: class (softmax probability, or the focal-loss cost of Deformable DETR), L1 on
    normalised cxcywh boxes and negative GIoU.

    outputs: pred_logits (B, Q, K), pred_boxes (B, Q, 4) normalised cxcywh, optionally
    query_mask (B, Q) bool: only these queries take part (a padded set of predictions).
    targets: list of dicts with labels (N_i,) and boxes (N_i, 4) normalised cxcywh.
    Returns for each image (query indices, target indices), int64, sorted by query."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal: bool = False, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal, self.focal_alpha, self.focal_gamma = focal, focal_alpha, focal_gamma

    def class_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        if not self.focal:
            return -logits.softmax(-1)[:, labels]
        prob = logits.sigmoid()[:, labels]
        a, g = self.focal_alpha, self.focal_gamma
        neg = (1 - a) * prob**g * -(1 - prob + 1e-8).log()
        pos = a * (1 - prob) ** g * -(prob + 1e-8).log()
        return pos - neg

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        bs, nq = logits.shape[:2]
        labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets])
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if labels.numel() == 0:
            return [(empty, empty) for _ in targets]
        logits, boxes = logits.flatten(0, 1).float(), boxes.flatten(0, 1).float()
        cost = self.cost_class * self.class_cost(logits, labels)
        cost = cost + self.cost_bbox * torch.cdist(boxes, tgt_boxes.float(), p=1)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                   box_convert(tgt_boxes.float(), "cxcywh", "xyxy"))
        cost = cost - self.cost_giou * giou
        cost = torch.nan_to_num(cost, nan=_BAD_COST, posinf=_BAD_COST, neginf=-_BAD_COST)
        cost = cost.view(bs, nq, -1).cpu()
        mask = outputs.get("query_mask")
        indices = []
        for i, c in enumerate(cost.split(sizes, -1)):
            rows = torch.arange(nq) if mask is None else mask[i].cpu().nonzero().flatten()
            q, t = linear_sum_assignment(c[i][rows].numpy())
            indices.append((rows[torch.as_tensor(q, dtype=torch.int64)], torch.as_tensor(t, dtype=torch.int64)))
        return indices


def build_matcher(loss_cfg, focal: bool = False) -> HungarianMatcher:
    """From the loss config; `focal` for sigmoid classifiers, with loss_cfg.focal_alpha."""
    return HungarianMatcher(loss_cfg.cost_class, loss_cfg.cost_bbox, loss_cfg.cost_giou, focal=focal,
                            focal_alpha=loss_cfg.focal_alpha)
