"""Pictures of predictions for TensorBoard and the tools."""
from __future__ import annotations

import torch
from torchvision.utils import draw_bounding_boxes

from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) normalised float -> (3, H, W) uint8."""
    mean = image.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = image.new_tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean).clamp(0, 1) * 255).to(torch.uint8)


def draw_detections(image: torch.Tensor, prediction: dict, class_names: list[str],
                    threshold: float = 0.5, target: dict | None = None) -> torch.Tensor:
    """uint8 (3, H, W) image with ground truth (green) and detections above `threshold` (red)."""
    image = image.cpu()
    if target is not None and len(target["boxes"]):
        image = draw_bounding_boxes(image, target["boxes"].cpu(), colors="lime", width=1)
    keep = prediction["scores"] > threshold
    boxes = prediction["boxes"][keep].cpu()
    if len(boxes):
        labels = [f"{class_names[l] if l < len(class_names) else l} {s:.2f}"
                  for l, s in zip(prediction["labels"][keep].tolist(), prediction["scores"][keep].tolist())]
        image = draw_bounding_boxes(image, boxes, labels=labels, colors="red", width=2)
    return image
