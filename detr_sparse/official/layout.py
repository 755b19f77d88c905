"""Which authors' model a state dict holds, told from its keys: the repository (format), the
variant (backbone, box refinement, two-stage, ... ; a ViT's width, depth and gates), and the
project config that builds the same model."""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from . import names, svit, vtpack
from .errors import ConversionError

FORMATS = {  # format -> the authors' repository
    "detr": "facebookresearch/detr",
    "pnp_detr": "twangnh/pnp-detr",
    "deformable_detr": "fundamentalvision/Deformable-DETR",
    "sparse_detr": "kakaobrain/sparse-detr",
    "vtpack": "StevenGrove/vtpack",  # DGE DeiT classification weights: a backbone (vtpack.py)
    "svit_mmdet": "uzh-rpg/svit",  # mmdet ViT-Adapter / SViT-Adapter Mask R-CNN (svit.py)
}
_VIT_FORMATS = ("vtpack", "svit_mmdet")
_BODY = "backbone.0.body."  # the backbone's weights in every one of these repositories


@dataclass(frozen=True)
class Layout:
    """An authors' state dict: format (a FORMATS key) and what its keys show of the model."""

    format: str
    backbone: str = "resnet"  # or "swin", "deit" (the ViT formats)
    panoptic: bool = False  # DETR's segmentation branch (keys under `detr.`, the mask head)
    dec_layers: int = 6
    box_refine: bool = False
    two_stage: bool = False
    query_init: str = "embedding"  # "memory": the encoder token is the query (--eff_query_init)
    scoring: bool = False  # Sparse DETR's scoring network (trained with rho > 0)
    num_coarse: int = 0  # PnP-DETR's pooled tokens
    width: int = 0  # the ViT formats: the DeiT's width, its blocks, SViT's gates
    depth: int = 0
    gates: int = 0

    @property
    def backbone_only(self) -> bool:
        """A classification backbone's weights, not a detector's."""
        return self.format == "vtpack"

    @property
    def heads(self) -> int:
        """Class / box heads before Sparse DETR's encoder auxiliary ones."""
        return self.dec_layers + int(self.two_stage)

    def describe(self) -> str:
        """e.g. 'fundamentalvision/Deformable-DETR (ResNet, box refinement, two-stage)'."""
        if self.format == "vtpack":
            return f"{FORMATS[self.format]} ({vtpack.describe(self.width)})"
        if self.format == "svit_mmdet":
            return f"{FORMATS[self.format]} ({svit.describe(self.width, self.gates)})"
        parts = ["Swin" if self.backbone == "swin" else "ResNet"]
        parts += [name for name, on in (("panoptic", self.panoptic), ("box refinement", self.box_refine),
                                        ("two-stage", self.two_stage), ("scoring network", self.scoring))
                  if on]
        if self.query_init == "memory":
            parts.append("memory-initialised queries")
        return f"{FORMATS[self.format]} ({', '.join(parts)})"

    def our_name(self, key: str) -> str | None:
        """This project's key for an official one, None when unknown (aliases excluded); a
        backbone-only format's are the backbone's own (no `backbone.` prefix)."""
        if self.format == "vtpack":
            return vtpack.our_name(key)
        if self.format == "svit_mmdet":
            return svit.our_name(key, self.depth)
        if self.panoptic:
            if not key.startswith("detr."):
                return names.segmentation_name(key)
            key = key.removeprefix("detr.")
        if key.startswith(_BODY):
            rest = key.removeprefix(_BODY)
            return names.swin_name(rest) if self.backbone == "swin" else names.resnet_name(rest)
        if self.format in ("detr", "pnp_detr"):
            return names.detr_name(key)
        return names.deformable_name(key, self.heads)

    def alias_of(self, key: str) -> str | None:
        """The official key whose tensor `key` repeats (a module held twice), or None."""
        return names.deformable_alias(key, self.heads) if self.format in ("deformable_detr", "sparse_detr") else None

    def unused(self, key: str) -> bool:
        """Entries without a counterpart that the conversion drops: the DETR family's frozen
        batch norm counters (the authors' own loading drops them), a classifier's parts."""
        if self.format == "vtpack":
            return vtpack.unused(key)
        if self.format == "svit_mmdet":
            return svit.unused(key)
        return key.endswith(".num_batches_tracked")

    def config(self, dilation: bool | None = None) -> str:
        """The project config (in configs/) of the same model. `dilation` (DC5) cannot be
        told from the keys: from the checkpoint's args when it has them."""
        if self.format == "vtpack":
            return vtpack.config(self.width)
        if self.format == "svit_mmdet":
            return svit.config(self.width, self.gates)
        backbone = "swin" if self.backbone == "swin" else "r50"
        if self.format == "detr":
            return "detr_r50_panoptic.yaml" if self.panoptic else f"detr_r50{'_dc5' if dilation else ''}.yaml"
        if self.format == "pnp_detr":  # the official code pools 100 tokens for DC5, 30 for C5
            dc5 = dilation if dilation is not None else self.num_coarse == 100
            return f"pnp_detr_r50{'_dc5' if dc5 else ''}.yaml"
        if self.format == "sparse_detr":
            return f"sparse_detr_{backbone}.yaml" if self.scoring else f"deformable_detr_plus_{backbone}.yaml"
        if self.two_stage:
            return "deformable_detr_two_stage_r50.yaml"
        return "deformable_detr_refine_r50.yaml" if self.box_refine else "deformable_detr_r50.yaml"


def official_family(state_dict: dict) -> str | None:
    """"vtpack" or "svit_mmdet" for those formats' keys (DGE routers `blocks.i.dge.router.*`;
    mmdet's `backbone.interactions.*` with `roi_head.*`), "detr" for the DETR family's backbone
    naming (`backbone.0.body.*`), None for another state dict (no project checkpoint has these)."""
    keys = [k for k in state_dict if isinstance(k, str)]
    if any(vtpack.ROUTER.fullmatch(k) for k in keys):
        return "vtpack"
    if any(svit.INTERACTIONS.match(k) for k in keys) and any(k.startswith("roi_head.") for k in keys):
        return "svit_mmdet"
    return "detr" if any(k.removeprefix("detr.").startswith(_BODY) for k in keys) else None


def is_official(state_dict: dict) -> bool:
    """Whether a state dict has one of the authors' namings (no project checkpoint does)."""
    return official_family(state_dict) is not None


def detect_layout(state_dict: dict[str, Tensor], fmt: str | None = None, source: str = "checkpoint") -> Layout:
    """The Layout of an authors' state dict; fmt (a FORMATS key) names the format instead
    of telling it from the keys (within the DETR family). ConversionError when it is not one."""
    family = official_family(state_dict)
    if family is None:
        raise ConversionError(f"{source}: not an authors' checkpoint of {sorted(FORMATS.values())} (no "
                              f"'{_BODY}*' backbone keys, DGE routers 'blocks.i.dge.router.*' or mmdet "
                              "'backbone.interactions.*' with 'roi_head.*')")
    if fmt is not None and fmt not in FORMATS:
        raise ConversionError(f"{source}: unknown format '{fmt}' (known: {sorted(FORMATS)})")
    if family in _VIT_FORMATS or fmt in _VIT_FORMATS:
        if fmt is not None and fmt != family:
            theirs = FORMATS[family] if family in _VIT_FORMATS else "the DETR family"
            raise ConversionError(f"{source}: --format {fmt}, but its keys are {theirs}'s")
        return Layout(format=family, **(vtpack if family == "vtpack" else svit).facts(state_dict))
    panoptic = any(k.startswith("detr.") for k in state_dict)
    sd = {k.removeprefix("detr."): v for k, v in state_dict.items()} if panoptic else state_dict
    keys = set(sd)
    pos_trans = sd.get("transformer.pos_trans.weight")
    memory = pos_trans is not None and pos_trans.shape[0] * 2 == pos_trans.shape[1]
    if fmt is None:
        fmt = "pnp_detr" if any(k.startswith("transformer.sampler.") for k in keys) else "detr"
        if "transformer.level_embed" in keys:
            sparse = memory or any(k.startswith(("transformer.enc_mask_predictor.",
                                                 "transformer.encoder.class_embed.")) for k in keys)
            fmt = "sparse_detr" if sparse else "deformable_detr"
    layers = {int(m[1]) for k in keys if (m := re.match(r"transformer\.decoder\.layers\.(\d+)\.", k))}
    k_proj = sd.get("transformer.sampler.k_proj.weight")
    return Layout(
        format=fmt, panoptic=panoptic, dec_layers=len(layers),
        backbone="swin" if f"{_BODY}patch_embed.proj.weight" in keys else "resnet",
        box_refine=any(k.startswith("transformer.decoder.bbox_embed.") for k in keys),
        two_stage="transformer.enc_output.weight" in keys,
        query_init="memory" if memory else "embedding",
        scoring=any(k.startswith("transformer.enc_mask_predictor.") for k in keys),
        num_coarse=0 if k_proj is None else k_proj.shape[0])
