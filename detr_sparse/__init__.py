"""detr_sparse: DETR-family detectors and their token-sparse variants; `Predictor`: inference
on any images (detr_sparse/predictor.py)."""


def __getattr__(name: str):
    # imported on first use: the predictor needs the engine and datasets, which import this package
    if name == "Predictor":
        from .predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'detr_sparse' has no attribute {name!r}")


def build_model(model_cfg, num_classes: int, is_thing: list[bool] | None = None):
    """The detector named by `model_cfg.name`, for `num_classes` object classes; is_thing:
    which labels are things (panoptic datasets), for model.panoptic."""
    from .deformable_detr import build_deformable_detr, build_deformable_detr_plus
    from .detr import build_detr
    from .mask_rcnn import build_mask_rcnn
    from .panoptic_fpn import build_panoptic_fpn
    from .pnp_detr import build_pnp_detr
    from .sparse_detr import build_sparse_detr

    builders = {"detr": build_detr, "deformable_detr": build_deformable_detr,
                "deformable_detr_plus": build_deformable_detr_plus, "sparse_detr": build_sparse_detr,
                "pnp_detr": build_pnp_detr, "mask_rcnn": build_mask_rcnn,
                "panoptic_fpn": build_panoptic_fpn}
    if model_cfg.name not in builders:
        raise ValueError(f"model.name: unknown model '{model_cfg.name}' (known: {sorted(builders)})")
    if model_cfg.name in ("detr", "pnp_detr", "panoptic_fpn"):
        return builders[model_cfg.name](model_cfg, num_classes, is_thing)
    if model_cfg.panoptic.enabled:
        raise ValueError(f"model.panoptic: DETR's panoptic branch is built for detr and pnp_detr, "
                         f"not {model_cfg.name}")
    return builders[model_cfg.name](model_cfg, num_classes)
