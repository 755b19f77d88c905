"""The project's backbones inside detectron2's Mask R-CNN and Panoptic FPN.

Imported only when asked for: detectron2 is an optional dependency (`DETECTRON2=1 bash
launch.sh --setup`), and the torchvision-based detectors stay the default.

- `ProjectBackbone`: any backbone of `detr_sparse.backbones` (ResNet, Swin, PVT, DeiT/ViT,
  ViT-Adapter and their DGE, SViT and SPT versions) as a detectron2 `Backbone`, built from
  the same options as the YAML configs' `model.backbone`.
- `with_pyramid`: detectron2's FPN on top of it, or, for the ViTs whose simple pyramid
  (ViTDet) is part of the backbone already, those maps named p2.. plus the max-pooled level
  (what detectron2's SimpleFeaturePyramid outputs).
- `SparseRCNN`, `SparsePanopticFPN`: detectron2's meta-architectures that hand the batch's
  image sizes and `gt_instances` to the backbone and add its losses (DGE budget, SViT keep
  ratio, SPA selection) to the loss dict; its statistics go to the `EventStorage`.
- `BACKBONE_REGISTRY` / `META_ARCH_REGISTRY` entries for yacs configs
  (`add_project_config`), and `register_coco_folder` for COCO-layout folders (COCO, the
  synthetic sets).
"""
from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_coco_panoptic_separated
from detectron2.evaluation import DatasetEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, Backbone, GeneralizedRCNN, PanopticFPN
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.structures import BitMasks, Instances, PolygonMasks
from detectron2.utils.events import get_event_storage
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from datasets.coco_panoptic import find_png_folder, rgb_to_id
from datasets.panoptic_eval import PanopticEvaluator
from engine.config import backbone_config

from ..backbones import build_backbone
from ..mask_rcnn import backbone_features


class ProjectBackbone(Backbone):
    """detectron2 Backbone around `build_backbone(model.backbone options)`: forward(x) ->
    {res_i: (B, C_i, H/s_i, W/s_i)}. The meta-architectures below set `sizes` (each image's
    unpadded (h, w): sparse backbones skip the padding) and, in training, `targets`
    ([{"boxes", "labels", "masks"}] in input pixels) before a forward; `extras` then holds
    the backbone's losses ("loss*") and statistics."""

    def __init__(self, name: str, out_features: tuple[str, ...] | list[str] = ("res2", "res3", "res4", "res5"),
                 **options):
        super().__init__()
        out_features = list(out_features)
        cfg = backbone_config({**options, "name": name, "out_features": out_features}, f"backbone '{name}'")
        self.net = build_backbone(cfg, tuple(out_features))
        shapes = self.net.output_shape()
        self._out_features = out_features
        self._out_feature_channels = {n: shapes[n]["channels"] for n in out_features}
        self._out_feature_strides = {n: shapes[n]["stride"] for n in out_features}
        self.sizes: list[tuple[int, int]] | None = None
        self.targets: list[dict] | None = None
        self.extras: dict[str, Tensor] = {}

    @property
    def size_divisibility(self) -> int:
        return max(self._out_feature_strides.values())

    @property
    def padding_constraints(self) -> dict[str, int]:
        return {"size_divisibility": self.size_divisibility, "square_size": 0}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        maps, self.extras = backbone_features(self.net, x, self.targets, self.sizes)
        return dict(maps)


class PyramidLevels(Backbone):
    """A backbone whose maps are a pyramid of one width already (the project's ViTs carry
    ViTDet's simple pyramid): res_i -> p{log2 stride}, plus the next level by a stride-2
    max-pool of the last (detectron2's LastLevelMaxPool), as SimpleFeaturePyramid outputs."""

    def __init__(self, bottom_up: ProjectBackbone):
        super().__init__()
        self.bottom_up = bottom_up
        strides = bottom_up._out_feature_strides
        self.names = {n: f"p{int(math.log2(s))}" for n, s in strides.items()}
        last = max(strides.values())
        width = {bottom_up._out_feature_channels[n] for n in strides}.pop()
        self.top_name = f"p{int(math.log2(last)) + 1}"
        self._out_features = [*self.names.values(), self.top_name]
        self._out_feature_strides = {**{self.names[n]: s for n, s in strides.items()}, self.top_name: 2 * last}
        self._out_feature_channels = {n: width for n in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return self.bottom_up.size_divisibility

    @property
    def padding_constraints(self) -> dict[str, int]:
        return self.bottom_up.padding_constraints

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        maps = self.bottom_up(x)
        out = {self.names[n]: maps[n] for n in self.names}
        out[self.top_name] = F.max_pool2d(out[self.names[self.bottom_up._out_features[-1]]], 1, 2, 0)
        return out


def with_pyramid(bottom_up: ProjectBackbone, out_channels: int = 256) -> Backbone:
    """detectron2's FPN (+ LastLevelMaxPool) on the backbone's maps, or `PyramidLevels`
    when they are a pyramid already (the ViTs' simple pyramid)."""
    if getattr(bottom_up.net, "is_pyramid", False):
        return PyramidLevels(bottom_up)
    top = LastLevelMaxPool()
    top.in_feature = f"p{int(math.log2(bottom_up.size_divisibility))}"  # the FPN's coarsest level
    return FPN(bottom_up=bottom_up, in_features=bottom_up._out_features, out_channels=out_channels, top_block=top)


def instance_target(instances: Instances) -> dict[str, Tensor]:
    """detectron2 gt_instances -> the targets the project's backbones read: boxes (N, 4)
    absolute xyxy, labels (N,), masks (N, h, w) bool when the instances have masks."""
    out = {"boxes": instances.gt_boxes.tensor, "labels": instances.gt_classes}
    if instances.has("gt_masks"):
        masks = instances.gt_masks
        if isinstance(masks, PolygonMasks):
            masks = BitMasks.from_polygon_masks(masks, *instances.image_size)
        out["masks"] = masks.tensor.bool()
    return out


class BackboneLosses:
    """Mixin for a detectron2 meta-architecture whose backbone is (or sits on) a
    `ProjectBackbone`: it hands that backbone the images' sizes and, in training, the
    batch's gt_instances, adds the backbone's "loss*" terms to the loss dict and puts its
    other outputs (keep shares, beta, ...) in the EventStorage."""

    def project_backbone(self) -> ProjectBackbone | None:
        net = getattr(self.backbone, "bottom_up", self.backbone)
        return net if isinstance(net, ProjectBackbone) else None

    def forward(self, batched_inputs: list[dict]):
        net = self.project_backbone()
        if net is None:
            return super().forward(batched_inputs)
        net.sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        train = self.training and "instances" in batched_inputs[0]
        net.targets = [instance_target(x["instances"].to(self.device)) for x in batched_inputs] if train else None
        try:
            out = super().forward(batched_inputs)
            extras = net.extras
        finally:
            net.sizes, net.targets, net.extras = None, None, {}
        if not self.training:
            return out
        losses = {k: v for k, v in extras.items() if k.startswith("loss")}
        stats = {k: float(v) for k, v in extras.items() if not k.startswith("loss")}
        if stats:
            get_event_storage().put_scalars(**stats)
        return {**out, **losses}


@META_ARCH_REGISTRY.register()
class SparseRCNN(BackboneLosses, GeneralizedRCNN):
    """detectron2's GeneralizedRCNN (Mask R-CNN) with the backbone's own losses."""


@META_ARCH_REGISTRY.register()
class SparsePanopticFPN(BackboneLosses, PanopticFPN):
    """detectron2's PanopticFPN with the backbone's own losses."""


def add_project_config(cfg: CfgNode) -> CfgNode:
    """yacs keys of the registered backbones: MODEL.PROJECT_BACKBONE.NAME, .OUT_FEATURES and
    .OPTIONS (any `model.backbone` option of the YAML configs, e.g. OPTIONS.pretrained,
    OPTIONS.dge = CfgNode({"budget": 0.3})); MODEL.FPN.OUT_CHANNELS sets the FPN's width."""
    cfg.MODEL.PROJECT_BACKBONE = CfgNode()
    cfg.MODEL.PROJECT_BACKBONE.NAME = "resnet50"
    cfg.MODEL.PROJECT_BACKBONE.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.PROJECT_BACKBONE.OPTIONS = CfgNode(new_allowed=True)
    return cfg


def _plain(node: dict) -> dict:
    return {k: _plain(v) if isinstance(v, dict) else v for k, v in node.items()}


def _from_cfg(cfg: CfgNode) -> ProjectBackbone:
    b = cfg.MODEL.PROJECT_BACKBONE
    return ProjectBackbone(b.NAME, b.OUT_FEATURES, **_plain(b.OPTIONS))


@BACKBONE_REGISTRY.register()
def build_project_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """MODEL.BACKBONE.NAME "build_project_backbone": the backbone's maps alone."""
    return _from_cfg(cfg)


@BACKBONE_REGISTRY.register()
def build_project_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """MODEL.BACKBONE.NAME "build_project_fpn_backbone": the backbone with `with_pyramid`."""
    return with_pyramid(_from_cfg(cfg), cfg.MODEL.FPN.OUT_CHANNELS)


def _semantic_png(task: tuple) -> None:
    ann, panoptic_root, out_dir, value = task
    ids = rgb_to_id(np.asarray(Image.open(Path(panoptic_root) / ann["file_name"]).convert("RGB")))
    semantic = np.full(ids.shape, 255, dtype=np.uint8)
    for seg in ann["segments_info"]:
        semantic[ids == seg["id"]] = value[seg["category_id"]]
    Image.fromarray(semantic).save(Path(out_dir) / ann["file_name"])


def write_semantic_pngs(panoptic_json: str | Path, panoptic_root: str | Path, out_dir: str | Path,
                        workers: int = 2) -> Path:
    """The "separated" semantic targets of detectron2's Panoptic FPN from COCO panoptic PNGs:
    things 0, stuff categories 1..S in id order, unlabelled 255; one PNG per image in
    `out_dir`, written once (a `done` file marks the folder complete)."""
    out_dir = Path(out_dir)
    if (out_dir / "done").is_file():
        return out_dir
    data = json.loads(Path(panoptic_json).read_text())
    stuff = sorted(c["id"] for c in data["categories"] if not c["isthing"])
    value = {**{c["id"]: 0 for c in data["categories"] if c["isthing"]}, **{c: i + 1 for i, c in enumerate(stuff)}}
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(ann, str(panoptic_root), str(out_dir), value) for ann in data["annotations"]]
    with multiprocessing.Pool(workers) as pool:
        pool.map(_semantic_png, tasks, chunksize=64)
    (out_dir / "done").write_text("")
    return out_dir


def register_coco_folder(root: str | Path, splits: tuple[str, ...] = ("train2017", "val2017"),
                         prefix: str | None = None) -> list[str]:
    """Register a COCO-layout folder (COCO itself or a synthetic set of datasets/synthetic.py)
    as detectron2 datasets, for each split: `{prefix}_{split}` (prefix: the folder's name by
    default; instances, register_coco_instances) and, when annotations/panoptic_{split}.json
    exists, `{prefix}_{split}_panoptic_separated` (instances + semantic stuff for Panoptic FPN,
    evaluated with PQ; the semantic PNGs are written next to the panoptic ones the first
    time). Returns the names; one already registered is left as it is."""
    root = Path(root)
    names = []
    for split in splits:
        name, instances = f"{prefix or root.name}_{split}", root / "annotations" / f"instances_{split}.json"
        if not instances.is_file():
            raise FileNotFoundError(f"{instances}: no instance annotations for split {split}")
        if name not in MetadataCatalog.list():
            register_coco_instances(name, {}, str(instances), str(root / split))
        names.append(name)
        panoptic_json = root / "annotations" / f"panoptic_{split}.json"
        if not panoptic_json.is_file():
            continue
        if f"{name}_panoptic_separated" not in MetadataCatalog.list():
            panoptic_root = find_png_folder(str(root), split)
            semantic = write_semantic_pngs(panoptic_json, panoptic_root,
                                           root / "annotations" / f"panoptic_semseg_{split}")
            register_coco_panoptic_separated(f"{name}_panoptic", panoptic_metadata(panoptic_json), str(root / split),
                                             panoptic_root, str(panoptic_json), str(semantic), str(instances))
        names.append(f"{name}_panoptic_separated")
    return names


class PanopticQuality(DatasetEvaluator):
    """PQ of detectron2's panoptic predictions ("panoptic_seg") on a separated panoptic set
    registered by `register_coco_folder`, by the project's evaluator (panopticapi's rules;
    panopticapi, which detectron2's COCOPanopticEvaluator needs, is not on PyPI). Returns
    {"panoptic_seg": {"PQ", "SQ", "RQ", "PQ_th", ..., "PQ_st", ...}} in percent, as detectron2's."""

    def __init__(self, dataset_name: str):
        meta = MetadataCatalog.get(dataset_name)
        data = json.loads(Path(meta.panoptic_json).read_text())
        self.root = Path(meta.panoptic_root)
        self.annotations = {a["image_id"]: a for a in data["annotations"]}
        self.thing_ids = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        self.stuff_ids = {v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()}
        categories = data["categories"]
        self.evaluator = PanopticEvaluator(categories, [c["id"] for c in categories])

    def reset(self) -> None:
        self.evaluator.reset()

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        predictions, targets = [], []
        for x, out in zip(inputs, outputs):
            seg_map, segments = out["panoptic_seg"]
            ann = self.annotations[x["image_id"]]
            gt = rgb_to_id(np.asarray(Image.open(self.root / ann["file_name"]).convert("RGB")))
            predictions.append({"panoptic": seg_map.cpu().numpy(), "segments_info": [
                {"id": s["id"], "category_id": (self.thing_ids if s["isthing"] else self.stuff_ids)[s["category_id"]]}
                for s in segments]})
            targets.append({"image_id": x["image_id"], "panoptic": gt, "segments": ann["segments_info"]})
        self.evaluator.update(predictions, targets)

    def evaluate(self) -> dict:
        summary = self.evaluator.summarize()["panoptic"]
        return {"panoptic_seg": {k: 100 * v for k, v in summary.items()}}


def panoptic_metadata(panoptic_json: str | Path) -> dict:
    """detectron2's metadata of a separated panoptic set: thing classes 0..K-1, stuff classes
    with "things" at 0 and the stuff categories 1..S, as `write_semantic_pngs` numbers them."""
    categories = sorted(json.loads(Path(panoptic_json).read_text())["categories"], key=lambda c: c["id"])
    things = [c for c in categories if c["isthing"]]
    stuff = [c for c in categories if not c["isthing"]]
    return {"thing_classes": [c["name"] for c in things],
            "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(things)},
            "stuff_classes": ["things"] + [c["name"] for c in stuff],
            "stuff_dataset_id_to_contiguous_id": {c["id"]: i + 1 for i, c in enumerate(stuff)}}
