"""Backbones: each returns an ordered dict of named NCHW maps and states, for each name,
its channels and stride (`output_shape()`)."""
from .resnet import ResNetBackbone


def build_backbone(cfg, out_features: tuple[str, ...]):
    if cfg.name.startswith("resnet"):
        return ResNetBackbone(cfg.name, cfg.norm, cfg.dilation, out_features, cfg.pretrained,
                              cfg.channels_last, cfg.freeze_at)
    raise ValueError(f"model.backbone.name: unknown backbone '{cfg.name}'")
