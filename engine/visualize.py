"""Pictures of predictions, and of a sparse encoder's kept tokens and the decoder's
cross-attention map (DAM), for TensorBoard and the tools."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.utils import draw_bounding_boxes

from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from detr_sparse.sparsity.sparse_detr import attention_map


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


# ----------------------------------------------------------------- token sparsity pictures
KEPT_COLOR = (255, 0, 0)  # red: tokens the sparse encoder updated
DAM_COLOR = (255, 200, 0)  # yellow-orange: the decoder's cross-attention map
GAP = 4  # white columns between side-by-side panels


def token_heatmap(values: torch.Tensor, shapes: torch.Tensor, starts: torch.Tensor, valid: torch.Tensor,
                  image_size: tuple[int, int], padded_size: tuple[int, int]) -> torch.Tensor:
    """One image's per-token values (S,) of a multi-level map over a padded batch -> (h, w)
    float in [0, 1] over the unpadded image: each level's map (H_l, W_l), padded tokens
    (`valid` False) zeroed, nearest-upsampled to `padded_size` (H, W), cropped to `image_size`
    (h, w), divided by its max (when > 0); then the levels are averaged."""
    h, w = image_size
    levels = []
    for (lh, lw), start in zip(shapes.tolist(), starts.tolist()):
        level = values[start:start + lh * lw].float() * valid[start:start + lh * lw]
        level = F.interpolate(level.view(1, 1, lh, lw), size=tuple(padded_size), mode="nearest")[0, 0, :h, :w]
        top = level.max()
        levels.append(level / top if top > 0 else level)
    return torch.stack(levels).mean(0)


def overlay(image: torch.Tensor, heat: torch.Tensor, color=(255, 0, 0), alpha: float = 0.6) -> torch.Tensor:
    """uint8 (3, h, w) image blended towards `color` by alpha * heat (h, w) in [0, 1]."""
    weight = alpha * heat.to(image.device).clamp(0, 1)
    tint = torch.tensor(color, dtype=torch.float32, device=image.device)[:, None, None]
    return (image.float() * (1 - weight) + tint * weight).round().clamp(0, 255).to(torch.uint8)


def side_by_side(images: list[torch.Tensor], gap: int = GAP) -> torch.Tensor:
    """uint8 (3, h_i, w_i) images left to right, `gap` white columns apart, top-aligned
    -> (3, max h, sum w + gap * (n - 1))."""
    height = max(img.shape[1] for img in images)
    width = sum(img.shape[2] for img in images) + gap * (len(images) - 1)
    out = torch.full((3, height, width), 255, dtype=torch.uint8)
    x = 0
    for img in images:
        out[:, :img.shape[1], x:x + img.shape[2]] = img.cpu()
        x += img.shape[2] + gap
    return out


def sparsity_overlays(image: torch.Tensor, kept: torch.Tensor, dam: torch.Tensor, shapes: torch.Tensor,
                      starts: torch.Tensor, valid: torch.Tensor,
                      padded_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 (3, h, w) image with its kept tokens (S,) bool in red, and with its DAM (S,)
    in yellow-orange (see `token_heatmap` for the token layout)."""
    size = tuple(image.shape[-2:])
    kept_heat = token_heatmap(kept.cpu(), shapes, starts, valid.cpu(), size, padded_size)
    dam_heat = token_heatmap(dam.cpu(), shapes, starts, valid.cpu(), size, padded_size)
    return overlay(image, kept_heat, KEPT_COLOR), overlay(image, dam_heat, DAM_COLOR)


def sparsity_panels(image: torch.Tensor, kept: torch.Tensor, dam: torch.Tensor, shapes: torch.Tensor,
                    starts: torch.Tensor, valid: torch.Tensor, padded_size: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, h, 2 * w + GAP): kept tokens (left) and DAM (right) over the image."""
    return side_by_side(list(sparsity_overlays(image, kept, dam, shapes, starts, valid, padded_size)))


@torch.no_grad()
def sparsity_maps(model, images) -> dict | None:
    """Runs a Sparse DETR's `forward_raw` on an ImageBatch -> {"out": the raw outputs,
    "kept" (B, S) bool, "dam" (B, S) float (the decoder's cross-attention map of this pass),
    "valid" (B, S) bool, "shapes" (L, 2), "starts" (L,), "counts" (B,) kept per image}, all but
    "out" on the CPU; None when the pass kept no tokens (dense encoder, rho 0)."""
    out = model.forward_raw(images)
    if "kept" not in out:
        return None
    t = out["token_map"]
    sampling = [layer.cross_attn.sampling for layer in model.transformer.decoder]
    dam = attention_map([s[0] for s in sampling], [s[1] for s in sampling], t.shapes, t.starts)
    return {"out": out, "kept": out["kept"].dense(t.mask.shape[1]).cpu(), "dam": dam.float().cpu(),
            "valid": (~t.mask).cpu(), "shapes": t.shapes.cpu(), "starts": t.starts.cpu(),
            "counts": out["kept"].counts.cpu()}


def sparsity_pictures(model, images, limit: int) -> list[torch.Tensor]:
    """`sparsity_panels` of the first `limit` images of an ImageBatch (a fresh no-grad pass
    of `model`); [] for a model that keeps no tokens."""
    maps = sparsity_maps(model, images) if limit > 0 else None
    if maps is None:
        return []
    padded = tuple(images.tensors.shape[-2:])
    pictures = []
    for i, (h, w) in enumerate(images.sizes.tolist()[:limit]):
        image = denormalize(images.tensors[i, :, :h, :w].float().cpu())
        pictures.append(sparsity_panels(image, maps["kept"][i], maps["dam"][i], maps["shapes"],
                                        maps["starts"], maps["valid"][i], padded))
    return pictures
