"""Tiny COCO-layout datasets written on the fly (a few ~64 px JPEGs and an instances json).

Categories are non-contiguous and listed out of order in the file, so the mapping to
contiguous labels is exercised; annotations mix polygons, compressed RLE and a crowd region
in uncompressed RLE, as real COCO files do.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image, ImageDraw

SPLITS = ("train2017", "val2017")
CATEGORIES = [
    {"id": 11, "name": "cat", "supercategory": "animal"},
    {"id": 3, "name": "dog", "supercategory": "animal"},
    {"id": 7, "name": "bird", "supercategory": "animal"},
]
# id -> (file name, width, height)
IMAGES = {1: ("000001.jpg", 64, 48), 2: ("000002.jpg", 48, 64), 5: ("000005.jpg", 64, 64)}


def rect_mask(x: int, y: int, w: int, h: int, width: int, height: int) -> np.ndarray:
    m = np.zeros((height, width), dtype=np.uint8)
    m[y : y + h, x : x + w] = 1
    return m


def polygon(x, y, w, h) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    # Run lengths over the column-major pixels, starting with a run of zeros (COCO crowd format).
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def annotation(ann_id, img_id, cat_id, bbox, segmentation=None, iscrowd=0) -> dict:
    x, y, w, h = bbox
    return {
        "id": ann_id, "image_id": img_id, "category_id": cat_id, "bbox": list(bbox),
        "area": float(max(w, 0) * max(h, 0)), "iscrowd": iscrowd,
        "segmentation": segmentation if segmentation is not None else polygon(x, y, w, h),
    }


def clean_annotations() -> list[dict]:
    w1, h1 = IMAGES[1][1:]
    w5, h5 = IMAGES[5][1:]
    return [
        annotation(1, 1, 3, [4, 6, 20, 16]),
        annotation(2, 1, 11, [30, 10, 24, 30], compressed_rle(rect_mask(30, 10, 24, 30, w1, h1))),
        annotation(3, 2, 7, [8, 8, 30, 40]),
        annotation(4, 5, 11, [10, 20, 40, 30]),
        annotation(5, 5, 3, [44, 2, 16, 12], uncompressed_rle(rect_mask(44, 2, 16, 12, w5, h5)), iscrowd=1),
    ]


def write_coco(root: Path, annotations=None, categories=None, corrupt=()) -> Path:
    """Writes root/{train2017,val2017}/*.jpg and root/annotations/instances_*.json.
    ``corrupt``: image ids whose file gets garbage bytes instead of a JPEG."""
    annotations = clean_annotations() if annotations is None else annotations
    data = {
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, (f, w, h) in IMAGES.items()],
        "annotations": annotations,
        "categories": CATEGORIES if categories is None else categories,
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for img_id, (fname, w, h) in IMAGES.items():
            if img_id in corrupt:
                (folder / fname).write_bytes(b"this is not a jpeg" * 8)
                continue
            img = Image.new("RGB", (w, h), (40 * img_id % 255, 90, 160))
            draw = ImageDraw.Draw(img)
            for ann in annotations:
                x, y, bw, bh = ann["bbox"]
                if ann["image_id"] == img_id and bw > 0 and bh > 0:
                    draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=(255, 20 * ann["id"] % 255, 0))
            img.save(folder / fname, quality=95)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def make_coco(tmp_path):
    """Factory: ``make_coco(annotations=None, categories=None, corrupt=())`` -> dataset root."""
    counter = iter(range(1000))

    def make(**kwargs) -> Path:
        return write_coco(tmp_path / f"coco{next(counter)}", **kwargs)

    return make


@pytest.fixture
def coco_root(make_coco) -> Path:
    return make_coco()


@pytest.fixture
def coco_helpers() -> SimpleNamespace:
    """The builders above, for tests that write their own annotations (test modules cannot
    import a conftest reliably when several test folders have one)."""
    return SimpleNamespace(
        annotation=annotation, clean_annotations=clean_annotations, rect_mask=rect_mask,
        images=IMAGES, categories=CATEGORIES,
        val_paths=lambda root: (root / "val2017", root / "annotations" / "instances_val2017.json"),
    )


@pytest.fixture
def make_data_cfg():
    """Factory: a data config with small sizes fit for 64 px images; keywords override."""

    def make(root=None, **overrides) -> SimpleNamespace:
        fields = dict(
            root=str(root) if root is not None else "",
            train_split="train2017", val_split="val2017",
            masks=False, skip_unreadable=False, seed=0,
            flip_prob=0.5, train_scales=[32, 40, 48, 56, 64], max_size=96,
            random_crop=True, crop_resize_scales=[40, 48, 56], crop_size=[24, 48],
            val_size=48,
        )
        fields.update(overrides)
        return SimpleNamespace(**fields)

    return make
