"""Panoptic FPN (Kirillov et al. 2019): Mask R-CNN on the thing classes plus a semantic FPN
head on the same levels for the stuff classes (and one "any thing" class), merged into one
panoptic map per image as detectron2 merges them. Trained on panoptic targets: the thing
segments are the instances of the RoI heads, and every segment gives the semantic target
(things as class 0)."""
from __future__ import annotations

import torch
from torch import Tensor

from .heads.panoptic_fpn import (SemanticFPNHead, combine_semantic_and_instance_outputs, semantic_loss,
                                 semantic_targets)
from .image_batch import ImageBatch
from .mask_rcnn import MaskRCNN, build_rcnn_parts


class PanopticFPN(MaskRCNN):
    """model(images, targets) -> Mask R-CNN's losses + "loss_sem_seg" (cross-entropy times
    semantic_loss_weight); model(images) -> per image Mask R-CNN's detections of the things
    plus "panoptic" (h, w) int64 id map at the unpadded input size and "segments_info"
    [{"id", "label", "isthing", "area"}] (dataset labels). is_thing[label] splits the
    dataset's contiguous labels into things and stuff."""

    parts = {**MaskRCNN.parts, "semantic head": "semantic_head"}
    eval_types = ("bbox", "segm", "panoptic")

    def __init__(self, backbone, neck, rpn, roi_heads, is_thing: list[bool], semantic_channels: int = 128,
                 semantic_loss_weight: float = 0.5, instance_score_thresh: float = 0.5,
                 overlap_thresh: float = 0.5, stuff_area: int = 4096):
        super().__init__(backbone, neck, rpn, roi_heads, is_thing)
        stuff = ~torch.tensor(is_thing, dtype=torch.bool)
        self.stuff_labels = stuff.nonzero()[:, 0].tolist()
        # label -> semantic class: 0 for every thing, 1.. for the stuff in label order
        self.register_buffer("semantic_class", stuff.long().cumsum(0) * stuff, persistent=False)
        levels = {n: s for n, s in neck.strides.items() if n != "pool"}
        self.semantic_head = SemanticFPNHead(neck.out_channels, levels, len(self.stuff_labels) + 1,
                                             semantic_channels)
        self.semantic_loss_weight = semantic_loss_weight
        self.instance_score_thresh, self.overlap_thresh = instance_score_thresh, overlap_thresh
        self.stuff_area = stuff_area

    def forward(self, images: ImageBatch, targets: list[dict] | None = None):
        if self.training and targets is None:
            raise ValueError(f"{type(self).__name__} in training mode needs targets")
        image_list, features, extra = self.features(images, targets)
        logits = self.semantic_head(features)  # (B, 1 + stuff, H, W) at the padded size
        if self.training:
            target = semantic_targets(targets, self.semantic_class, tuple(logits.shape[-2:]))
            return {**extra, **self.instance_losses(image_list, features, targets),
                    "loss_sem_seg": self.semantic_loss_weight * semantic_loss(logits, target)}
        detections = self.postprocess(self.detect(image_list, features), image_list.image_sizes)
        return [{**d, **self.panoptic(d, sem, size)}
                for d, sem, size in zip(detections, logits, image_list.image_sizes)]

    def panoptic(self, detections: dict, logits: Tensor, size: tuple[int, int]) -> dict:
        """One image's detections (masks (N, 1, h, w) probabilities) and semantic logits
        (C, H, W) at the padded size -> {"panoptic", "segments_info"} at its size (h, w)."""
        h, w = size
        id_map, segments = combine_semantic_and_instance_outputs(
            detections["masks"][:, 0] > 0.5, detections["scores"], detections["labels"],
            logits[:, :h, :w].argmax(0), self.stuff_labels, self.overlap_thresh, self.stuff_area,
            self.instance_score_thresh)
        return {"panoptic": id_map, "segments_info": segments}


def build_panoptic_fpn(cfg, num_classes: int, is_thing: list[bool] | None = None) -> PanopticFPN:
    """model.name "panoptic_fpn"; is_thing (per label): the panoptic dataset's thing / stuff split."""
    if is_thing is None or len(is_thing) != num_classes:
        raise ValueError("model.name panoptic_fpn needs the thing / stuff split of a panoptic dataset "
                         "(data.panoptic: true)")
    r = cfg.rcnn
    return PanopticFPN(**build_rcnn_parts(cfg, sum(is_thing)), is_thing=list(is_thing),
                       semantic_channels=r.semantic_channels, semantic_loss_weight=r.semantic_loss_weight,
                       instance_score_thresh=r.instance_score_thresh, overlap_thresh=r.overlap_thresh,
                       stuff_area=r.stuff_area)
