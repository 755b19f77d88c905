"""The DETR augmentation recipe on torchvision.transforms.v2.

Every transform takes and returns ``(image, target)`` where ``image`` is a
``tv_tensors.Image`` and ``target`` a dict holding ``boxes`` (``tv_tensors.BoundingBoxes``),
``labels`` and optionally ``masks`` (``tv_tensors.Mask``, (N, H, W)), ``iscrowd`` and
``area``. v2 dispatches on those types, so geometry moves image, boxes and masks together;
plain tensors such as ``labels`` or ``orig_size`` pass through untouched.
"""
from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Target entries that hold one row per box and must be filtered with the boxes. Masks are
# not listed: SanitizeBoundingBoxes filters tv_tensors.Mask of matching length by itself.
PER_BOX_KEYS = ("labels", "iscrowd", "area")


def per_box_fields(inputs: Any) -> tuple[torch.Tensor, ...]:
    """labels_getter for SanitizeBoundingBoxes: every per-box tensor of the target.

    A module-level function rather than a lambda so the dataset can be pickled into
    DataLoader worker processes."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    return tuple(target[k] for k in PER_BOX_KEYS if k in target)


class RandomSizeCrop(v2.Transform):
    """Crop a window whose height and width are drawn uniformly from [min_size, max_size].

    torchvision has no crop of random size with independent sides (RandomResizedCrop also
    resizes, RandomCrop has a fixed size), so this is the one hand-written geometry step.
    Both bounds are clipped to the image, so a small image is left whole rather than padded.
    The crop itself is v2.functional.crop, which shifts and clamps the boxes and slices the
    masks with the same window; boxes left outside become empty and are removed later by
    SanitizeBoundingBoxes.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if min_size < 1 or max_size < min_size:
            raise ValueError(f"RandomSizeCrop needs 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    def _draw(self, low: int, high: int) -> int:
        # torch RNG (not python random) so the dataset's forked, seeded RNG governs it.
        return int(torch.randint(low, high + 1, ()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        img_h, img_w = v2.query_size(flat_inputs)
        h = self._draw(min(self.min_size, img_h), min(self.max_size, img_h))
        w = self._draw(min(self.min_size, img_w), min(self.max_size, img_w))
        top = self._draw(0, img_h - h)
        left = self._draw(0, img_w - w)
        return dict(top=top, left=left, height=h, width=w)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def _finish() -> list[v2.Transform]:
    # scale=True maps uint8 [0, 255] to float [0, 1]; a dtype (not a dict) converts only
    # images, so uint8 masks stay uint8.
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def build_transforms(train: bool, data_cfg) -> v2.Compose:
    """The DETR training or evaluation transform.

    Fields read from ``data_cfg``: train: ``flip_prob``, ``train_scales``, ``max_size``,
    ``random_crop``, ``crop_resize_scales``, ``crop_size`` ([min, max] side of the crop);
    eval: ``val_size``, ``max_size``.
    """
    max_size = int(data_cfg.max_size)
    if not train:
        val_size = int(data_cfg.val_size)
        # v2.Resize rejects max_size <= size; then the longer-side cap decides alone, which is
        # exactly what size=None with max_size does.
        resize = v2.Resize(val_size, max_size=max_size) if val_size < max_size else v2.Resize(None, max_size=max_size)
        return v2.Compose([resize, *_finish()])

    scales = [int(s) for s in data_cfg.train_scales]
    resize = v2.RandomShortestSize(scales, max_size=max_size)
    if data_cfg.random_crop:
        crop_min, crop_max = (int(s) for s in data_cfg.crop_size)
        geometry = v2.RandomChoice([
            resize,
            v2.Compose([
                # As in DETR, the pre-crop resize has no max_size: the crop bounds the size.
                v2.RandomShortestSize([int(s) for s in data_cfg.crop_resize_scales]),
                RandomSizeCrop(crop_min, crop_max),
                resize,
            ]),
        ])
    else:
        geometry = resize
    return v2.Compose([
        v2.RandomHorizontalFlip(p=float(data_cfg.flip_prob)),
        geometry,
        # Crops and resizes can leave boxes with no extent; they would give the matcher
        # targets with zero area (and NaN in GIoU), so drop them with their labels and masks.
        # resizing can leave an edge-touching box a float epsilon past the image, which the
        # sanitiser would drop with its mask and label
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(labels_getter=per_box_fields),
        *_finish(),
    ])


def box_area_or_mask_area(target: dict) -> torch.Tensor:
    """Per-instance area in the transformed image: mask pixel count when masks are present
    (COCO's own notion of area for instances), else box area."""
    masks = target.get("masks")
    if masks is not None:
        return masks.flatten(1).sum(1).to(torch.float32)
    boxes = target["boxes"].as_subclass(torch.Tensor)
    return ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).to(torch.float32)


def to_plain_tensors(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Strip tv_tensor subclasses so models and losses see ordinary tensors, add the final
    ``size`` and recompute ``area`` for the transformed geometry."""
    if image.dtype == torch.uint8:
        image = F.to_dtype(image, torch.float32, scale=True)
    image = image.as_subclass(torch.Tensor)
    out = {}
    for key, value in target.items():
        out[key] = value.as_subclass(torch.Tensor) if isinstance(value, tv_tensors.TVTensor) else value
    out["boxes"] = out["boxes"].to(torch.float32)
    out["area"] = box_area_or_mask_area(out)
    out["size"] = torch.tensor(image.shape[-2:], dtype=torch.int64)
    return image, out
