"""Inference on any images: `Predictor(config, checkpoint)(images)`.

    from detr_sparse import Predictor
    predictor = Predictor("out/run/config.yaml", "out/run/checkpoint.pth", score_threshold=0.5)
    for result in predictor(["a.jpg", pil_image, uint8_tensor]):
        print(result["boxes"], result["class_names"], result["scores"])

Images (paths, PIL images, (3, H, W) uint8 or [0, 1] float tensors or a (B, 3, H, W) stack, any
size) go through the dataset's evaluation transform (data.val_size / data.max_size resize, ImageNet
normalisation), are batched (`ImageBatch`, batch_size at a time; default eval.batch_size) and
run in `precision` (default eval.precision: fp32 | bf16). Each result is in the ORIGINAL image's
pixels: "boxes" (N, 4) absolute xyxy, "scores", "labels", "class_names", "category_ids" (None
where unknown), "image_size" (h, w), and where the model has them "masks" (N, h, w) bool
(Mask R-CNN, Panoptic FPN) and "panoptic" (h, w) int64 segment ids (0: none) with "segments"
[{"id", "label", "class_name", "category_id", "isthing", "area"}] (panoptic DETR / PnP-DETR,
Panoptic FPN). Detections below score_threshold are dropped; the panoptic map is the model's.

The checkpoint is a project checkpoint (its averaged weights when it keeps them, train.ema, as
evaluation uses) or an authors' release, converted on the fly as `main.py --eval` does. The
class names: the checkpoint's (training stores them), else those of the annotation file given,
else those of the config's val annotation file when it is on this machine, else class_<i> (an
authors' checkpoint: COCO's category ids; otherwise model.num_classes classes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from .image_batch import ImageBatch
from .postprocess import boxes_to_original, id_map_to_original, masks_to_original


@dataclass
class Classes:
    """A model's classes in label order: names, COCO category ids (None: unknown) and which
    are things (None: unknown)."""
    names: list[str]
    category_ids: list[int] | None = None
    is_thing: list[bool] | None = None

    @classmethod
    def from_annotations(cls, path: str) -> "Classes":
        from datasets.coco import read_categories

        cats = read_categories(path)
        return cls([c["name"] for c in cats], [c["id"] for c in cats], [bool(c["isthing"]) for c in cats])

    def name(self, label: int) -> str:
        return self.names[label] if label < len(self.names) else f"class_{label}"

    def category_id(self, label: int) -> int | None:
        ids = self.category_ids
        return ids[label] if ids is not None and label < len(ids) else None


def find_classes(cfg, state: dict | None, annotations: str = "", source: str = "") -> Classes:
    """The classes of a model (see the module docstring for the order); ConfigError naming
    what is missing when nothing tells the class count."""
    from datasets import split_files
    from engine.config import ConfigError

    from .official import coco_categories, is_official

    if state is not None and "classes" in state:
        stored = state["classes"]
        return Classes(list(stored["names"]), list(stored["category_ids"]), list(stored["is_thing"]))
    if annotations:
        return Classes.from_annotations(annotations)
    val_annotations = split_files(cfg.data, "val")[1]
    if os.path.isfile(val_annotations):
        return Classes.from_annotations(val_annotations)
    if state is not None and is_official(state["model"]):
        ids, is_thing = coco_categories(cfg.model.panoptic.enabled or cfg.model.name == "panoptic_fpn")
        return Classes([f"class_{i}" for i in range(len(ids))], ids, is_thing)
    if cfg.model.num_classes:
        return Classes([f"class_{i}" for i in range(cfg.model.num_classes)])
    raise ConfigError(f"{source or 'the model'}: its classes are unknown (no class list in the checkpoint, no "
                      f"annotation file given, the config's val annotation file {val_annotations} is not here, "
                      "model.num_classes is 0): give an annotation file or set model.num_classes")


def load_image(image) -> tv_tensors.Image:
    """A path, a PIL image or a (3, H, W) tensor (uint8, or float in [0, 1]) -> tv_tensors.Image."""
    from datasets.coco import read_image

    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image))
    if isinstance(image, Image.Image):
        return tv_tensors.Image(F.pil_to_tensor(image.convert("RGB")))
    if torch.is_tensor(image) and image.dim() == 3 and image.shape[0] == 3:
        return tv_tensors.Image(image)
    raise TypeError(f"an image is a path, a PIL image or a (3, H, W) tensor, not {type(image).__name__}"
                    f"{tuple(image.shape) if torch.is_tensor(image) else ''}")


class Predictor:
    def __init__(self, config, checkpoint: str = "", *, annotations: str = "", score_threshold: float = 0.5,
                 batch_size: int = 0, precision: str = "", device: str = "", opts=()):
        from datasets.transforms import build_transforms
        from engine.checkpoint import build_eval_model, evaluation_weights, load_checkpoint, load_model_weights
        from engine.config import load_config
        from engine.distributed import resolve_device

        self.cfg = config if isinstance(config, DictConfig) else load_config(config, list(opts))
        self.device = resolve_device(device or self.cfg.device)
        self.precision = precision or self.cfg.eval.precision
        self.autocast()  # an unknown mode, or fp16 on a CPU, fails now
        self.score_threshold = score_threshold
        self.batch_size = max(batch_size or self.cfg.eval.batch_size, 1)
        state = load_checkpoint(checkpoint) if checkpoint else None
        self.classes = find_classes(self.cfg, state, annotations, checkpoint)
        self.model = build_eval_model(self.cfg.model, len(self.classes.names), "", self.device, self.classes.is_thing)
        if state is not None:
            load_model_weights(self.model, evaluation_weights(state), checkpoint, categories=self.classes.category_ids)
        self.transform = build_transforms(False, self.cfg.data)

    def autocast(self):
        """The context the model runs in: autocast to `precision`, or none for fp32."""
        from engine.train import autocast

        return autocast(self.device, self.precision, "eval.precision")

    def prepare(self, images: list) -> tuple[ImageBatch, list[tuple[int, int]]]:
        """Images -> the network's input batch (on the CPU) and each image's original (h, w)."""
        loaded = [load_image(image) for image in images]
        inputs = [self.transform(image).as_subclass(torch.Tensor) for image in loaded]
        return ImageBatch.from_images(inputs), [tuple(image.shape[-2:]) for image in loaded]

    @torch.no_grad()
    def predict_batch(self, batch: ImageBatch, original_sizes: list[tuple[int, int]]) -> list[dict]:
        """The model on a prepared batch -> per image, its predictions in original pixels."""
        self.model.eval()
        with self.autocast():
            outputs = self.model(batch.to(self.device))
        return [self._to_original(out, tuple(size), original)
                for out, size, original in zip(outputs, batch.sizes.tolist(), original_sizes)]

    def __call__(self, images) -> list[dict]:
        """One image or several (a list, or a (B, 3, H, W) tensor) -> a result per image."""
        if torch.is_tensor(images) and images.dim() == 4:
            images = list(images)
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        results = []
        for start in range(0, len(items), self.batch_size):
            results += self.predict_batch(*self.prepare(items[start:start + self.batch_size]))
        return results

    def _to_original(self, pred: dict, input_hw: tuple[int, int], original_hw: tuple[int, int]) -> dict:
        pred = {k: v.cpu() if torch.is_tensor(v) else v for k, v in pred.items()}
        keep = pred["scores"].float() >= self.score_threshold
        labels = pred["labels"][keep].tolist()
        result = {"boxes": boxes_to_original(pred["boxes"][keep], input_hw, original_hw),
                  "scores": pred["scores"][keep].float(), "labels": pred["labels"][keep],
                  "class_names": [self.classes.name(label) for label in labels],
                  "category_ids": [self.classes.category_id(label) for label in labels],
                  "image_size": original_hw}
        if "masks" in pred:
            result["masks"] = masks_to_original(pred["masks"][keep], input_hw, original_hw)
        if "panoptic" in pred:
            id_map = id_map_to_original(pred["panoptic"], original_hw)
            area = torch.bincount(id_map.flatten())
            result["panoptic"] = id_map
            result["segments"] = [
                {"id": s["id"], "label": s["label"], "class_name": self.classes.name(s["label"]),
                 "category_id": self.classes.category_id(s["label"]), "isthing": bool(s["isthing"]),
                 "area": int(area[s["id"]]) if s["id"] < len(area) else 0}
                for s in pred["segments_info"]]
        return result
