"""Datasets, transforms and evaluators; ``build_dataset`` and ``collate_fn`` are what the
engine uses."""
from __future__ import annotations

import logging
import os

from detr_sparse.image_batch import ImageBatch
from engine.config import ConfigError

from .coco import CocoDetection
from .coco_eval import CocoEvaluator
from .coco_panoptic import CocoPanoptic, build_panoptic_dataset
from .panoptic_eval import PanopticEvaluator
from .transforms import build_transforms

__all__ = ["CocoDetection", "CocoEvaluator", "CocoPanoptic", "PanopticEvaluator", "build_dataset",
           "build_panoptic_dataset", "build_transforms", "check_same_categories", "collate_fn", "split_files"]

logger = logging.getLogger("detr_sparse.data")


def split_files(data_cfg, split: str) -> tuple[str, str, bool]:
    """(image folder, annotation file, custom) of ``split`` ("train" or "val"): the split's
    ``data.<split>_images`` and ``data.<split>_annotations`` when given (custom: both must be;
    ConfigError naming the missing key), else ``data.root``'s COCO layout. Not checked to
    exist here (``build_dataset`` does)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    images, annotations = (str(getattr(data_cfg, f"{split}_{k}", "") or "") for k in ("images", "annotations"))
    if not images and not annotations:
        folder = data_cfg.train_split if split == "train" else data_cfg.val_split
        kind = "panoptic" if getattr(data_cfg, "panoptic", False) else "instances"
        root = os.fspath(data_cfg.root)
        return os.path.join(root, folder), os.path.join(root, "annotations", f"{kind}_{folder}.json"), False
    for key, value in (("images", images), ("annotations", annotations)):
        if not value:
            other = "annotations" if key == "images" else "images"
            raise ConfigError(f"data.{split}_{key} is not set but data.{split}_{other} is: give both "
                              f"(or neither, for data.root's COCO layout)")
    return images, annotations, True


def build_dataset(data_cfg, split: str) -> CocoDetection:
    """The COCO dataset for ``split`` ("train" or "val"): ``split_files``' folder and file.

    Fields read from ``data_cfg``: ``root``, ``train_split``, ``val_split``, the
    ``<split>_images`` / ``<split>_annotations`` pair, ``masks``, ``panoptic``,
    ``skip_unreadable``, ``seed`` and the transform fields of ``build_transforms``. A custom
    split's malformed file or missing images end in a ConfigError naming the key and file."""
    images, annotations, custom = split_files(data_cfg, split)
    transforms = build_transforms(split == "train", data_cfg)
    common = dict(skip_unreadable=bool(data_cfg.skip_unreadable), seed=int(data_cfg.seed))
    if not custom:
        if getattr(data_cfg, "panoptic", False):
            return build_panoptic_dataset(data_cfg, split)
        return CocoDetection(images, annotations, transforms=transforms, return_masks=bool(data_cfg.masks), **common)
    if not os.path.isdir(images):
        raise ConfigError(f"data.{split}_images: image folder not found: {images}")
    if not os.path.isfile(annotations):
        raise ConfigError(f"data.{split}_annotations: annotation file not found: {annotations}")
    try:
        if getattr(data_cfg, "panoptic", False):
            png_folder = os.path.splitext(annotations)[0]
            if not os.path.isdir(png_folder):
                raise ConfigError(f"data.{split}_annotations: the panoptic PNG folder {png_folder} (the "
                                  f"file's path without .json) is missing")
            dataset = CocoPanoptic(os.path.dirname(annotations), split, transforms, img_folder=images,
                                   ann_file=annotations, png_folder=png_folder, return_panoptic=split == "val",
                                   **common)
        else:
            dataset = CocoDetection(images, annotations, transforms=transforms, return_masks=bool(data_cfg.masks),
                                    **common)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as e:  # a malformed file (the dataset's errors name it)
        reason = e if isinstance(e, ValueError) else f"{annotations} is malformed ({type(e).__name__}: {e})"
        raise ConfigError(f"data.{split}_annotations: {reason}") from e
    _check_images(dataset, f"data.{split}_images", f"data.{split}_annotations")
    return dataset


def _check_images(dataset, images_key: str, annotations_key: str) -> None:
    """Every image the annotation file lists is in the folder (a file name relative to
    another folder is the usual slip); with skip_unreadable a warning only."""
    missing = [dataset.image_path(i) for i in range(len(dataset)) if not os.path.isfile(dataset.image_path(i))]
    if not missing:
        return
    message = (f"{images_key} {dataset.img_folder} lacks {len(missing)} of the {len(dataset)} images "
               f"{annotations_key} {dataset.ann_file} lists, e.g. {missing[0]}")
    if not dataset.skip_unreadable:
        raise ConfigError(message)
    logger.warning("%s (data.skip_unreadable: skipped)", message)


def check_same_categories(train_set, val_set) -> None:
    """Both splits must share one category list: a label means one class in training and
    evaluation. ConfigError naming both annotation files otherwise."""
    if train_set.cat_ids != val_set.cat_ids:
        raise ConfigError(f"the training annotations {train_set.ann_file} have category ids {train_set.cat_ids[:10]}"
                          f"{' ...' if len(train_set.cat_ids) > 10 else ''} but the val annotations "
                          f"{val_set.ann_file} have {val_set.cat_ids[:10]}{' ...' if len(val_set.cat_ids) > 10 else ''}"
                          ": both splits need the same categories")


def collate_fn(batch: list) -> tuple[ImageBatch, list[dict]]:
    """Pads the images of a batch to its largest height and width (the mask marks the
    padding) and keeps the targets as a list, since every image has its own box count."""
    images, targets = zip(*batch)
    return ImageBatch.from_images(list(images), size_divisibility=1), list(targets)
