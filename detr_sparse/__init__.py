"""detr_sparse: DETR-family detectors and their token-sparse variants."""


def build_model(model_cfg, num_classes: int):
    """The detector named by `model_cfg.name`, for `num_classes` object classes."""
    from .deformable_detr import build_deformable_detr, build_deformable_detr_plus
    from .detr import build_detr
    from .pnp_detr import build_pnp_detr
    from .sparse_detr import build_sparse_detr

    builders = {"detr": build_detr, "deformable_detr": build_deformable_detr,
                "deformable_detr_plus": build_deformable_detr_plus, "sparse_detr": build_sparse_detr,
                "pnp_detr": build_pnp_detr}
    if model_cfg.name not in builders:
        raise ValueError(f"model.name: unknown model '{model_cfg.name}' (known: {sorted(builders)})")
    return builders[model_cfg.name](model_cfg, num_classes)
