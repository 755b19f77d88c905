"""StevenGrove/vtpack's DGE DeiT classification checkpoints (`deit_dge_s124_{tiny,small}_patch16_256`:
DeiT-Ti / S at 256 px, a DGE router on every block) -> this project's DGE DeiT backbone
(backbones/dge.py, `deit_{t,s}_dge`): the ViT and its routers. A backbone, not a detector: the
detection pyramid and heads start fresh, as from any classification checkpoint.

Their layout against ours:
- A block projects its queries (`attn.q`, C rows) and its keys and values (`attn.kv`, 2C rows:
  keys, then values) apart; ours is torchvision's fused `in_proj` (q, k, v rows): the two are
  concatenated, q first.
- The router (`dge.router.gate`: Linear(C, 3) on the 4 x 4 region means of the raw patch tokens,
  option 0 the finest, 16 queries a region) computes what ours does (`router.gate`, sparsity/dge.py).
  The split sizes they store (`dge.splits`, a frozen parameter) must be ours, (4, 2, 1); they are
  checked and not kept.
- Their class token (a query and a key in every block), final norm and classifier are dropped:
  the project's ViTs read the patch map only; the position embedding loses the class token's row
  and its 16 x 16 grid is resampled to the backbone's (vit.py).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from .errors import ConversionError
from .vit import CLASSIFIER, block_name, deit_size, patch_positions

SPLITS = (4, 2, 1)  # the project's DGE options (sparsity/dge.py), finest first
ROUTER = re.compile(r"blocks\.\d+\.dge\.router\.gate\.weight")  # what tells the format
_QUERY = re.compile(r"blocks\.(\d+)\.attn\.q\.(weight|bias)")


def facts(state_dict: dict[str, Tensor]) -> dict:
    """What the keys show: the ViT's width and depth."""
    blocks = {int(m[1]) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    proj = state_dict.get("patch_embed.proj.weight")
    return {"backbone": "deit", "width": 0 if proj is None else proj.shape[0], "depth": len(blocks)}


def describe(width: int) -> str:
    return f"DeiT-{deit_size(width)} with DGE, classification"


def config(width: int) -> str:
    """The project config whose backbone this is (Ti: its own, S and others: DeiT-S's)."""
    return "mask_rcnn_deit_t_dge.yaml" if width == 192 else "mask_rcnn_deit_s_dge.yaml"


def unused(key: str) -> bool:
    """The classifier parts and the split sizes (checked by `merged`)."""
    return bool(CLASSIFIER.fullmatch(key)) or bool(re.fullmatch(r"blocks\.\d+\.dge\.splits", key))


def merged(state_dict: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict with each block's `attn.q` and `attn.kv` fused into `attn.qkv` (q rows
    first), and the official keys of each fused one ("q+kv"). ConversionError for a kv without
    its q (or the reverse) and for split sizes that are not ours."""
    out, sources = dict(state_dict), {}
    bad = [f"{k} {v.tolist()}" for k, v in state_dict.items()
           if re.fullmatch(r"blocks\.\d+\.dge\.splits", k) and tuple(v.tolist()) != SPLITS]
    if bad:
        raise ConversionError(f"{source}: DGE split sizes {bad[:3]}: this project's DGE has {list(SPLITS)} "
                              "(16 / 4 / 1 queries a 4 x 4 region)")
    for key in [k for k in state_dict if _QUERY.fullmatch(k)]:
        kv = key.replace(".attn.q.", ".attn.kv.")
        if kv not in state_dict:
            raise ConversionError(f"{source}: {key} without {kv} (their DGE attention has both)")
        fused = key.replace(".attn.q.", ".attn.qkv.")
        out[fused] = torch.cat([out.pop(key), out.pop(kv)])
        sources[fused] = f"{key}+{kv}"
    orphans = [k for k in out if re.fullmatch(r"blocks\.\d+\.attn\.kv\.(weight|bias)", k)]
    if orphans:
        raise ConversionError(f"{source}: {orphans[:3]} without their attn.q")
    return out, sources


def our_name(key: str) -> str | None:
    """Our name (within the backbone) of an official key (after `merged`), None when unknown."""
    if key == "pos_embed":
        return "pos_embedding"
    if key.startswith("patch_embed.proj."):
        return key.replace("patch_embed.proj.", "conv_proj.")
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if match is None:
        return None
    if match[2].startswith("dge.router.gate."):
        rest = match[2].removeprefix("dge.")
    else:
        rest = block_name(match[2])
    return None if rest is None else f"layers.encoder_layer_{match[1]}.{rest}"


def transform(name: str, value: Tensor, shape: tuple[int, ...], key: str, plan: dict) -> Tensor:
    """The value of our key `name` (shape: the model's) from the official tensor `key`."""
    return patch_positions(value, shape, key) if name.endswith("pos_embedding") else value


def target(model) -> tuple:
    """(the DGE DeiT the weights go to, our keys' prefix): the model itself, or a detector's
    backbone ("backbone.")."""
    from ..backbones.dge import DGEViTBackbone

    return (model, "") if isinstance(model, DGEViTBackbone) else (getattr(model, "backbone", None), "backbone.")


def required(model) -> set[str]:
    """The model's keys the checkpoint must give: its DGE DeiT's ViT and routers (not the
    detection pyramid, which no classification checkpoint has)."""
    backbone, prefix = target(model)
    return {prefix + k for k in backbone.state_dict() if backbone.learnt_in_pretraining(k)}


def problems(layout, model) -> list[str]:
    """How the model's backbone differs from the checkpoint's DeiT beyond what its keys show."""
    from ..backbones.dge import DGEViTBackbone

    backbone, _ = target(model)
    name = f"model.backbone.name=deit_{deit_size(layout.width)[0].lower()}_dge"
    if not isinstance(backbone, DGEViTBackbone):
        return [f"the checkpoint is a DeiT with DGE routers, the config's backbone a {type(backbone).__name__} "
                f"({name})"]
    width, depth = backbone.conv_proj.out_channels, len(backbone.layers)
    if (width, depth) != (layout.width, layout.depth):
        return [f"the checkpoint's DeiT is {layout.width} wide with {layout.depth} blocks, the config's backbone "
                f"{width} wide with {depth} ({name})"]
    return []
