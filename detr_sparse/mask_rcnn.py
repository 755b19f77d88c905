"""Mask R-CNN (He et al. 2017) on torchvision's region proposal network and RoI heads,
under the detector contract of docs/architecture.md ("The detector contract"): losses in
training, one dict of detections per image in eval, with the same ImageBatch input as the
DETR family.

torchvision's GeneralizedRCNNTransform is left out: our images come normalised, resized and
padded by the dataset transforms. The model only pads the batch further to a multiple of
the backbone's coarsest stride (as that transform's size_divisible=32 and detectron2 do),
so every map is exactly (H/s, W/s) and the FPN's top-down steps align.

The levels are derived from the backbone: each map res_i of stride s becomes level
p{log2 s} (res2..res5 -> p2..p5), plus a "pool" level (stride 2 * coarsest) for the RPN
only. Anchors are one size per level, anchor_scale * stride (torchvision's 32..512 on strides
4..64), times the aspect ratios; the box and mask RoI pools read the p levels.

Backbones with their own losses (DGE budget, SViT keep ratio, SPA selection) provide
`forward_with_losses(x, targets) -> (maps, {name: scalar})`: see `backbone_features`.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import initLevelMapper

from .backbones import build_backbone
from .image_batch import ImageBatch


def backbone_features(backbone: nn.Module, x: Tensor, targets: list[dict] | None = None,
                      sizes: list[tuple[int, int]] | None = None
                      ) -> tuple["OrderedDict[str, Tensor]", dict[str, Tensor]]:
    """x (B, 3, H, W) -> (named maps (B, C_i, H/s_i, W/s_i), extra outputs). With targets
    (training) a backbone that has `forward_with_losses(x, targets)` runs through it, and its
    losses ("loss*" keys, summed by the engine) and statistics (other keys, logged) are the
    extras; otherwise its plain forward, with no extras. A backbone that `takes_sizes` also
    gets each image's (h, w) in the padded batch (its sparse computation skips padding)."""
    kwargs = {"sizes": sizes} if getattr(backbone, "takes_sizes", False) else {}
    if targets is not None and hasattr(backbone, "forward_with_losses"):
        return backbone.forward_with_losses(x, targets, **kwargs)
    return backbone(x, **kwargs), {}


class PyramidNeck(nn.Module):
    """Backbone maps {res_i: (B, C_i, H/s, W/s)} -> {p_i: (B, C, H/s, W/s)} and {"pool":
    (B, C, H/2s', W/2s')} for the coarsest stride s'. With `out_channels`, torchvision's FPN
    (lateral 1x1 + top-down + 3x3 output convolutions); without, the maps themselves, for a
    backbone whose maps already are a pyramid of one width (ViTDet's simple pyramid)."""

    def __init__(self, shapes: dict[str, dict[str, int]], out_channels: int | None):
        super().__init__()
        self.names = {n: f"p{int(math.log2(s['stride']))}" for n, s in shapes.items()}
        self.fpn = (FeaturePyramidNetwork([s["channels"] for s in shapes.values()], out_channels,
                                          LastLevelMaxPool()) if out_channels else None)
        self.extra = LastLevelMaxPool()
        widths = {s["channels"] for s in shapes.values()}
        if out_channels is None and len(widths) > 1:
            raise ValueError(f"backbone maps of widths {sorted(widths)} are not a pyramid: they need an FPN")
        self.out_channels = out_channels or widths.pop()
        strides = [s["stride"] for s in shapes.values()]
        self.strides = {**{self.names[n]: s for n, s in zip(shapes, strides)}, "pool": 2 * max(strides)}

    def forward(self, features: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        maps = OrderedDict((self.names[n], features[n]) for n in self.names)
        if self.fpn is not None:
            return self.fpn(maps)
        levels, names = self.extra(list(maps.values()), [], list(maps))
        return OrderedDict(zip(names, levels))


class LevelAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator with the stride of every level given instead of inferred
    as padded image size // map size, which is off on the pool level whenever the batch is
    not a multiple of its stride (800 // 13 = 61, not 64). forward(image_list, maps) ->
    one (A, 4) xyxy anchor tensor per image (the same for all)."""

    def __init__(self, sizes: tuple, aspect_ratios: tuple, strides: list[int]):
        super().__init__(sizes, aspect_ratios)
        self.strides = strides

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        device = feature_maps[0].device
        self.set_cell_anchors(torch.float32, device)  # fp32 under bf16 autocast too: pixel coordinates
        strides = [[torch.tensor(s, device=device)] * 2 for s in self.strides]
        anchors = torch.cat(self.grid_anchors([m.shape[-2:] for m in feature_maps], strides))
        return [anchors] * len(image_list.image_sizes)


def _float_outputs(module: nn.Module, inputs, outputs):
    """Forward hook: the module's floating outputs in fp32. On the RPN head and the box
    predictor it keeps the box decoding in fp32 under bf16 autocast (torchvision decodes in
    the deltas' dtype, and bf16 pixel coordinates are 1-2 px apart at 256-512: measured on
    the synthetic ResNet-18 Mask R-CNN, box / mask AP -0.2 / -1.0 without it, level with it)."""
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_float_outputs(module, inputs, o) for o in outputs)
    return outputs


def roi_pool(strides: dict[str, int], output_size: int) -> MultiScaleRoIAlign:
    """torchvision's MultiScaleRoIAlign over the levels `strides` (name -> stride, fine to
    coarse) with their scales set from the strides: inferred from the first batch instead,
    they would be rounded wrongly when padding is large against small images, and kept."""
    pool = MultiScaleRoIAlign(list(strides), output_size, sampling_ratio=2)
    pool.scales = [1.0 / s for s in strides.values()]
    levels = [int(math.log2(s)) for s in strides.values()]
    pool.map_levels = initLevelMapper(levels[0], levels[-1])
    return pool


class MaskRCNN(nn.Module):
    """model(images, targets) -> {"loss_objectness", "loss_rpn_box_reg", "loss_classifier",
    "loss_box_reg", "loss_mask", + the backbone's extras}; model(images) -> per image
    {"boxes" (N, 4) absolute xyxy, "scores" (N,), "labels" (N,) contiguous dataset labels,
    "masks" (N, 1, h, w) probabilities at the image's unpadded size}.

    is_thing[label]: the dataset labels the RoI heads detect (torchvision class = 1 + rank
    among the things, 0 = background); other labels (stuff) are left out of the instance
    targets. Mask R-CNN proper detects all labels."""

    # prefixes of the module names that make up each part, for FLOP and latency accounting
    parts = {"backbone": "backbone", "neck": "neck", "rpn": "rpn", "roi heads": "roi_heads"}
    eval_types = ("bbox", "segm")

    def __init__(self, backbone: nn.Module, neck: PyramidNeck, rpn: RegionProposalNetwork,
                 roi_heads: RoIHeads, is_thing: list[bool]):
        super().__init__()
        self.backbone, self.neck, self.rpn, self.roi_heads = backbone, neck, rpn, roi_heads
        for head in (rpn.head, roi_heads.box_predictor):  # boxes decode in fp32 under autocast
            head.register_forward_hook(_float_outputs)
        self.size_divisibility = max(backbone.strides.values())
        thing = torch.tensor(is_thing, dtype=torch.bool)
        # buffers, not checkpoint state: they follow from the dataset
        self.register_buffer("thing_labels", thing.nonzero()[:, 0], persistent=False)
        self.register_buffer("class_of_label", thing.long().cumsum(0) * thing, persistent=False)

    def features(self, images: ImageBatch, targets: list[dict] | None = None
                 ) -> tuple[ImageList, "OrderedDict[str, Tensor]", dict[str, Tensor]]:
        """-> torchvision ImageList (the batch padded to the coarsest stride, the unpadded
        sizes), the neck's levels {p_i: (B, C, H/s, W/s), "pool"}, the backbone's extras."""
        x = images.tensors
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % self.size_divisibility, 0, -h % self.size_divisibility))
        sizes = [tuple(s) for s in images.sizes.tolist()]
        # a backbone that learns from the targets (SPT's selection labels) sees the instances the heads train on
        instances = self.instance_targets(targets, ours=True) if self.training and targets is not None else None
        maps, extra = backbone_features(self.backbone, x, instances, sizes)
        image_list = ImageList(x, sizes)
        return image_list, self.neck(maps), extra

    def instance_rows(self, target: dict) -> Tensor:
        """(N,) bool: the target's rows the heads train on: things, not crowd, not degenerate
        (torchvision refuses those)."""
        boxes = target["boxes"]
        keep = (self.class_of_label[target["labels"]] > 0) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return keep & (target["iscrowd"] == 0) if "iscrowd" in target else keep

    def instance_targets(self, targets: list[dict], ours: bool = False) -> list[dict]:
        """Our targets -> torchvision's: the instance rows (`instance_rows`), labels shifted to
        1..K (`ours`: the dataset's labels kept), masks (N, h, w)."""
        out = []
        for t in targets:
            if "masks" not in t:
                raise ValueError(f"{type(self).__name__} trains on instance masks: set data.masks: true")
            keep = self.instance_rows(t)
            labels = t["labels"][keep] if ours else self.class_of_label[t["labels"][keep]]
            out.append({"boxes": t["boxes"][keep], "labels": labels, "masks": t["masks"][keep]})
        return out

    def instance_losses(self, image_list: ImageList, features: dict, targets: list[dict]) -> dict[str, Tensor]:
        """The RPN's and the RoI heads' losses on the instance targets."""
        instances = self.instance_targets(targets)
        proposals, losses = self.rpn(image_list, features, instances)
        _, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, instances)
        return {**losses, **roi_losses}

    def detect(self, image_list: ImageList, features: dict) -> list[dict[str, Tensor]]:
        """torchvision's detections: boxes, scores, labels 1..K, masks (N, 1, M, M) in the box."""
        proposals, _ = self.rpn(image_list, features)
        detections, _ = self.roi_heads(features, proposals, image_list.image_sizes)
        return detections

    def postprocess(self, detections: list[dict], image_sizes: list[tuple[int, int]]) -> list[dict]:
        """torchvision's detections -> the contract's: dataset labels, masks pasted into the
        image at its unpadded size (N, 1, h, w)."""
        return [{"boxes": d["boxes"], "scores": d["scores"], "labels": self.thing_labels[d["labels"] - 1],
                 "masks": paste_masks_in_image(d["masks"], d["boxes"], size)}
                for d, size in zip(detections, image_sizes)]

    def forward(self, images: ImageBatch, targets: list[dict] | None = None):
        if self.training and targets is None:
            raise ValueError(f"{type(self).__name__} in training mode needs targets")
        image_list, features, extra = self.features(images, targets)
        if self.training:
            return {**extra, **self.instance_losses(image_list, features, targets)}
        return self.postprocess(self.detect(image_list, features), image_list.image_sizes)


def build_rcnn_parts(cfg, num_classes: int) -> dict[str, nn.Module]:
    """The backbone, neck, RPN and RoI heads (box + mask) for `num_classes` detected
    classes, configured by cfg.backbone and cfg.rcnn (torchvision's maskrcnn_resnet50_fpn
    by default) on the levels of cfg.backbone.out_features (e.g. [res2, res3, res4, res5])."""
    r = cfg.rcnn
    backbone = build_backbone(cfg.backbone, out_features=tuple(cfg.backbone.out_features))
    # ViTDet: the ViT's simple pyramid is its neck already (the ViT-Adapter's maps need an FPN)
    neck = PyramidNeck(backbone.output_shape(), None if getattr(backbone, "is_pyramid", False) else r.fpn_channels)
    channels, strides = neck.out_channels, neck.strides
    ratios = tuple(r.anchor_ratios)
    anchors = LevelAnchorGenerator(tuple((r.anchor_scale * s,) for s in strides.values()),
                                   (ratios,) * len(strides), list(strides.values()))
    rpn = RegionProposalNetwork(
        anchors, RPNHead(channels, len(ratios)), r.rpn_fg_iou_thresh, r.rpn_bg_iou_thresh,
        r.rpn_batch_size_per_image, r.rpn_positive_fraction,
        {"training": r.rpn_pre_nms_top_n_train, "testing": r.rpn_pre_nms_top_n_test},
        {"training": r.rpn_post_nms_top_n_train, "testing": r.rpn_post_nms_top_n_test},
        r.rpn_nms_thresh, r.rpn_score_thresh)
    levels = {n: s for n, s in strides.items() if n != "pool"}  # the pool level feeds the RPN only
    roi_heads = RoIHeads(
        roi_pool(levels, 7), TwoMLPHead(channels * 7 * 7, r.box_head_dim),
        FastRCNNPredictor(r.box_head_dim, num_classes + 1), r.box_fg_iou_thresh, r.box_bg_iou_thresh,
        r.box_batch_size_per_image, r.box_positive_fraction, None, r.box_score_thresh, r.box_nms_thresh,
        r.detections_per_img, mask_roi_pool=roi_pool(levels, 14),
        mask_head=MaskRCNNHeads(channels, [r.mask_head_dim] * 4, 1),
        mask_predictor=MaskRCNNPredictor(r.mask_head_dim, r.mask_head_dim, num_classes + 1))
    return {"backbone": backbone, "neck": neck, "rpn": rpn, "roi_heads": roi_heads}


def build_mask_rcnn(cfg, num_classes: int) -> MaskRCNN:
    """model.name "mask_rcnn": every label is an instance class (data.masks: true)."""
    return MaskRCNN(**build_rcnn_parts(cfg, num_classes), is_thing=[True] * num_classes)
