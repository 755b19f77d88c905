"""An authors' state dict -> the state dict of this project's model of the same network:
every official key renamed (names.py; the ViT formats: vtpack.py, svit.py), the class heads cut
to the dataset's classes (categories.py), and the result checked against the model: an unknown
official key, a key of ours left without a value, or a shape that differs is an error naming
them."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import svit, vtpack
from .categories import coco_categories, head_rows
from .layout import ConversionError, Layout, detect_layout

# keys whose tensor is laid out differently, same values: PnP-DETR's 1x1 convolutions (our
# linear layers), the Swin window's relative-position index (2-D there, flat in torchvision)
_RESHAPED = re.compile(r"sampler\.score\.\d\.weight|.*\.relative_position_index")
# buffers of ours that describe the dataset, not the weights: kept as the model was built
_DATASET_BUFFERS = ("is_thing",)
_VIT_FORMATS = {"vtpack": vtpack, "svit_mmdet": svit}  # format -> its module
_CLASS_HEADS = {"detr": "class_embed.weight", "pnp_detr": "class_embed.weight",  # (others: class_embed.0)
                "svit_mmdet": "roi_heads.box_predictor.cls_score.weight"}


@dataclass
class Converted:
    """state_dict: the model's state dict; sources: our key -> the official key it came from
    ("" for the model's own dataset buffers; "a+b" for a concatenation of official keys);
    aliases: official keys that repeat another (held twice by the authors' model) -> that key;
    categories: the ids of our classes (none for a backbone)."""

    state_dict: dict[str, Tensor]
    sources: dict[str, str]
    aliases: dict[str, str]
    layout: Layout
    categories: list[int]


def head_kind(layout: Layout, key: str) -> str | None:
    """How the rows of our class-head `key` relate to the classes (categories.HEAD_KINDS),
    None for a key that is not a class head."""
    if layout.format in ("detr", "pnp_detr"):
        return "softmax" if key in ("class_embed.weight", "class_embed.bias") else None
    match = re.fullmatch(r"(class_embed|enc_aux_class)\.(\d+)\.(weight|bias)", key)
    if match is None:
        return None
    proposals = match[1] == "class_embed" and int(match[2]) == layout.dec_layers  # two-stage only
    return "objectness" if proposals and layout.query_init == "embedding" else "sigmoid"


def _model_problems(layout: Layout, model: nn.Module) -> list[str]:
    """How the model differs from the checkpoint's network beyond what its keys show."""
    if layout.format in _VIT_FORMATS:
        return _VIT_FORMATS[layout.format].problems(layout, model)
    from ..backbones.swin import SwinBackbone
    from ..deformable_detr import DeformableDETR
    from ..detr import DETR
    from ..pnp_detr import PnPDETR
    from ..sparse_detr import SparseDETR

    wanted = {"detr": DETR, "pnp_detr": PnPDETR}.get(layout.format, SparseDETR if layout.scoring else DeformableDETR)
    if type(model) is not wanted:
        return [f"the config builds a {type(model).__name__}, the checkpoint is a {wanted.__name__}"]
    problems = []
    if (layout.backbone == "swin") != isinstance(model.backbone, SwinBackbone):
        problems.append(f"its backbone is {'Swin' if layout.backbone == 'swin' else 'a ResNet'}, the "
                        f"config's a {type(model.backbone).__name__}")
    if isinstance(model, DeformableDETR):
        for what, theirs, ours in (("model.with_box_refine", layout.box_refine, model.with_box_refine),
                                   ("model.two_stage", layout.two_stage, model.two_stage),
                                   ("query initialisation", layout.query_init, model.transformer.query_init)):
            if theirs != ours:
                problems.append(f"{what}: {theirs} in the checkpoint, {ours} in the config")
        if layout.two_stage and layout.query_init == "embedding" and not layout.box_refine:
            problems.append("two-stage without box refinement shares one class head between the proposals "
                            "(objectness row) and the decoder (class rows), which one head of ours cannot hold")
    return problems


def training_arg(args, name: str):
    """An argument of an authors' checkpoint's `args` (an argparse Namespace or a dict), None
    when it or the args are absent."""
    return args.get(name) if isinstance(args, dict) else getattr(args, name, None)


def _args_problems(args, model: nn.Module) -> list[str]:
    """What the checkpoint's training arguments (when it has them) say that the keys do not."""
    problems = []
    strides = getattr(model.backbone, "strides", {})
    dilation = training_arg(args, "dilation")
    if dilation is not None and strides and bool(dilation) != (max(strides.values()) == 16):
        problems.append(f"trained with dilation={bool(dilation)} (DC5), the config's backbone has "
                        f"model.backbone.dilation={not dilation}")
    queries = training_arg(args, "num_queries")
    ours = getattr(getattr(model, "transformer", None), "num_queries", None)
    if queries is not None and ours is not None and getattr(model, "two_stage", False) and queries != ours:
        problems.append(f"trained with {queries} two-stage queries, the config has model.num_queries={ours}")
    return problems


def _categories(layout: Layout, ours: dict[str, Tensor], categories, source: str) -> list[int]:
    """The category ids of the model's classes: given, or COCO's when the class count is."""
    key = _CLASS_HEADS.get(layout.format, "class_embed.0.weight")
    if key not in ours:
        raise ConversionError(f"{source}: the config's model has no class head '{key}'")
    count = ours[key].shape[0] - (1 if layout.format in _CLASS_HEADS else 0)  # no-object / background row
    if categories is None:
        if count not in (80, 133):
            raise ConversionError(f"{source}: the config's model has {count} classes, not COCO's 80 (or 133 "
                                  "panoptic): give the dataset's category ids (--categories ANNOTATIONS.json)")
        return coco_categories(panoptic=count == 133)[0]
    if len(categories) != count:
        raise ConversionError(f"{source}: {len(categories)} categories for a model of {count} classes")
    return list(categories)


def _key_problems(produced: dict[str, Tensor], ours: dict[str, Tensor], strict: bool,
                  required: set[str] = frozenset()) -> list[str]:
    """The converted keys the model does not have, the keys of ours without a value (strict;
    the `required` ones always) and the shapes that differ, each kind named in one item."""
    problems = []
    extra = [k for k in produced if k not in ours]
    missing = [k for k in ours if k not in produced and (strict or k in required)]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in produced.items()
              if k in ours and v.shape != ours[k].shape]
    for label, keys in (("keys the config's model does not have", extra),
                        ("keys of the model the checkpoint leaves empty", missing),
                        ("shapes that differ (checkpoint vs model)", shapes)):
        if keys:
            problems.append(f"{len(keys)} {label}: {keys[:5]}{' ...' if len(keys) > 5 else ''}")
    return problems


def convert_state_dict(state_dict: dict[str, Tensor], model: nn.Module, categories: list[int] | None = None,
                       fmt: str | None = None, strict: bool = True, source: str = "checkpoint",
                       args=None) -> Converted:
    """The state dict of `model` from an authors' `state_dict` (format from the keys, or
    `fmt`). categories: the category id of each of the model's classes (its label order),
    None for COCO's; strict: every key of the model must get a value (False: the ones the
    checkpoint lacks keep the model's, e.g. a new mask branch); args: the checkpoint's
    training arguments, checked against the model when given. A backbone's weights (vtpack)
    go to `model` itself when it is that backbone, else to its `backbone`; all of that
    backbone's pretrained keys are required either way. ConversionError (one line, naming
    `source` and the keys) for whatever does not fit."""
    layout = detect_layout(state_dict, fmt, source)
    its_config = f"(its config: configs/{layout.config(training_arg(args, 'dilation'))})"
    problems = _model_problems(layout, model) + ([] if args is None else _args_problems(args, model))
    if problems:
        raise ConversionError(f"{source}: {layout.describe()}: {'; '.join(problems)} {its_config}")
    produced, sources, aliases, unknown = {}, {}, {}, []
    merged, prefix = {}, vtpack.target(model)[1] if layout.backbone_only else ""
    if layout.format == "vtpack":  # q and kv -> one projection
        state_dict, merged = vtpack.merged(state_dict, source)
    for key, value in state_dict.items():
        repeated = layout.alias_of(key)
        if repeated is not None:
            if repeated not in state_dict or not torch.equal(state_dict[repeated], value):
                raise ConversionError(f"{source}: {key} should repeat {repeated}, which is "
                                      f"{'missing' if repeated not in state_dict else 'different'}")
            aliases[key] = repeated
        elif not layout.unused(key):
            name = layout.our_name(key)
            if name is None:
                unknown.append(key)
            else:
                produced[prefix + name], sources[prefix + name] = value, merged.get(key, key)
    if unknown:
        raise ConversionError(f"{source}: {len(unknown)} keys unknown to the {layout.describe()} "
                              f"conversion: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    ours = model.state_dict()
    categories = list(categories or []) if layout.backbone_only else _categories(layout, ours, categories, source)
    module = _VIT_FORMATS.get(layout.format)
    plan = svit.context(state_dict, model, categories, source) if layout.format == "svit_mmdet" else {}
    for name, value in produced.items():
        if module is not None:
            if name in ours:
                produced[name] = module.transform(name, value, tuple(ours[name].shape), sources[name], plan)
            continue
        kind = head_kind(layout, name)
        if kind is not None:
            produced[name] = value.index_select(0, head_rows(kind, value.shape[0], categories, sources[name]))
        elif _RESHAPED.fullmatch(name) and name in ours and value.numel() == ours[name].numel():
            produced[name] = value.reshape(ours[name].shape)
    for name in _DATASET_BUFFERS:
        if name in ours and name not in produced:
            produced[name], sources[name] = ours[name].clone(), ""
    problems = _key_problems(produced, ours, strict, vtpack.required(model) if layout.backbone_only else set())
    if problems:
        hint = (" (a classification backbone: train a detector from it with model.backbone.pretrained or "
                "model.weights)") if layout.backbone_only else ""
        raise ConversionError(f"{source}: {layout.describe()} does not fit the config's model: "
                              f"{'; '.join(problems)} {its_config}{hint}")
    return Converted(produced, sources, aliases, layout, categories)
