"""Network outputs -> per-image detections in absolute xyxy pixels of the input image."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
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


def panoptic_segments(mask_logits: Tensor, labels: Tensor, is_thing: Tensor,
                      min_area: int = 4) -> tuple[Tensor, list[dict]]:
    """DETR's panoptic merge for one image: every pixel goes to the query of highest mask
    logit; the queries of one stuff class form one segment; a segment of at most min_area
    pixels is dropped and its pixels go to the remaining queries, until none is that small.
    mask_logits (K, H, W) of the K kept queries, labels (K,), is_thing (num_classes,) bool
    -> id map (H, W) int64 (0 = no segment) and segments [{"id", "label", "isthing",
    "area"}] with ids 1..S. (DETR drops a merged stuff query's duplicates before the area
    test, which can hand their pixels to another class; here they stay in their segment.)"""
    labels = labels.tolist()
    # segment key of each query: the query itself for things, its class for stuff
    keys = [("thing", q) if is_thing[c] else ("stuff", c) for q, c in enumerate(labels)]
    alive = list(range(len(labels)))
    while alive:
        owner = torch.tensor(alive)[mask_logits[alive].argmax(0)]  # (H, W) query per pixel
        seg_keys = list(dict.fromkeys(keys[q] for q in alive))  # in the order of first query
        seg_of_query = torch.tensor([seg_keys.index(keys[q]) if q in alive else -1
                                     for q in range(len(labels))])
        seg_map = seg_of_query[owner]
        area = torch.bincount(seg_map.flatten(), minlength=len(seg_keys))
        small = {seg_keys[i] for i in range(len(seg_keys)) if area[i] <= min_area}
        if not small:
            segments = [{"id": i + 1, "label": labels[next(q for q in alive if keys[q] == k)],
                         "isthing": k[0] == "thing", "area": int(area[i])}
                        for i, k in enumerate(seg_keys)]
            return seg_map + 1, segments
        alive = [q for q in alive if keys[q] not in small]
    return torch.zeros(mask_logits.shape[-2:], dtype=torch.int64), []


@torch.no_grad()
def postprocess_panoptic(outputs: dict, sizes: Tensor, padded: tuple[int, int], is_thing: Tensor,
                         threshold: float = 0.85) -> list[dict]:
    """DETR's panoptic post-processing: the queries whose best class (no-object included)
    is a real class with probability > threshold keep their masks, upsampled (bilinear) from
    the padded batch (H, W) `padded` and cropped to each image's size; then
    `panoptic_segments`. -> per image {"panoptic": (h, w) int64 id map at the input-image
    size, "segments_info": [{"id", "label", "isthing", "area"}]}."""
    prob = outputs["pred_logits"].float().softmax(-1)
    scores, labels = prob.max(-1)
    keep = (labels != prob.shape[-1] - 1) & (scores > threshold)
    results = []
    for i, (h, w) in enumerate(sizes.tolist()):
        masks = outputs["pred_masks"][i, keep[i]].float()
        masks = (F.interpolate(masks[None], size=padded, mode="bilinear", align_corners=False)[0]
                 if len(masks) else masks.new_zeros(0, *padded))  # interpolate refuses no channels
        id_map, segments = panoptic_segments(masks[:, :h, :w], labels[i, keep[i]], is_thing.tolist())
        results.append({"panoptic": id_map, "segments_info": segments})
    return results


# ---------------------------------------------------------------- back to the original image
# A model predicts in the coordinates of its input (the image after the evaluation resize);
# these map its predictions back to the image as it was read (COCO evaluation, the Predictor).

def boxes_to_original(boxes: Tensor, input_hw: tuple[int, int], original_hw: tuple[int, int]) -> Tensor:
    """(N, 4) absolute xyxy in the input image (h, w) -> the same boxes in the original image."""
    scale_y, scale_x = original_hw[0] / input_hw[0], original_hw[1] / input_hw[1]
    scale = torch.tensor([scale_x, scale_y, scale_x, scale_y], dtype=torch.float32, device=boxes.device)
    return boxes.float().reshape(-1, 4) * scale


def masks_to_original(masks: Tensor, input_hw: tuple[int, int], original_hw: tuple[int, int]) -> Tensor:
    """(N, H, W) or (N, 1, H, W) mask probabilities at the input size (or at a padded batch
    size: the padding beyond input_hw is cut) -> (N, h0, w0) bool at the original size
    (bilinear, then > 0.5)."""
    masks = masks.float()
    if masks.dim() == 4:
        masks = masks[:, 0]
    if masks.shape[0] == 0:
        return torch.zeros((0, *original_hw), dtype=torch.bool)
    masks = masks[:, : input_hw[0], : input_hw[1]]
    return F.interpolate(masks[:, None], size=tuple(original_hw), mode="bilinear", align_corners=False)[:, 0] > 0.5


def id_map_to_original(id_map: Tensor, original_hw: tuple[int, int]) -> Tensor:
    """(H, W) integer segment-id map -> (h0, w0) int64, nearest neighbour (ids are not blended)."""
    resized = F.interpolate(id_map[None, None].double(), size=tuple(original_hw))
    return resized[0, 0].long()
