"""The names every backbone gives its maps, and the check of what a config asks for."""
from __future__ import annotations

LEVEL_NAMES = ["res2", "res3", "res4", "res5"]  # strides 4, 8, 16, 32


def check_out_features(out_features) -> None:
    """ValueError when an output is not one of LEVEL_NAMES."""
    unknown = set(out_features) - set(LEVEL_NAMES)
    if unknown:
        raise ValueError(f"backbone out_features {sorted(unknown)} not in {LEVEL_NAMES}")


def check_backbone_args(name: str, known, out_features) -> None:
    """ValueError naming the config key when `name` is not one of `known` or an output is
    not one of LEVEL_NAMES."""
    if name not in known:
        raise ValueError(f"model.backbone.name: '{name}' is not one of {list(known)}")
    check_out_features(out_features)


def checked_freeze_at(freeze_at: int, last: int) -> int:
    """freeze_at (-1 = 0) for a backbone whose patch embedding and stages 0..last are built:
    ValueError naming the key when it asks to freeze more than that."""
    freeze_at = max(freeze_at, 0)
    if freeze_at > last + 2:
        raise ValueError(f"model.backbone.freeze_at: {freeze_at} is more than the patch "
                         f"embedding and the {last + 1} stages this backbone builds")
    return freeze_at
