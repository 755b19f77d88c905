"""Datasets, transforms and evaluators; ``build_dataset`` and ``collate_fn`` are what the
engine uses."""
from __future__ import annotations

import os

from detr_sparse.image_batch import ImageBatch

from .coco import CocoDetection
from .coco_eval import CocoEvaluator
from .coco_panoptic import CocoPanoptic, build_panoptic_dataset
from .panoptic_eval import PanopticEvaluator
from .transforms import build_transforms

__all__ = ["CocoDetection", "CocoEvaluator", "CocoPanoptic", "PanopticEvaluator", "build_dataset",
           "build_panoptic_dataset", "build_transforms", "collate_fn"]


def build_dataset(data_cfg, split: str) -> CocoDetection:
    """The COCO dataset for ``split`` ("train" or "val") under ``data_cfg.root``.

    Fields read from ``data_cfg``: ``root``, ``train_split``, ``val_split``, ``masks``,
    ``skip_unreadable``, ``seed`` and the transform fields of ``build_transforms``."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if getattr(data_cfg, "panoptic", False):
        return build_panoptic_dataset(data_cfg, split)
    folder = data_cfg.train_split if split == "train" else data_cfg.val_split
    root = os.fspath(data_cfg.root)
    return CocoDetection(
        os.path.join(root, folder),
        os.path.join(root, "annotations", f"instances_{folder}.json"),
        transforms=build_transforms(split == "train", data_cfg),
        return_masks=bool(data_cfg.masks),
        skip_unreadable=bool(data_cfg.skip_unreadable),
        seed=int(data_cfg.seed),
    )


def collate_fn(batch: list) -> tuple[ImageBatch, list[dict]]:
    """Pads the images of a batch to its largest height and width (the mask marks the
    padding) and keeps the targets as a list, since every image has its own box count."""
    images, targets = zip(*batch)
    return ImageBatch.from_images(list(images), size_divisibility=1), list(targets)
