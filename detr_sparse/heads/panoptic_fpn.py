"""Panoptic FPN's semantic branch and panoptic merge (Kirillov et al. 2019), as detectron2's
SemSegFPNHead and combine_semantic_and_instance_outputs."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops.misc import Conv2dNormActivation

IGNORE = -1  # semantic target of unlabelled (VOID) and padding pixels; semantic_targets relies on -1


class SemanticFPNHead(nn.Module):
    """FPN levels {name: (B, C, H/s, W/s)} -> semantic logits (B, num_classes, H, W), with
    class 0 "any thing" and 1.. the stuff classes. Every level runs conv3x3 + GroupNorm +
    ReLU blocks, each followed by a 2x bilinear upsampling, until the finest stride s0
    (one block at s0 itself); the levels are summed, a 1x1 convolution classifies, and the
    logits are upsampled s0 times to the input size."""

    def __init__(self, in_channels: int, strides: dict[str, int], num_classes: int, channels: int = 128):
        super().__init__()
        self.common_stride = min(strides.values())
        self.scale_heads = nn.ModuleDict()
        for name, stride in strides.items():
            blocks = []
            for k in range(max(1, int(math.log2(stride // self.common_stride)))):
                blocks.append(Conv2dNormActivation(in_channels if k == 0 else channels, channels, 3,
                                                   norm_layer=lambda c: nn.GroupNorm(math.gcd(32, c), c)))
                if stride != self.common_stride:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads[name] = nn.Sequential(*blocks)
        self.predictor = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        x = sum(head(features[name]) for name, head in self.scale_heads.items())
        return F.interpolate(self.predictor(x), scale_factor=self.common_stride, mode="bilinear",
                             align_corners=False)


def semantic_targets(targets: list[dict], semantic_class: Tensor, shape: tuple[int, int]) -> Tensor:
    """Panoptic targets (non-overlapping "masks" (N, h_i, w_i) bool, "labels" (N,)) ->
    (B, H, W) int64 semantic classes at the padded size `shape`: semantic_class[label] per
    segment pixel (0 for every thing, 1.. for stuff), IGNORE at VOID and padding pixels."""
    out = torch.full((len(targets), *shape), IGNORE, dtype=torch.int64, device=semantic_class.device)
    for i, t in enumerate(targets):
        masks = t["masks"]
        h, w = masks.shape[-2:]
        # segments do not overlap: the sum over rows is each pixel's class + 1, or 0 (-> IGNORE)
        classes = semantic_class[t["labels"]] + 1
        out[i, :h, :w] = (masks.long() * classes[:, None, None]).sum(0) - 1
    return out


def semantic_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of logits (B, C, H, W) against target (B, H, W), averaged over the
    labelled pixels (0, not NaN, when there are none)."""
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
    return loss / (target != IGNORE).sum().clamp(min=1)


def combine_semantic_and_instance_outputs(masks: Tensor, scores: Tensor, labels: Tensor, semantic: Tensor,
                                          stuff_labels: list[int], overlap_threshold: float = 0.5,
                                          stuff_area: int = 4096, score_threshold: float = 0.5
                                          ) -> tuple[Tensor, list[dict]]:
    """detectron2's panoptic merge for one image. masks (N, H, W) bool, scores (N,), labels
    (N,) dataset labels of the instances; semantic (H, W) int64 argmax classes (0 = thing,
    c >= 1 = stuff label stuff_labels[c - 1]).

    Instances, best score first, while the score is >= score_threshold: one whose mask lies
    more than overlap_threshold on pixels already taken is dropped, else it takes its free
    pixels. Then each stuff class takes its free pixels if they are at least stuff_area.
    -> id map (H, W) int64 (0 = no segment), [{"id", "label", "isthing", "area"}] ids 1..S."""
    id_map = torch.zeros(semantic.shape, dtype=torch.int64, device=semantic.device)
    segments = []
    for i in scores.argsort(descending=True).tolist():
        if scores[i] < score_threshold:
            break
        mask = masks[i]
        area = int(mask.sum())
        taken = int((mask & (id_map > 0)).sum())
        if area == 0 or taken / area > overlap_threshold:
            continue
        free = mask & (id_map == 0)
        id_map[free] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "label": int(labels[i]), "isthing": True,
                         "area": area - taken})
    for c in semantic.unique().tolist():
        if c == 0:
            continue
        free = (semantic == c) & (id_map == 0)
        area = int(free.sum())
        if area < stuff_area:
            continue
        id_map[free] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "label": stuff_labels[c - 1], "isthing": False, "area": area})
    return id_map, segments
