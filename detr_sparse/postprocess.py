"""Network outputs -> per-image detections in absolute xyxy pixels of the input image."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert


def scale_boxes(boxes: Tensor, sizes: Tensor) -> Tensor:
    """boxes (B, Q, 4) normalised cxcywh, sizes (B, 2) as (h, w) -> absolute xyxy."""
    h, w = sizes.unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1).to(boxes.dtype)[:, None, :]
    return box_convert(boxes, "cxcywh", "xyxy") * scale


@torch.no_grad()
def postprocess_softmax(outputs: dict, sizes: Tensor) -> list[dict[str, Tensor]]:
    """DETR: softmax over K classes + no-object; each query gives its best real class."""
    prob = outputs["pred_logits"].float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    boxes = scale_boxes(outputs["pred_boxes"].float(), sizes)
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


@torch.no_grad()
def postprocess_sigmoid(outputs: dict, sizes: Tensor, num_top: int = 100) -> list[dict[str, Tensor]]:
    """Deformable DETR: independent sigmoid scores per (query, class); the num_top best pairs
    of each image over all Q * K, so one query may give several classes."""
    logits = outputs["pred_logits"].float()
    _, q, k = logits.shape
    scores, index = logits.sigmoid().flatten(1).topk(min(num_top, q * k), dim=1)
    labels, query = index % k, index // k
    boxes = scale_boxes(outputs["pred_boxes"].float(), sizes)
    boxes = boxes.gather(1, query[..., None].expand(-1, -1, 4))
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
