"""Which authors' model a state dict holds, told from its keys: the repository (format), the
variant (backbone, box refinement, two-stage, ...), and the project config that builds the
same model."""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from . import names

FORMATS = {  # format -> the authors' repository
    "detr": "facebookresearch/detr",
    "pnp_detr": "twangnh/pnp-detr",
    "deformable_detr": "fundamentalvision/Deformable-DETR",
    "sparse_detr": "kakaobrain/sparse-detr",
}
_BODY = "backbone.0.body."  # the backbone's weights in every one of these repositories


class ConversionError(ValueError):
    """An authors' checkpoint that cannot become the configured model (not one, a key or
    class layout that does not fit); the message is one line naming the file and keys."""


@dataclass(frozen=True)
class Layout:
    """An authors' state dict: format (a FORMATS key) and what its keys show of the model."""

    format: str
    backbone: str = "resnet"  # or "swin"
    panoptic: bool = False  # DETR's segmentation branch (keys under `detr.`, the mask head)
    dec_layers: int = 6
    box_refine: bool = False
    two_stage: bool = False
    query_init: str = "embedding"  # "memory": the encoder token is the query (--eff_query_init)
    scoring: bool = False  # Sparse DETR's scoring network (trained with rho > 0)
    num_coarse: int = 0  # PnP-DETR's pooled tokens

    @property
    def heads(self) -> int:
        """Class / box heads before Sparse DETR's encoder auxiliary ones."""
        return self.dec_layers + int(self.two_stage)

    def describe(self) -> str:
        """e.g. 'fundamentalvision/Deformable-DETR (ResNet, box refinement, two-stage)'."""
        parts = ["Swin" if self.backbone == "swin" else "ResNet"]
        parts += [name for name, on in (("panoptic", self.panoptic), ("box refinement", self.box_refine),
                                        ("two-stage", self.two_stage), ("scoring network", self.scoring))
                  if on]
        if self.query_init == "memory":
            parts.append("memory-initialised queries")
        return f"{FORMATS[self.format]} ({', '.join(parts)})"

    def our_name(self, key: str) -> str | None:
        """This project's key for an official one, None when unknown (aliases excluded)."""
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
        """Entries the authors' own loading drops (their frozen batch norm's counters)."""
        return key.endswith(".num_batches_tracked")

    def config(self, dilation: bool | None = None) -> str:
        """The project config (in configs/) of the same model. `dilation` (DC5) cannot be
        told from the keys: from the checkpoint's args when it has them."""
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


def is_official(state_dict: dict) -> bool:
    """Whether a state dict has the authors' backbone naming (no project checkpoint does)."""
    return any(isinstance(k, str) and k.removeprefix("detr.").startswith(_BODY) for k in state_dict)


def detect_layout(state_dict: dict[str, Tensor], fmt: str | None = None, source: str = "checkpoint") -> Layout:
    """The Layout of an authors' state dict; fmt (a FORMATS key) names the format instead
    of telling it from the keys. ConversionError when it is not one."""
    if not is_official(state_dict):
        raise ConversionError(f"{source}: not an authors' checkpoint of {sorted(FORMATS.values())} (no "
                              f"'{_BODY}*' backbone keys)")
    if fmt is not None and fmt not in FORMATS:
        raise ConversionError(f"{source}: unknown format '{fmt}' (known: {sorted(FORMATS)})")
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
