"""Typed configuration: defaults as dataclasses, YAML files with `_base_` inheritance,
and `--opts a.b=c` overrides. An unknown key or a wrong type is an error naming the key
and the file it came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    pass


@dataclass
class DGEConfig:
    """The dynamic grained encoder backbones (name *_dge)."""
    budget: float = 0.5  # gamma: the target cost share of the dense backbone
    budget_weight: float = 1.0  # lambda of the budget loss (beta - gamma)^2
    budget_scope: str = "backbone"  # backbone (patch embeddings + blocks) | dge_layers (blocks only)
    # false: the authors' exact dense form in training (every granularity computed, the gates
    # mixing them): 1.3-1.8 AP50 points better on the synthetic sets at the same speed per
    # iteration there; true: each image's chosen queries only (the blocks 2.1x faster)
    sparse_train: bool = False


@dataclass
class SViTConfig:
    """The selective ViT backbones (names *_svit)."""
    ratio_weight: float = 4.0  # lambda of the keep-ratio loss
    per_image: bool = False  # keep shares per image (the paper's fixed-rate baseline), not over the batch
    stochastic_eval: bool = False  # sample the gates in evaluation, as the authors' released code does
    # evaluation keeps each gated block's target share of each image's tokens, the best by the
    # gate (a fixed budget), instead of the tokens whose keep probability passes 0.5
    eval_at_targets: bool = False


@dataclass
class SPTConfig:
    """The select-and-pack attention backbones (names spt_*)."""
    select_weight: float = 0.01  # alpha of the selection loss
    threshold: float = 0.01  # a token is selected when its (relaxed) sigmoid score exceeds it
    tau: float = 1.0  # temperature of the binary concrete in training
    region_mask: bool = True  # a token attends only within its shifted-window region too
    label_from: str = "boxes"  # boxes | masks: the union the selection labels come from
    attention: str = "sdpa"  # sdpa | flex: the packed attention's kernel (tools/benchmark.py --component spa)
    # each image in containers of its own in evaluation (results independent of the batch),
    # images end to end in training (the paper's packing)
    align_images_eval: bool = True
    gate_per: str = "block"  # block | stage: a gate in every SPA block, or one per SPA stage (its first block)


@dataclass
class BackboneConfig:
    name: str = "resnet50"
    # frozen_bn for ImageNet-pretrained weights (DETR); bn / gn when training from scratch
    norm: str = "frozen_bn"
    dilation: bool = False  # DC5: dilate the last stage instead of striding it
    out_features: list[str] = field(default_factory=lambda: ["res5"])  # DETR uses the last
    pretrained: str = ""  # path to a local torchvision state dict; "" = random init
    lr: float = 1e-5  # 0 freezes the backbone
    channels_last: bool = True  # ~1.8x faster convolutions on CPU
    # stages without gradient: 0 none, 1 the stem (ResNet) or patch embedding (Swin, PVT, ViT),
    # 2 it + res2 (DETR), 3 up to res3, ...; Swin freezes a stage with the patch merging after
    # it, as the official frozen_stages (2 in Sparse DETR); a ViT has only 0 and 1.
    # -1: ResNet 2 with frozen_bn, 0 with a trainable norm; the others 0
    freeze_at: int = -1
    drop_path_rate: float = 0.0  # stochastic depth of transformer backbones (Swin)
    dge: DGEConfig = field(default_factory=DGEConfig)
    svit: SViTConfig = field(default_factory=SViTConfig)
    spt: SPTConfig = field(default_factory=SPTConfig)


@dataclass
class TransformerConfig:
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    # deformable transformer (Deformable DETR family)
    num_feature_levels: int = 4  # backbone maps + extra stride-2 convolutions on the last
    enc_n_points: int = 4  # sampling points per head and level
    dec_n_points: int = 4


@dataclass
class LossConfig:
    aux_loss: bool = True
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cls_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    eos_coef: float = 0.1  # relative weight of the no-object class (softmax classifiers)
    focal_alpha: float = 0.25  # sigmoid focal loss (Deformable DETR family)
    mask_weight: float = 1.0  # panoptic: sigmoid focal loss of the matched masks
    dice_weight: float = 1.0  # panoptic: dice loss of the matched masks


@dataclass
class SparseConfig:
    """Sparse DETR's encoder token sparsification."""
    rho: float = 0.1  # share of each image's tokens the encoder updates; 0 = dense encoder
    saliency: str = "dam"  # dam: decoder cross-attention map | os: objectness score
    enc_aux_loss: bool = True  # detection losses on the kept tokens of every encoder layer but the last
    mask_loss_weight: float = 1.0  # the scoring network's BCE against the binarised DAM
    # the scoring loss's average: image (the official code: each image's mean over all its
    # padded token grid, then the mean over images) | token (one mean over the valid tokens)
    scoring_loss_norm: str = "image"


@dataclass
class PnPConfig:
    """PnP-DETR's poll-and-pool sampler."""
    poll_ratio: float = 0.33  # share of each image's tokens polled as fine tokens (inference, fixed training)
    # training: a ratio drawn uniformly from [min, max] every iteration; [] = poll_ratio always
    random_ratio: list[float] = field(default_factory=list)
    num_coarse: int = 30  # pooled coarse tokens M (the official code: 30 for C5, 100 for DC5)
    score_loss_weight: float = 1e-4  # the poll-score regulariser


@dataclass
class PanopticConfig:
    """DETR's segmentation branch (DETR and PnP-DETR; needs data.panoptic and backbone maps
    finer than the detection map, e.g. out_features [res2, res3, res4, res5])."""
    enabled: bool = False
    threshold: float = 0.85  # class score a query needs to enter the panoptic map
    # train the mask branch only, on a trained detector (model.weights), as DETR does; false:
    # detector and mask branch train together
    freeze_detector: bool = False


@dataclass
class TwoStageConfig:
    """Mask R-CNN and Panoptic FPN (model.name mask_rcnn | panoptic_fpn) on torchvision's RPN
    and RoI heads; defaults are torchvision's maskrcnn_resnet50_fpn and detectron2's Panoptic
    FPN. Levels: the backbone's out_features (e.g. [res2, res3, res4, res5]) + a max-pool one."""
    fpn_channels: int = 256  # FPN width; a ViT backbone (already a pyramid) has no FPN and keeps its width
    anchor_scale: float = 8.0  # anchor side = anchor_scale * level stride (32 .. 512 on strides 4 .. 64)
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # height / width
    rpn_pre_nms_top_n_train: int = 2000  # proposals per level before NMS
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000  # proposals per image after NMS
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256  # anchors sampled for the RPN losses
    rpn_positive_fraction: float = 0.5
    rpn_score_thresh: float = 0.0
    box_head_dim: int = 1024  # width of the two fully connected layers of the box head
    box_score_thresh: float = 0.05  # detections kept in eval
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512  # proposals sampled for the box losses
    box_positive_fraction: float = 0.25
    mask_head_dim: int = 256  # width of the four 3x3 convolutions of the mask head
    # Panoptic FPN
    semantic_channels: int = 128  # width of the semantic FPN head
    semantic_loss_weight: float = 0.5
    instance_score_thresh: float = 0.5  # detections below it stay out of the panoptic map
    overlap_thresh: float = 0.5  # an instance more than this on taken pixels is dropped
    stuff_area: int = 4096  # a stuff region of fewer free pixels is dropped (COCO: 4096)


@dataclass
class ModelConfig:
    name: str = "detr"
    num_classes: int = 0  # 0: taken from the training set's categories
    num_queries: int = 100
    with_box_refine: bool = False  # Deformable DETR: each decoder layer refines the boxes
    two_stage: bool = False  # Deformable DETR: encoder proposals, top-k as decoder queries
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    pnp: PnPConfig = field(default_factory=PnPConfig)
    panoptic: PanopticConfig = field(default_factory=PanopticConfig)
    rcnn: TwoStageConfig = field(default_factory=TwoStageConfig)  # mask_rcnn, panoptic_fpn
    # a checkpoint whose model weights initialise training (e.g. the detector under a new mask
    # branch); missing and unexpected keys are logged by name. A resumed run ignores it.
    weights: str = ""


@dataclass
class SyntheticConfig:
    generate: bool = False  # create data.root with datasets.synthetic when it is missing
    num_train: int = 2000
    num_val: int = 200
    seed: int = 0
    min_size: int = 0  # image side range; 0: the generator's default (sparse scenes are larger)
    max_size: int = 0
    max_objects: int = 6
    min_object_size: int = 8  # smallest object diameter in pixels
    sparse: bool = False


@dataclass
class DataConfig:
    root: str = "data/coco"
    train_split: str = "train2017"
    val_split: str = "val2017"
    # a split given as its own image folder and COCO annotation file, in any layout (both
    # keys, or neither for data.root's COCO layout); the class names come from the file. With
    # data.panoptic the file is a panoptic one and its PNGs lie in its path without ".json".
    train_images: str = ""
    train_annotations: str = ""
    val_images: str = ""
    val_annotations: str = ""
    masks: bool = False
    panoptic: bool = False  # COCO panoptic (annotations/panoptic_<split>.json + PNGs): things + stuff
    skip_unreadable: bool = False  # skip corrupt images with a counted warning instead of failing
    seed: int = 0  # augmentation seed; a sample's augmentation depends on (seed, epoch, index)
    flip_prob: float = 0.5
    train_scales: list[int] = field(
        default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    )
    max_size: int = 1333
    random_crop: bool = True
    crop_resize_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: list[int] = field(default_factory=lambda: [384, 600])
    val_size: int = 800
    num_workers: int = 2
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 2  # per process
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_drops: list[int] = field(default_factory=lambda: [200])  # epochs where lr *= 0.1
    warmup_iters: int = 0  # linear warm-up of the learning rate over the first iterations (0: none)
    warmup_ratio: float = 0.001  # the warm-up's first multiplier
    # step: lr * 0.1 at each of lr_drops (epochs); cosine: per iteration from lr down to
    # lr * min_lr_ratio at the last iteration (lr_drops ignored); both after the warm-up
    lr_schedule: str = "step"
    min_lr_ratio: float = 0.0
    # an optimizer step every `accumulate` batches: the gradient of batch_size x processes x
    # accumulate images (losses averaged over the batches); an epoch's leftover batches are skipped
    accumulate: int = 1
    # exponential moving average of the weights (decay per step, e.g. 0.9998; 0: off): when on,
    # evaluation uses the averaged weights and checkpoints keep them
    ema: float = 0.0
    # parameters whose name contains one of these get no weight decay (e.g. bias, norm, pos_embedding)
    no_decay: list[str] = field(default_factory=list)
    clip_max_norm: float = 0.1
    amp: str = "none"  # none | bf16 | fp16 (fp16 on CUDA only)
    # recompute these parts' activations in the backward pass: backbone, encoder, decoder
    activation_checkpointing: list[str] = field(default_factory=list)
    # parameters whose name contains a key get lr * factor (Deformable DETR: 0.1 for
    # sampling_offsets and reference_points)
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    shard_optimizer: bool = False  # fairscale OSS: optimizer state split over the ranks
    grad_compression: str = "none"  # none | bf16 | fp16: gradients all-reduced in half precision
    seed: int = 42
    # stop after this many iterations in total (quick runs and tests; an epoch cut short
    # counts as done); 0 = no limit
    max_iters: int = 0
    log_every: int = 20
    eval_every: int = 1  # epochs
    checkpoint_every: int = 1  # epochs
    checkpoint_every_iters: int = 0  # also every this many iterations (0: epochs only)
    keep_checkpoints: int = 2  # the newest K checkpoint files are kept


@dataclass
class EvalConfig:
    batch_size: int = 2
    # the arithmetic of evaluation and of the tools' forward passes: fp32 | bf16 (autocast, AMX
    # matmuls on CPUs that have them) | fp16 (CUDA only); training's train.amp is separate
    precision: str = "fp32"
    num_vis_images: int = 4  # val images drawn with their predictions in TensorBoard
    vis_score_threshold: float = 0.5


@dataclass
class Config:
    output_dir: str = "out/default"
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _file_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The YAML files to merge for `path`, bases first, each with its own content."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular _base_ chain through {[str(p) for p in seen]}")
    if not path.is_file():
        where = f" (a _base_ of {seen[-1]})" if seen else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(content).__name__}")
    bases = content.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    chain = []
    for base in bases:
        chain += _file_chain(path.parent / base, seen + (path,))
    return chain + [(path, content)]


def _merge(cfg: DictConfig, update, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, update)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{source}: key '{key}': {reason}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> DictConfig:
    """Typed defaults <- YAML chain of `path` <- `overrides` ("a.b=value" strings)."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        for file, content in _file_chain(Path(path)):
            cfg = _merge(cfg, content, str(file))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--opts: '{item}' is not of the form key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"--opts {item}")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def backbone_config(options: dict, source: str = "backbone options") -> DictConfig:
    """A typed `model.backbone` config: the defaults <- `options` (nested dicts for dge, svit,
    spt); an unknown key or a wrong type is a ConfigError naming it and `source`."""
    return _merge(OmegaConf.structured(BackboneConfig), options, source)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
