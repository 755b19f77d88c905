"""COCO panoptic segmentation dataset.

Layout (what ``datasets.synthetic`` writes, and COCO's own once the PNG zip is unpacked)::

    <root>/<split>/                          the images (e.g. val2017/000000000139.jpg)
    <root>/annotations/panoptic_<split>.json the segments of every image
    <root>/annotations/panoptic_<split>/     one PNG per image (also accepted: <root>/panoptic_<split>/)

A PNG pixel holds the id of its segment as id = R + 256 * G + 256**2 * B; id 0 is VOID
(unlabelled). Each image's ``segments_info`` lists its segments: id, category_id, iscrowd
(and area, bbox, which are not trusted: masks and boxes are computed from the PNG).

Labels are contiguous over ALL categories, things and stuff alike: label i is the i-th
category of the file in increasing category id (so on COCO and on the synthetic set the
things come first, then the stuff). ``label_to_cat_id[i]`` is its category id,
``cat_names[i]`` its name and ``is_thing[i]`` whether it is a thing.

Every segment of an image becomes one target row, crowd segments included (flagged by
``iscrowd``), so the masks of a target tile the labelled part of the image.
"""
from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from .coco import CocoDetection
from .transforms import build_transforms, to_plain_tensors

PANOPTIC_LAYOUT = (
    "expected the COCO panoptic layout: <root>/<split>/ holding the images, "
    "<root>/annotations/panoptic_<split>.json and the PNG folder "
    "<root>/annotations/panoptic_<split>/ (or <root>/panoptic_<split>/)"
)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 panoptic PNG pixels -> (H, W) int64 segment ids (R + 256 G + 256^2 B)."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids (< 256^3) -> (H, W, 3) uint8 pixels, the inverse of ``rgb_to_id``."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256) % 256], axis=-1).astype(np.uint8)


def masks_to_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) non-empty masks -> (N, 4) float32 absolute xyxy boxes around their pixels.

    torchvision's masks_to_boxes gives the index of the last pixel as x2 / y2; one is added
    so the box covers whole pixels, as COCO's [x, y, w, h] (w = pixel extent) does. A mask
    of one pixel then has a 1x1 box rather than an empty one."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    boxes = masks_to_boxes(masks.to(torch.bool)).to(torch.float32)
    return boxes + torch.tensor([0.0, 0.0, 1.0, 1.0])


def find_png_folder(root: str, split: str) -> str:
    """The panoptic PNG folder of ``split``: <root>/annotations/panoptic_<split>/ (what the
    synthetic generator writes and where COCO's zip unpacks when extracted in place) or
    <root>/panoptic_<split>/."""
    candidates = [os.path.join(root, "annotations", f"panoptic_{split}"), os.path.join(root, f"panoptic_{split}")]
    for folder in candidates:
        if os.path.isdir(folder):
            return folder
    raise FileNotFoundError(
        f"panoptic PNG folder not found: neither {candidates[0]} nor {candidates[1]} exists ({PANOPTIC_LAYOUT})"
    )


class CocoPanoptic(CocoDetection):
    """COCO panoptic images with DETR-style targets.

    ``dataset[idx]`` returns ``(image, target)``: image is a float tensor (3, H, W),
    normalised by the transforms exactly as ``CocoDetection`` does (plain [0, 1] without
    transforms). target holds, one row per segment:

    - ``masks`` (N, H, W) bool, non-overlapping, in the returned image;
    - ``labels`` (N,) int64 contiguous over things and stuff (see the module docstring);
    - ``boxes`` (N, 4) float32 absolute xyxy around each mask (``masks_to_xyxy``);
    - ``iscrowd`` (N,) int64, ``area`` (N,) float32 mask pixel counts,
      ``segment_ids`` (N,) int64 the PNG id of each row;
    - ``image_id`` (int), ``file_name`` (str, the image file), ``orig_size`` and ``size``
      ([h, w] int64 before and after the transforms);
    - with ``return_panoptic`` (for ``PanopticEvaluator``): ``panoptic`` (H0, W0) int64 the
      PNG's id map at the original size and ``segments`` the image's segments as a list of
      {"id", "category_id", "iscrowd"} dicts, straight from the JSON.

    Segments that have no pixel left after the transforms (or none in the PNG) get no row.
    Image loading, ``skip_unreadable`` (an unreadable image or PNG), ``set_epoch`` and the
    (seed, epoch, idx)-determined augmentation are those of ``CocoDetection``.
    """

    def __init__(
        self,
        root: str,
        split: str,
        transforms=None,
        *,
        img_folder: str | None = None,
        ann_file: str | None = None,
        png_folder: str | None = None,
        return_panoptic: bool = False,
        skip_unreadable: bool = False,
        seed: int = 0,
    ) -> None:
        # CocoDetection.__init__ is not called: it reads an instances file. The attributes
        # its loading, skipping and augmentation code uses are set here instead.
        root = os.fspath(root)
        self.root = root
        self.split = split
        self.img_folder = os.fspath(img_folder) if img_folder is not None else os.path.join(root, split)
        self.ann_file = (
            os.fspath(ann_file) if ann_file is not None else os.path.join(root, "annotations", f"panoptic_{split}.json")
        )
        if not os.path.isdir(self.img_folder):
            raise FileNotFoundError(f"image folder not found: {self.img_folder} ({PANOPTIC_LAYOUT})")
        if not os.path.isfile(self.ann_file):
            raise FileNotFoundError(f"panoptic annotation file not found: {self.ann_file} ({PANOPTIC_LAYOUT})")
        if png_folder is None:
            png_folder = find_png_folder(root, split)
        elif not os.path.isdir(png_folder):
            raise FileNotFoundError(f"panoptic PNG folder not found: {png_folder} ({PANOPTIC_LAYOUT})")
        self.png_folder = os.fspath(png_folder)
        self.transforms = transforms
        self.return_masks = True
        self.return_panoptic = bool(return_panoptic)
        self.skip_unreadable = skip_unreadable
        self.seed = int(seed)
        self.epoch = 0
        self.num_skipped_images = 0
        self.num_dropped_boxes = 0  # CocoDetection's counter; nothing is dropped at load time here
        self._unreadable: set[int] = set()
        self._coco: COCO | None = None

        data = self._load_json()
        self.categories: list[dict] = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids: list[int] = [c["id"] for c in self.categories]
        self.cat_names: list[str] = [c.get("name", str(c["id"])) for c in self.categories]
        self.is_thing: list[bool] = [bool(c["isthing"]) for c in self.categories]
        self.num_classes = len(self.cat_ids)
        self.label_to_cat_id: list[int] = list(self.cat_ids)
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.cat_ids)}
        self.images: dict[int, dict] = {img["id"]: img for img in data["images"]}
        self.ids: list[int] = sorted(self.images)
        self.panoptic_anns: dict[int, dict] = self._index_annotations(data["annotations"])

    # ---- loading and checking the JSON ------------------------------------------------------

    def _load_json(self) -> dict:
        try:
            with open(self.ann_file, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"panoptic annotation file {self.ann_file} is not valid JSON: {e}") from e
        if not isinstance(data, dict) or any(k not in data for k in ("images", "annotations", "categories")):
            raise ValueError(
                f"panoptic annotation file {self.ann_file} is not a COCO panoptic file: "
                "it needs top-level 'images', 'annotations' and 'categories' lists"
            )
        for cat in data["categories"]:
            if "id" not in cat or "isthing" not in cat:
                raise ValueError(
                    f"category {cat} in {self.ann_file} lacks 'id' or 'isthing' (panoptic categories need both)"
                )
        return data

    def _index_annotations(self, annotations: list[dict]) -> dict[int, dict]:
        """image id -> its panoptic annotation, checked so a broken file fails at start-up."""
        by_image: dict[int, dict] = {}
        for ann in annotations:
            img_id = ann.get("image_id")
            where = f"panoptic annotation of image id {img_id} in {self.ann_file}"
            if img_id not in self.images:
                raise ValueError(f"{where} refers to an image id missing from 'images'")
            if "file_name" not in ann or "segments_info" not in ann:
                raise ValueError(f"{where} lacks 'file_name' or 'segments_info'")
            seen: set[int] = set()
            for seg in ann["segments_info"]:
                seg_id, cat_id = seg.get("id"), seg.get("category_id")
                if cat_id not in self.cat_id_to_label:
                    raise ValueError(
                        f"segment id {seg_id} of {where} has category_id {cat_id}, which is not among "
                        f"the file's categories {self.cat_ids}"
                    )
                if not isinstance(seg_id, int) or seg_id <= 0 or seg_id in seen:
                    raise ValueError(f"{where} has an invalid or repeated segment id {seg_id!r} (ids are > 0)")
                seen.add(seg_id)
            by_image[img_id] = ann
        missing = [i for i in self.ids if i not in by_image]
        if missing:
            raise ValueError(
                f"{len(missing)} images of {self.ann_file} have no panoptic annotation, e.g. image ids {missing[:5]}"
            )
        return by_image

    @property
    def coco(self) -> COCO:
        """A pycocotools COCO index of the segments as box annotations (bbox, area, iscrowd
        from segments_info, no segmentation), for box AP with ``CocoEvaluator`` over things
        and stuff. Built on first use, since the training loop does not need it."""
        if self._coco is None:
            anns = []
            for img_id in self.ids:
                for seg in self.panoptic_anns[img_id]["segments_info"]:
                    if "bbox" not in seg:
                        continue
                    w, h = seg["bbox"][2:]
                    anns.append({
                        "id": len(anns) + 1, "image_id": img_id, "category_id": seg["category_id"],
                        "bbox": list(seg["bbox"]), "area": float(seg.get("area", w * h)),
                        "iscrowd": int(seg.get("iscrowd", 0)),
                    })
            coco = COCO()
            coco.dataset = {"images": [self.images[i] for i in self.ids], "annotations": anns,
                            "categories": self.categories}
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    # ---- one sample ---------------------------------------------------------------------------

    def image_path(self, idx: int) -> str:
        return os.path.join(self.img_folder, self.images[self.ids[idx]]["file_name"])

    def png_path(self, idx: int) -> str:
        return os.path.join(self.png_folder, self.panoptic_anns[self.ids[idx]]["file_name"])

    def read_panoptic(self, idx: int) -> np.ndarray:
        """The (H, W) int64 segment-id map of image ``idx``; OSError naming the PNG if it
        cannot be read."""
        path = self.png_path(idx)
        try:
            with Image.open(path) as pil:
                rgb = np.asarray(pil.convert("RGB"))
        except (OSError, ValueError) as e:
            raise OSError(f"cannot read panoptic PNG {path}: {e}") from e
        return rgb_to_id(rgb)

    def _read_image(self, idx: int):
        # Both files are read here, so CocoDetection.__getitem__'s skip_unreadable covers a
        # corrupt PNG as it covers a corrupt image.
        image = super()._read_image(idx)
        ids = self.read_panoptic(idx)
        if tuple(ids.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"panoptic PNG {self.png_path(idx)} is {ids.shape[0]}x{ids.shape[1]} but image "
                f"{self.image_path(idx)} is {image.shape[-2]}x{image.shape[-1]}"
            )
        return image, ids

    def _make_sample(self, idx: int, loaded):
        image, ids = loaded
        img_id = self.ids[idx]
        h, w = image.shape[-2:]
        segments = self.panoptic_anns[img_id]["segments_info"]
        seg_ids = np.array([s["id"] for s in segments], dtype=np.int64)
        present = np.unique(ids)
        unknown = np.setdiff1d(present[present != 0], seg_ids)
        if unknown.size:
            raise ValueError(
                f"panoptic PNG {self.png_path(idx)} holds segment ids {unknown[:10].tolist()} that "
                f"segments_info of image id {img_id} in {self.ann_file} does not list"
            )
        keep = np.isin(seg_ids, present)  # a listed segment without pixels gets no row
        seg_ids = seg_ids[keep]
        kept_segments = [s for s, k in zip(segments, keep) if k]
        masks = torch.from_numpy(ids[None] == seg_ids[:, None, None]).to(torch.uint8)
        labels = torch.tensor([self.cat_id_to_label[s["category_id"]] for s in kept_segments], dtype=torch.int64)
        iscrowd = torch.tensor([int(s.get("iscrowd", 0)) for s in kept_segments], dtype=torch.int64)

        # During the transforms "labels" holds each row's index: every transform keeps labels
        # aligned with the boxes and masks (SanitizeBoundingBoxes filters them together), so
        # the surviving indices tell which segments are left, whatever else is dropped.
        target = {
            "boxes": tv_tensors.BoundingBoxes(masks_to_xyxy(masks), format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(masks),
            "labels": torch.arange(len(seg_ids), dtype=torch.int64),
            "image_id": img_id,
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self._augment(idx, image, target)
        image, target = to_plain_tensors(image, target)

        rows = target["labels"]
        out_masks = target["masks"].to(torch.bool)
        nonempty = out_masks.flatten(1).any(1)
        rows, out_masks = rows[nonempty], out_masks[nonempty]
        target.update(
            masks=out_masks,
            labels=labels[rows],
            boxes=masks_to_xyxy(out_masks),
            iscrowd=iscrowd[rows],
            area=out_masks.flatten(1).sum(1).to(torch.float32),
            segment_ids=torch.from_numpy(seg_ids)[rows],
            file_name=self.images[img_id]["file_name"],
        )
        if self.return_panoptic:
            target["panoptic"] = torch.from_numpy(ids)
            target["segments"] = [
                {"id": int(s["id"]), "category_id": int(s["category_id"]), "iscrowd": int(s.get("iscrowd", 0))}
                for s in segments
            ]
        return image, target


def build_panoptic_dataset(data_cfg, split: str) -> CocoPanoptic:
    """The panoptic dataset for ``split`` ("train" or "val") under ``data_cfg.root``.

    Fields read from ``data_cfg``: ``root``, ``train_split``, ``val_split``,
    ``skip_unreadable``, ``seed`` and the transform fields of ``build_transforms``. The val
    set carries ``panoptic`` / ``segments`` in its targets for ``PanopticEvaluator``."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    folder = data_cfg.train_split if split == "train" else data_cfg.val_split
    return CocoPanoptic(
        os.fspath(data_cfg.root),
        folder,
        transforms=build_transforms(split == "train", data_cfg),
        return_panoptic=split == "val",
        skip_unreadable=bool(data_cfg.skip_unreadable),
        seed=int(data_cfg.seed),
    )
