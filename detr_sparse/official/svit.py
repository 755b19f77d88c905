"""uzh-rpg/svit's mmdet 2.x Mask R-CNN checkpoints: ViT-Adapter-T / S (`vit-adapter-{t,s}-3x`, dense)
and SViT-Adapter-T / S (`svit-adapter-{t,s}-*-ftune`: a selection gate before each of blocks
3..11) -> this project's Mask R-CNN on `deit_{t,s}_adapter` / `deit_{t,s}_adapter_svit` (torchvision's
FPN, RPN and RoI heads). Every part converts; the layouts that differ beyond the names:

- Backbone: the ViT blocks (timm's names, nn.TransformerEncoderLayer's in SViT: vit.py), the
  spatial prior module's Sequentials (conv, norm, ReLU ... per stage: ours one Sequential a
  unit), the extractors (`extractor` + `extra_extractors.0/1`: ours `extractors.0..2`), the
  output norms `norm1..4` (ours `norms.0..3`). SViT's gates (`selective_modules.k`: LayerNorm,
  Linear C -> C/4, GELU, Linear C/4 -> 2, index 0 keep) sit before block k + depth / 4 (their
  `select_loc` 4..12, counted from 1) and are ours (`gate.net.0/1/3`) of that block.
- RPN: one sigmoid logit and four deltas (stds 1) per anchor in both, anchors in the same order
  (location, then aspect ratio 0.5, 1, 2 at 8 x the stride); a config listing the ratios in
  another order gets the rows permuted to it.
- Box head: mmdet's classifier has the background row last, ours first; its class-specific
  regression has 4 rows per class and none for the background, ours 4 rows per class after 4
  for the background (zero here: torchvision never decodes them). The deltas are scaled alike
  (mmdet's stds 0.1, 0.1, 0.2, 0.2 are torchvision's weights 10, 10, 5, 5).
- Mask head: mmdet's logits have a channel per class, ours one more (background, first, zero).
- Their 80 rows are COCO's classes in category-id order: a dataset's category ids select them.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from .categories import COCO_THING_IDS
from .errors import ConversionError
from .vit import CLASSIFIER, block_name, deit_size, patch_positions

MMDET_RATIOS = (0.5, 1.0, 2.0)  # mmdet's anchor order at each location (ratio-major, one scale)
MMDET_STRIDES = (4, 8, 16, 32, 64)  # FPN levels p2..p6 (p6: max-pool of p5), anchors 8 x stride
INTERACTIONS = re.compile(r"backbone\.interactions\.\d+\.")  # with "roi_head.": what tells the format
_HEAD_ROWS = {  # our key -> how its rows come from mmdet's
    "roi_heads.box_predictor.cls_score": "classes+background", "roi_heads.box_predictor.bbox_pred": "boxes",
    "roi_heads.mask_predictor.mask_fcn_logits": "masks", "rpn.head.cls_logits": "anchors",
    "rpn.head.bbox_pred": "anchor_boxes"}


def facts(state_dict: dict[str, Tensor]) -> dict:
    """What the keys show: the ViT's width and depth, the SViT gate count."""
    def count(pattern: str) -> int:
        return len({m[1] for k in state_dict if (m := re.match(pattern, k))})

    proj = state_dict.get("backbone.patch_embed.proj.weight")
    return {"backbone": "deit", "width": 0 if proj is None else proj.shape[0],
            "depth": count(r"backbone\.blocks\.(\d+)\."), "gates": count(r"backbone\.selective_modules\.(\d+)\.")}


def describe(width: int, gates: int) -> str:
    gated = f", {gates} SViT gates" if gates else ""
    return f"{'SViT' if gates else 'ViT'}-Adapter-{deit_size(width)} Mask R-CNN{gated}"


def config(width: int, gates: int) -> str:
    return f"mask_rcnn_deit_{'t' if width == 192 else 's'}_adapter{'_svit' if gates else ''}.yaml"


def unused(key: str) -> bool:
    """Classifier leftovers a backbone of theirs might hold (none of the released ones does)."""
    return key.startswith("backbone.") and bool(CLASSIFIER.fullmatch(key.removeprefix("backbone.")))


def _stem(match: re.Match) -> str:  # Sequential(conv, BN, ReLU) x 3, max-pool -> 3 units of (conv, BN)
    index = int(match[1])
    return f"backbone.spm.stem.{index // 3}.{index % 3}.{match[2]}" if index % 3 < 2 and index < 9 else ""


def _extractor(match: re.Match) -> str:
    index = 0 if match[2] is None else int(match[2]) + 1
    rest = match[3].replace("ffn.dwconv.dwconv.", "ffn.dwconv.")
    return f"backbone.interactions.{match[1]}.extractors.{index}.{rest}"


_RULES = [  # (their key, ours) for everything but the ViT blocks and the gates
    (r"backbone\.pos_embed", "backbone.pos_embedding"), (r"backbone\.level_embed", "backbone.level_embed"),
    (r"backbone\.patch_embed\.proj\.(.+)", r"backbone.conv_proj.\1"),
    (r"backbone\.spm\.stem\.(\d+)\.(.+)", _stem),
    (r"backbone\.spm\.conv([234])\.([01])\.(.+)", lambda m: f"backbone.spm.stages.{int(m[1]) - 2}.{m[2]}.{m[3]}"),
    (r"backbone\.spm\.fc([1-4])\.(.+)", lambda m: f"backbone.spm.project.{int(m[1]) - 1}.{m[2]}"),
    (r"backbone\.interactions\.(\d+)\.injector\.((query_norm|feat_norm|attn)\..+|gamma)",
     r"backbone.interactions.\1.injector.\2"),
    (r"backbone\.interactions\.(\d+)\.(?:extractor|extra_extractors\.(\d+))\."
     r"((query_norm|feat_norm|ffn_norm|attn|ffn\.fc1|ffn\.fc2|ffn\.dwconv\.dwconv)\..+)", _extractor),
    (r"backbone\.up\.(.+)", r"backbone.up.\1"),
    (r"backbone\.norm([1-4])\.(.+)", lambda m: f"backbone.norms.{int(m[1]) - 1}.{m[2]}"),
    (r"neck\.lateral_convs\.(\d+)\.conv\.(.+)", r"neck.fpn.inner_blocks.\1.0.\2"),
    (r"neck\.fpn_convs\.(\d+)\.conv\.(.+)", r"neck.fpn.layer_blocks.\1.0.\2"),
    (r"rpn_head\.rpn_conv\.(.+)", r"rpn.head.conv.0.0.\1"), (r"rpn_head\.rpn_cls\.(.+)", r"rpn.head.cls_logits.\1"),
    (r"rpn_head\.rpn_reg\.(.+)", r"rpn.head.bbox_pred.\1"),
    (r"roi_head\.bbox_head\.shared_fcs\.([01])\.(.+)", lambda m: f"roi_heads.box_head.fc{6 + int(m[1])}.{m[2]}"),
    (r"roi_head\.bbox_head\.fc_cls\.(.+)", r"roi_heads.box_predictor.cls_score.\1"),
    (r"roi_head\.bbox_head\.fc_reg\.(.+)", r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"roi_head\.mask_head\.convs\.(\d+)\.conv\.(.+)", r"roi_heads.mask_head.\1.0.\2"),
    (r"roi_head\.mask_head\.upsample\.(.+)", r"roi_heads.mask_predictor.conv5_mask.\1"),
    (r"roi_head\.mask_head\.conv_logits\.(.+)", r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
]
_GATE = {"norm": "net.0", "mlp.fc1": "net.1", "mlp.fc2": "net.3"}


def our_name(key: str, depth: int) -> str | None:
    """Our key of an official one (depth: the ViT's, whose first quarter has no gate), or None."""
    block = re.fullmatch(r"backbone\.blocks\.(\d+)\.(?:TransformerEncoderLayer\.)?(.+)", key)
    if block:
        rest = block_name(block[2])
        return None if rest is None else f"backbone.layers.encoder_layer_{block[1]}.{rest}"
    gate = re.fullmatch(r"backbone\.selective_modules\.(\d+)\.(norm|mlp\.fc1|mlp\.fc2)\.(weight|bias)", key)
    if gate:
        return f"backbone.layers.encoder_layer_{int(gate[1]) + depth // 4}.gate.{_GATE[gate[2]]}.{gate[3]}"
    for pattern, replacement in _RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key) or None
    return None


def problems(layout, model) -> list[str]:
    """How the model differs from the checkpoint's network beyond what its keys show."""
    from ..backbones.svit import SViTAdapterBackbone
    from ..backbones.vit_adapter import ViTAdapterBackbone
    from ..mask_rcnn import MaskRCNN

    if type(model) is not MaskRCNN:
        return [f"the config builds a {type(model).__name__}, the checkpoint is a MaskRCNN"]
    backbone, found = model.backbone, []
    if not isinstance(backbone, ViTAdapterBackbone):
        return [f"its backbone is a ViT-Adapter, the config's a {type(backbone).__name__}"]
    if layout.gates and not isinstance(backbone, SViTAdapterBackbone):
        found.append(f"its {layout.gates} SViT gates have no place in the config's dense backbone")
    elif layout.gates and layout.gates != len(backbone.gated):
        found.append(f"{layout.gates} SViT gates, the config's backbone has one on each of its {len(backbone.gated)} "
                     "gated blocks (the authors' shared / inherited gate variants are not converted)")
    anchors = model.rpn.anchor_generator
    sizes = [tuple(float(s) for s in level) for level in anchors.sizes]
    if list(anchors.strides) != list(MMDET_STRIDES) or sizes != [(8.0 * s,) for s in MMDET_STRIDES]:
        found.append(f"mmdet's anchors are 8 x the stride on strides {list(MMDET_STRIDES)}, the config's "
                     f"{[s[0] for s in sizes]} on {list(anchors.strides)} (model.rcnn.anchor_scale, backbone levels)")
    if any(sorted(float(r) for r in ratios) != list(MMDET_RATIOS) for ratios in anchors.aspect_ratios):
        found.append(f"mmdet's anchor ratios are {list(MMDET_RATIOS)}, the config's {list(anchors.aspect_ratios[0])} "
                     "(model.rcnn.anchor_ratios)")
    coders = (tuple(model.rpn.box_coder.weights), tuple(model.roi_heads.box_coder.weights))
    if coders != ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        found.append(f"box coder weights {coders}, not mmdet's stds 1 (RPN) and 0.1, 0.1, 0.2, 0.2 (RoI)")
    return found


def context(state_dict: dict[str, Tensor], model, categories: list[int], source: str) -> dict:
    """The rows each head takes: "classes" (mmdet's class index of each of our classes, of
    "count") and "anchors" (mmdet's anchor index of each of ours at a location)."""
    fc_cls = state_dict.get("roi_head.bbox_head.fc_cls.weight")
    count = len(COCO_THING_IDS) if fc_cls is None else fc_cls.shape[0] - 1
    if count == len(COCO_THING_IDS):
        foreign = [c for c in categories if c not in COCO_THING_IDS]
        if foreign:
            raise ConversionError(f"{source}: the box head's {count} classes are COCO's (mmdet labels 0..79 in "
                                  f"category-id order); the dataset's ids {foreign[:5]} are not among them")
        classes = [COCO_THING_IDS.index(c) for c in categories]
    elif len(categories) == count:
        classes = list(range(count))  # another dataset's: its labels in the model's order
    else:
        raise ConversionError(f"{source}: a box head of {count} classes for {len(categories)} categories")
    ratios = [float(r) for r in model.rpn.anchor_generator.aspect_ratios[0]]
    return {"classes": torch.tensor(classes, dtype=torch.int64), "count": count,
            "anchors": torch.tensor([MMDET_RATIOS.index(r) for r in ratios])}


def transform(name: str, value: Tensor, shape: tuple[int, ...], key: str, plan: dict) -> Tensor:
    """The value of our key `name` (shape: the model's) from the official tensor `key`."""
    if name == "backbone.pos_embedding":
        return patch_positions(value, shape, key)
    kind = _HEAD_ROWS.get(name.rsplit(".", 1)[0])
    if kind is None:
        return value
    count, classes = plan["count"], plan["classes"]
    if kind in ("anchors", "anchor_boxes"):  # rows per anchor: 1 or 4 consecutive
        per, anchors = 1 if kind == "anchors" else 4, plan["anchors"]
        if value.shape[0] != per * len(anchors):
            raise ConversionError(f"{key}: {value.shape[0]} rows, not {per} for each of {len(anchors)} anchors")
        return value.reshape(len(anchors), per, *value.shape[1:])[anchors].flatten(0, 1)
    if kind == "classes+background":
        if value.shape[0] != count + 1:
            raise ConversionError(f"{key}: {value.shape[0]} rows, not {count} classes + background")
        return torch.cat([value[count:], value[classes]])
    per = 4 if kind == "boxes" else 1
    if value.shape[0] != per * count:
        raise ConversionError(f"{key}: {value.shape[0]} rows, not {per} per class of {count} (a class-agnostic "
                              "head is not this project's)")
    rows = value.reshape(count, per, *value.shape[1:])[classes]
    return torch.cat([rows.new_zeros(1, *rows.shape[1:]), rows]).flatten(0, 1)
