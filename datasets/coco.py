"""COCO detection / instance segmentation dataset.

Targets follow the DETR convention: labels are contiguous 0..num_classes-1 (so the
classifier has exactly num_classes outputs plus "no object"), crowd regions are left out
of the targets (COCOeval still uses them as ignore regions), and boxes are absolute xyxy in
the transformed image.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from .transforms import to_plain_tensors

logger = logging.getLogger("detr_sparse.data")

COCO_LAYOUT = (
    "expected the COCO layout: <root>/train2017/ (or val2017/) holding the images and "
    "<root>/annotations/instances_train2017.json (or instances_val2017.json)"
)


def load_coco_api(ann_file: str) -> COCO:
    """A pycocotools COCO object built from ``ann_file``, with readable errors.

    The JSON is parsed here rather than by ``COCO(ann_file)`` so a malformed file reports
    its own name, and pycocotools' progress prints are kept off stdout."""
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotation file {ann_file} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise ValueError(
            f"annotation file {ann_file} is not a COCO instances file: "
            "it needs top-level 'images' and 'categories' lists"
        )
    data.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def read_categories(ann_file: str) -> list[dict]:
    """The categories of a COCO instances or panoptic annotation file in id order (the label
    order of the datasets), each {"id", "name" (the id as text when absent), "isthing" (1 when
    absent)}; ValueError naming the file when it is not JSON or has no categories list."""
    try:
        with open(ann_file, encoding="utf-8") as f:
            cats = json.load(f)["categories"]
        return [{"id": int(c["id"]), "name": str(c.get("name", c["id"])), "isthing": int(c.get("isthing", 1))}
                for c in sorted(cats, key=lambda c: c["id"])]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"annotation file {ann_file} has no COCO 'categories' list "
                         f"({type(e).__name__}: {e})") from e


def read_image(path: str) -> tv_tensors.Image:
    """An image file as a uint8 (3, H, W) RGB tensor; OSError naming the file when it cannot
    be decoded (a truncated file fails here, not later)."""
    try:
        with Image.open(path) as pil:
            pil = pil.convert("RGB")  # forces the decode
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read image {path}: {e}") from e
    return tv_tensors.Image(F.pil_to_tensor(pil))


class CocoDetection(torch.utils.data.Dataset):
    """COCO images with DETR targets.

    ``dataset[idx]`` returns ``(image, target)``: image is a float tensor (3, H, W) (plain
    [0, 1] without transforms, normalised by the usual transforms); target holds plain
    tensors ``boxes`` (N, 4) float32 absolute xyxy in the returned image, ``labels`` (N,)
    int64 contiguous, ``masks`` (N, H, W) uint8 when ``return_masks``, ``area`` (N,) float32
    (mask area if masks, else box area), ``iscrowd`` (N,) int64 (all 0), ``orig_size`` and
    ``size`` ([h, w] int64 before and after the transforms) and ``image_id`` (int).

    Augmentation is a function of (seed, epoch, idx) only; call ``set_epoch`` every epoch.
    Counters ``num_dropped_boxes`` and ``num_skipped_images`` are per process (each
    DataLoader worker holds its own copy of the dataset).
    """

    def __init__(
        self,
        img_folder: str,
        ann_file: str,
        transforms=None,
        return_masks: bool = False,
        skip_unreadable: bool = False,
        seed: int = 0,
    ) -> None:
        img_folder, ann_file = os.fspath(img_folder), os.fspath(ann_file)
        if not os.path.isdir(img_folder):
            raise FileNotFoundError(f"image folder not found: {img_folder} ({COCO_LAYOUT})")
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"annotation file not found: {ann_file} ({COCO_LAYOUT})")
        self.img_folder = img_folder
        self.ann_file = ann_file
        self.transforms = transforms
        self.return_masks = return_masks
        self.skip_unreadable = skip_unreadable
        self.seed = int(seed)
        self.epoch = 0
        self.num_skipped_images = 0
        self._unreadable: set[int] = set()

        self.coco = load_coco_api(ann_file)
        cats = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.cat_ids: list[int] = [c["id"] for c in cats]
        self.cat_names: list[str] = [c.get("name", str(c["id"])) for c in cats]
        self.num_classes = len(self.cat_ids)
        # label -> COCO category id (what the evaluator writes into results) and back.
        self.label_to_cat_id: list[int] = list(self.cat_ids)
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.cat_ids)}
        self.ids: list[int] = sorted(self.coco.imgs.keys())
        self._anns, self.num_dropped_boxes = self._index_annotations()
        if self.num_dropped_boxes:
            logger.warning(
                "dropped %d annotations with zero or negative width/height in %s",
                self.num_dropped_boxes, ann_file,
            )

    def _index_annotations(self) -> tuple[dict[int, list[dict]], int]:
        """Per image, the annotations that become targets; fails on unknown categories or
        images so a broken file is caught at start-up, not hours into training."""
        anns: dict[int, list[dict]] = {img_id: [] for img_id in self.ids}
        dropped = 0
        for ann in self.coco.dataset["annotations"]:
            where = f"annotation id {ann.get('id')} (image id {ann.get('image_id')}) in {self.ann_file}"
            if ann.get("category_id") not in self.cat_id_to_label:
                raise ValueError(
                    f"{where} has category_id {ann.get('category_id')}, which is not among the "
                    f"file's categories {self.cat_ids}"
                )
            if ann.get("image_id") not in anns:
                raise ValueError(f"{where} refers to an image id missing from 'images'")
            if ann.get("iscrowd", 0):
                continue
            _, _, w, h = ann["bbox"]
            if w <= 0 or h <= 0:
                dropped += 1
                continue
            anns[ann["image_id"]].append(ann)
        return anns, dropped

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int):
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} images")
        idx %= len(self)
        # Walk forward from idx so a skipped image is replaced by a fixed neighbour, which
        # keeps the substitute deterministic for exact resume.
        for offset in range(len(self)):
            i = (idx + offset) % len(self)
            if i in self._unreadable:
                continue
            try:
                image = self._read_image(i)
            except OSError as e:
                if not self.skip_unreadable:
                    raise
                self._unreadable.add(i)
                self.num_skipped_images += 1
                logger.warning("skipping unreadable image: %s", e)
                continue
            return self._make_sample(i, image)
        raise RuntimeError(f"no readable image left among the {len(self)} images in {self.img_folder}")

    def image_path(self, idx: int) -> str:
        return os.path.join(self.img_folder, self.coco.imgs[self.ids[idx]]["file_name"])

    def _read_image(self, idx: int) -> tv_tensors.Image:
        return read_image(self.image_path(idx))

    def _make_sample(self, idx: int, image: tv_tensors.Image):
        img_id = self.ids[idx]
        h, w = image.shape[-2:]
        anns = self._anns[img_id]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = tv_tensors.BoundingBoxes(
            torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1), format="XYXY", canvas_size=(h, w)
        )
        target = {
            # COCO boxes may overhang the image by a fraction of a pixel.
            "boxes": F.clamp_bounding_boxes(boxes),
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
            "image_id": img_id,
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        if self.return_masks:
            target["masks"] = tv_tensors.Mask(self._masks(idx, anns, h, w))
        if self.transforms is not None:
            image, target = self._augment(idx, image, target)
        return to_plain_tensors(image, target)

    def _masks(self, idx: int, anns: list[dict], h: int, w: int) -> torch.Tensor:
        info = self.coco.imgs[self.ids[idx]]
        if (info.get("height"), info.get("width")) != (h, w):
            # annToMask rasterises at the size the annotation file states.
            raise ValueError(
                f"image {self.image_path(idx)} is {h}x{w} but {self.ann_file} says "
                f"{info.get('height')}x{info.get('width')}"
            )
        if not anns:
            return torch.zeros((0, h, w), dtype=torch.uint8)
        return torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])).to(torch.uint8)

    def _augment(self, idx: int, image, target):
        """Run the transforms under RNG state derived from (seed, epoch, idx) alone, so a
        sample's augmentation does not depend on worker assignment or on earlier samples,
        and the caller's RNG streams are left as they were."""
        entropy = [v % (1 << 63) for v in (self.seed, self.epoch, idx)]
        torch_seed, py_seed = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64).tolist()
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            random.seed(py_seed)
            try:
                return self.transforms(image, target)
            finally:
                random.setstate(py_state)
