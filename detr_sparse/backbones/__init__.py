"""Backbones: each returns an ordered dict of named NCHW maps and states, for each name,
its channels and stride (`output_shape()`)."""
from .dge import DGEPVTBackbone, DGEViTBackbone
from .resnet import ResNetBackbone
from .spt import SPTBackbone
from .pvt import PVTBackbone
from .svit import SViTAdapterBackbone, SViTBackbone
from .swin import SwinBackbone
from .vit import ViTBackbone
from .vit_adapter import ViTAdapterBackbone


def build_backbone(cfg, out_features: tuple[str, ...]):
    if cfg.name.startswith("resnet"):
        return ResNetBackbone(cfg.name, cfg.norm, cfg.dilation, out_features, cfg.pretrained,
                              cfg.channels_last, cfg.freeze_at)
    if cfg.name.startswith("spt"):
        if cfg.dilation:
            raise ValueError("model.backbone.dilation: not supported by spt")
        t = cfg.spt
        return SPTBackbone(cfg.name, out_features, cfg.pretrained, cfg.freeze_at, cfg.drop_path_rate,
                           select_weight=t.select_weight, threshold=t.threshold, tau=t.tau, region_mask=t.region_mask,
                           label_from=t.label_from, attention=t.attention, align_images_eval=t.align_images_eval,
                           gate_per=t.gate_per)
    if cfg.name.startswith("swin"):
        # norm and channels_last are ResNet settings and are ignored; dilation would change
        # the strides the rest of the model was configured for, so it is refused
        if cfg.dilation:
            raise ValueError("model.backbone.dilation: not supported by swin")
        return SwinBackbone(cfg.name, out_features, cfg.pretrained, cfg.freeze_at,
                            cfg.drop_path_rate)
    if cfg.name.startswith(("deit", "vit", "pvt")):
        # as for swin: norm and channels_last are ignored, dilation is refused
        if cfg.dilation:
            raise ValueError(f"model.backbone.dilation: not supported by {cfg.name}")
        if cfg.name.endswith("_dge"):
            d = cfg.dge
            dge = {"budget": d.budget, "budget_weight": d.budget_weight, "budget_scope": d.budget_scope,
                   "sparse_train": d.sparse_train}
            if cfg.name.startswith("pvt"):
                return DGEPVTBackbone(cfg.name, out_features, cfg.pretrained, cfg.drop_path_rate, cfg.freeze_at,
                                      **dge)
            return DGEViTBackbone(cfg.name, out_features, cfg.pretrained, cfg.drop_path_rate,
                                  freeze_at=cfg.freeze_at, **dge)
        if cfg.name.endswith("_svit"):
            s = cfg.svit
            svit = {"ratio_weight": s.ratio_weight, "per_image": s.per_image, "stochastic_eval": s.stochastic_eval,
                    "eval_at_targets": s.eval_at_targets}
            if cfg.name.endswith("_adapter_svit"):
                return SViTAdapterBackbone(cfg.name, out_features, cfg.pretrained, cfg.drop_path_rate, cfg.freeze_at,
                                           **svit)
            return SViTBackbone(cfg.name, out_features, cfg.pretrained, cfg.drop_path_rate, freeze_at=cfg.freeze_at,
                                **svit)
        if cfg.name.endswith("_adapter"):
            return ViTAdapterBackbone(cfg.name, out_features, cfg.pretrained, cfg.drop_path_rate, cfg.freeze_at)
        if cfg.name.startswith("pvt"):
            return PVTBackbone(cfg.name, out_features, cfg.pretrained, cfg.drop_path_rate,
                               cfg.freeze_at)
        return ViTBackbone(cfg.name, out_features, cfg.pretrained, cfg.drop_path_rate,
                           freeze_at=cfg.freeze_at)
    raise ValueError(f"model.backbone.name: unknown backbone '{cfg.name}'")
