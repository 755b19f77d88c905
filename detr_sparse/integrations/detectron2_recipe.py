"""A project YAML config (Mask R-CNN / Panoptic FPN) as a detectron2 LazyConfig, so each
recipe has one home: configs/detectron2/*.py are

    model, dataloader, optimizer, lr_multiplier, train, data = recipe("configs/x.yaml")

What carries over: the backbone (`model.backbone`, any of the project's, with its own
pretrained weights and sparsity options), `model.rcnn` (FPN width, anchors, RPN and RoI head
sizes and thresholds, the semantic head, the panoptic merge), `data` (scales, flips, the
DETR-style random crop, the val size), `train` (AdamW, learning rates with
the backbone's own, weight decay with `no_decay` names, `lr_multipliers`, epochs and drops as
iterations, warm-up, seed). Epochs become iterations at `processes` x `train.batch_size`
images per step: the papers' 8 GPUs on COCO, this machine's 2 processes on synthetic sets.
`data` is the project's data section plus `name` (the folder's name by default):
tools/train_detectron2.py generates a synthetic set from it and registers the folder's splits
under that name (`register_coco_folder`).
"""
from __future__ import annotations

import math
from pathlib import Path

import detectron2.data.transforms as T
import torch
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader, \
    get_detection_dataset_dicts
from detectron2.layers import ShapeSpec
from detectron2.evaluation import COCOEvaluator
from detectron2.model_zoo import get_config
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler, MultiStepParamScheduler
from omegaconf import OmegaConf

from datasets.synthetic import STUFF_CATEGORIES, THING_CATEGORIES
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from engine.config import load_config, to_dict
from engine.optim import param_groups

from .detectron2 import PanopticQuality, ProjectBackbone, SparsePanopticFPN, SparseRCNN, with_pyramid

COCO_TRAIN_IMAGES = 117266  # train2017 images with annotations (detectron2 drops the others)
BACKBONE_PREFIX = "backbone.bottom_up."  # the backbone's own parameters; the FPN is detectron2's


def dataset_name(data_cfg, split_key: str) -> str:
    """The detectron2 name `register_coco_folder` gives a split (data.<split_key>) of the
    folder registered as data.name: an interpolation, so overriding data.* moves it along."""
    name = f"${{data.name}}_${{data.{split_key}}}"
    return f"{name}_panoptic_separated" if data_cfg.panoptic else name


def _levels(model, strides: list[int], channels: int, anchor_scale: float, panoptic: bool) -> None:
    """Point the RPN, RoI heads and semantic head at the FPN levels of backbone strides
    `strides` (+ the max-pooled level, for the RPN only)."""
    levels = [f"p{int(math.log2(s))}" for s in strides]
    all_strides = [*strides, 2 * strides[-1]]
    rpn = model.proposal_generator
    rpn.in_features = [*levels, f"p{int(math.log2(all_strides[-1]))}"]
    rpn.anchor_generator.sizes = [[anchor_scale * s] for s in all_strides]
    rpn.anchor_generator.strides = all_strides
    heads = model.roi_heads
    heads.box_in_features = heads.mask_in_features = levels
    heads.box_pooler.scales = heads.mask_pooler.scales = tuple(1.0 / s for s in strides)
    if panoptic:
        model.sem_seg_head.input_shape = {n: L(ShapeSpec)(stride=s, channels=channels) for n, s in zip(levels, strides)}
        model.sem_seg_head.common_stride = strides[0]


def build_model(model_cfg, num_things: int, num_stuff: int, panoptic: bool):
    """detectron2's Mask R-CNN / Panoptic FPN (model zoo defaults) around the project's
    backbone, sized by `model.rcnn`."""
    base = "common/models/panoptic_fpn.py" if panoptic else "common/models/mask_rcnn_fpn.py"
    model = get_config(base).model
    model._target_ = SparsePanopticFPN if panoptic else SparseRCNN
    b, r = to_dict(model_cfg.backbone), model_cfg.rcnn
    b.pop("lr")  # the optimizer's
    bottom_up = ProjectBackbone(**{**b, "pretrained": ""})  # for its shapes (no weights read)
    strides = [bottom_up._out_feature_strides[n] for n in bottom_up._out_features]
    pyramid = getattr(bottom_up.net, "is_pyramid", False)
    channels = bottom_up._out_feature_channels[bottom_up._out_features[0]] if pyramid else r.fpn_channels
    model.backbone = L(with_pyramid)(bottom_up=L(ProjectBackbone)(**b), out_channels=r.fpn_channels)
    _levels(model, strides, channels, r.anchor_scale, panoptic)
    rpn = model.proposal_generator
    rpn.head.in_channels = channels
    rpn.head.num_anchors = len(r.anchor_ratios)
    rpn.anchor_generator.aspect_ratios = list(r.anchor_ratios)
    rpn.anchor_matcher.thresholds = [r.rpn_bg_iou_thresh, r.rpn_fg_iou_thresh]
    rpn.batch_size_per_image, rpn.positive_fraction = r.rpn_batch_size_per_image, r.rpn_positive_fraction
    rpn.pre_nms_topk = (r.rpn_pre_nms_top_n_train, r.rpn_pre_nms_top_n_test)
    rpn.post_nms_topk = (r.rpn_post_nms_top_n_train, r.rpn_post_nms_top_n_test)
    rpn.nms_thresh = r.rpn_nms_thresh
    heads = model.roi_heads
    heads.num_classes = num_things
    heads.batch_size_per_image, heads.positive_fraction = r.box_batch_size_per_image, r.box_positive_fraction
    heads.proposal_matcher.thresholds = [r.box_fg_iou_thresh]
    heads.box_head.input_shape.channels = channels
    heads.box_head.fc_dims = [r.box_head_dim] * 2
    heads.box_predictor.input_shape.channels = r.box_head_dim
    heads.box_predictor.test_score_thresh = r.box_score_thresh
    heads.box_predictor.test_nms_thresh = r.box_nms_thresh
    heads.box_predictor.test_topk_per_image = r.detections_per_img
    heads.mask_head.input_shape.channels = channels
    heads.mask_head.conv_dims = [r.mask_head_dim] * 5  # four 3x3 convolutions + the deconvolution
    if panoptic:
        model.sem_seg_head.num_classes = num_stuff + 1  # + "things"
        model.sem_seg_head.conv_dims = r.semantic_channels
        model.sem_seg_head.loss_weight = r.semantic_loss_weight
        model.combine_overlap_thresh = r.overlap_thresh
        model.combine_stuff_area_thresh = r.stuff_area
        model.combine_instances_score_thresh = r.instance_score_thresh
    model.pixel_mean = [255 * m for m in IMAGENET_MEAN]
    model.pixel_std = [255 * s for s in IMAGENET_STD]
    model.input_format = "RGB"
    return model


def build_dataloader(data_cfg, total_batch: int, eval_batch: int) -> dict:
    """detectron2's train and test loaders and evaluators for data.root's splits with the
    project's augmentation: flip, the scales (max_size), DETR's random crop."""
    geometry = [L(T.ResizeShortestEdge)(short_edge_length=list(data_cfg.train_scales), max_size=data_cfg.max_size,
                                        sample_style="choice")]
    if data_cfg.random_crop:
        crop = L(T.AugmentationList)(augs=[
            L(T.ResizeShortestEdge)(short_edge_length=list(data_cfg.crop_resize_scales), max_size=100000,
                                    sample_style="choice"),
            L(T.RandomCrop)(crop_type="absolute_range", crop_size=list(data_cfg.crop_size))])
        geometry = [L(T.RandomApply)(tfm_or_aug=crop, prob=0.5), *geometry]
    train_name, val_name = dataset_name(data_cfg, "train_split"), dataset_name(data_cfg, "val_split")
    # bitmask: reads polygons and RLE alike (the synthetic sets' masks are RLE)
    mapper = dict(image_format="RGB", use_instance_mask=True, instance_mask_format="bitmask")
    loader = OmegaConf.create()
    loader.train = L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names=train_name, filter_empty=not data_cfg.panoptic),
        mapper=L(DatasetMapper)(is_train=True, augmentations=[
            L(T.RandomFlip)(prob=data_cfg.flip_prob, horizontal=True), *geometry], **mapper),
        total_batch_size=total_batch, num_workers=data_cfg.num_workers)
    loader.test = L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names=val_name, filter_empty=False),
        mapper=L(DatasetMapper)(is_train=False, augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=data_cfg.val_size, max_size=data_cfg.max_size)], **mapper),
        batch_size=eval_batch, num_workers=data_cfg.num_workers)
    loader.evaluator = [L(COCOEvaluator)(dataset_name=val_name)]
    if data_cfg.panoptic:
        loader.evaluator.append(L(PanopticQuality)(dataset_name=val_name))
    return loader


def recipe(yaml_path: str | Path, processes: int | None = None, init_checkpoint: str = "",
           overrides: list[str] = ()) -> tuple:
    """-> (model, dataloader, optimizer, lr_multiplier, train, data) of the detectron2
    LazyConfig for the project config at `yaml_path` (with `--opts`-style `overrides`), trained
    by `processes` processes (default: 2 on a synthetic set, the papers' 8 GPUs otherwise) of
    train.batch_size images each. `init_checkpoint`: detectron2 weights to start from (e.g.
    the dense run's model_final.pth under an SViT fine-tune)."""
    cfg = load_config(yaml_path, list(overrides))
    m, d, t = cfg.model, cfg.data, cfg.train
    if m.name not in ("mask_rcnn", "panoptic_fpn"):
        raise ValueError(f"{yaml_path}: model.name '{m.name}': detectron2 recipes are Mask R-CNN and Panoptic FPN")
    if t.clip_max_norm > 0:
        raise ValueError(f"{yaml_path}: train.clip_max_norm {t.clip_max_norm}: gradient clipping is not carried over")
    custom = [k for k in ("train_images", "train_annotations", "val_images", "val_annotations") if d[k]]
    if custom:
        raise ValueError(f"{yaml_path}: data.{custom[0]}: detectron2's datasets are registered from data.root's "
                         "COCO layout; a split in its own folder and file is not carried over")
    if t.accumulate != 1 or t.ema:
        raise ValueError(f"{yaml_path}: train.accumulate {t.accumulate} / train.ema {t.ema}: detectron2's trainer has "
                         "neither gradient accumulation nor a weight average")
    panoptic = m.name == "panoptic_fpn"
    num_things, num_stuff = (len(THING_CATEGORIES), len(STUFF_CATEGORIES)) if d.synthetic.generate else (80, 53)
    if m.num_classes:
        num_things = m.num_classes
    processes = processes or (2 if d.synthetic.generate else 8)
    total_batch = processes * t.batch_size
    images = d.synthetic.num_train if d.synthetic.generate else COCO_TRAIN_IMAGES
    epoch = math.ceil(images / total_batch)
    max_iter = t.max_iters or t.epochs * epoch
    steps = [e * epoch for e in t.lr_drops if e * epoch < max_iter]
    optimizer = L(torch.optim.AdamW)(
        params=L(param_groups)(model=None, lr=t.lr, backbone_lr=m.backbone.lr, weight_decay=t.weight_decay,
                               lr_multipliers=dict(t.lr_multipliers), no_decay=list(t.no_decay),
                               backbone_prefix=BACKBONE_PREFIX),
        lr=t.lr, weight_decay=t.weight_decay)
    schedule = L(CosineParamScheduler)(start_value=1.0, end_value=t.min_lr_ratio) if t.lr_schedule == "cosine" \
        else L(MultiStepParamScheduler)(values=[0.1 ** i for i in range(len(steps) + 1)], milestones=steps,
                                        num_updates=max_iter)
    lr_multiplier = L(WarmupParamScheduler)(
        scheduler=schedule,
        warmup_length=t.warmup_iters / max_iter, warmup_factor=t.warmup_ratio if t.warmup_iters else 1.0)
    train = get_config("common/train.py").train
    train.update(output_dir=str(Path("out/detectron2") / Path(yaml_path).stem), init_checkpoint=init_checkpoint,
                 max_iter=max_iter, eval_period=t.eval_every * epoch, log_period=t.log_every, device=cfg.device,
                 seed=t.seed)
    train.checkpointer.update(period=t.checkpoint_every * epoch, max_to_keep=t.keep_checkpoints)
    return (build_model(m, num_things, num_stuff, panoptic), build_dataloader(d, total_batch, cfg.eval.batch_size),
            optimizer, lr_multiplier, train, OmegaConf.create({**to_dict(d), "name": Path(d.root).name}))
