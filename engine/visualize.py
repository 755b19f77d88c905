"""Pictures of predictions, and of a sparse encoder's kept tokens and the decoder's
cross-attention map (DAM), for TensorBoard and the tools."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) normalised float -> (3, H, W) uint8."""
    mean = image.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = image.new_tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean).clamp(0, 1) * 255).to(torch.uint8)


def draw_detections(image: torch.Tensor, prediction: dict, class_names: list[str],
                    threshold: float = 0.5, target: dict | None = None) -> torch.Tensor:
    """uint8 (3, H, W) image with ground truth (green) and detections above `threshold` (red),
    and their masks when the prediction has "masks" ((N, [1,] H, W) probabilities or bool at
    the image's size)."""
    image = image.cpu()
    if target is not None and len(target["boxes"]):
        image = draw_bounding_boxes(image, target["boxes"].cpu(), colors="lime", width=1)
    keep = prediction["scores"] > threshold
    if "masks" in prediction and keep.any():
        masks = prediction["masks"][keep].cpu()
        image = draw_segmentation_masks(image, (masks[:, 0] if masks.dim() == 4 else masks).float() > 0.5, alpha=0.4)
    boxes = prediction["boxes"][keep].cpu()
    if len(boxes):
        labels = [f"{class_names[l] if l < len(class_names) else l} {s:.2f}"
                  for l, s in zip(prediction["labels"][keep].tolist(), prediction["scores"][keep].tolist())]
        image = draw_bounding_boxes(image, boxes, labels=labels, colors="red", width=2)
    return image


def draw_panoptic(image: torch.Tensor, id_map: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) image with each segment of an (H, W) id map (0: none) in its own colour."""
    ids = [i for i in id_map.unique().tolist() if i != 0]
    if not ids:
        return image.cpu()
    return draw_segmentation_masks(image.cpu(), id_map.cpu()[None] == torch.tensor(ids)[:, None, None], alpha=0.5)


# ----------------------------------------------------------------- token sparsity pictures
# a model's token maps in order: red (Sparse DETR's kept tokens, PnP's poll scores), then
# yellow-orange (the decoder's attention map, PnP's computation density)
MAP_COLORS = [(255, 0, 0), (255, 200, 0), (0, 120, 255)]
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


def token_overlays(image: torch.Tensor, maps: dict, shapes: torch.Tensor, starts: torch.Tensor,
                   valid: torch.Tensor, padded_size: tuple[int, int]) -> list[torch.Tensor]:
    """The uint8 (3, h, w) image once per token map {name: (S,) values}, each map's heat in
    its own colour (see `token_heatmap` for the token layout)."""
    size = tuple(image.shape[-2:])
    return [overlay(image, token_heatmap(values.cpu(), shapes, starts, valid.cpu(), size, padded_size),
                    MAP_COLORS[i % len(MAP_COLORS)])
            for i, values in enumerate(maps.values())]


def sparsity_panels(image: torch.Tensor, maps: dict, shapes: torch.Tensor, starts: torch.Tensor,
                    valid: torch.Tensor, padded_size: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, h, n * w + (n - 1) * GAP): the n token maps side by side over the image."""
    return side_by_side(token_overlays(image, maps, shapes, starts, valid, padded_size))


# DGE's granularities: finest (16 queries per region) red, middle yellow, coarsest (1) blue
GRAIN_COLORS = [(230, 40, 40), (250, 200, 0), (40, 110, 230)]


def grain_panel(image: torch.Tensor, choice: torch.Tensor, region_px: int, alpha: float = 0.45) -> torch.Tensor:
    """The uint8 (3, h, w) image with each region (region_px square, from the top-left)
    tinted by its granularity in choice (Hr, Wr) (0 finest .. 2 coarsest, -1 padding: left
    as it is), and a grid line between regions."""
    h, w = image.shape[-2:]
    colors = torch.tensor(GRAIN_COLORS + [(0, 0, 0)], dtype=torch.float32)[choice.cpu().clamp(min=-1)]
    tint = colors.permute(2, 0, 1).repeat_interleave(region_px, 1).repeat_interleave(region_px, 2)[:, :h, :w]
    inside = (choice.cpu() >= 0).repeat_interleave(region_px, 0).repeat_interleave(region_px, 1)[:h, :w]
    out = torch.where(inside, image.float() * (1 - alpha) + tint * alpha, image.float())
    out[:, ::region_px, :], out[:, :, ::region_px] = 255.0, 255.0
    return out.round().clamp(0, 255).to(torch.uint8)


def usage_panel(image: torch.Tensor, usage: torch.Tensor, patch_px: int, blocks: int, alpha: float = 0.7
                ) -> torch.Tensor:
    """The uint8 (3, h, w) image tinted red by how many of the `blocks` gated blocks each
    token (patch_px square, from the top-left) went through: usage (gh, gw), -1 outside the
    image (an SViT backbone's `token_usage`)."""
    h, w = image.shape[-2:]
    heat = (usage.float().cpu().clamp(min=0) / max(blocks, 1)).repeat_interleave(patch_px, 0)
    return overlay(image, heat.repeat_interleave(patch_px, 1)[:h, :w], MAP_COLORS[0], alpha)


def backbone_panels(backbone, i: int, image: torch.Tensor) -> list[torch.Tensor]:
    """The last evaluation pass's pictures of a token-sparse backbone for image i of the
    batch (uint8 (3, h, w) image): a DGE backbone's granularity of its pictured blocks, an
    SViT backbone's token usage, an SPT's selection count (how many SPA blocks selected each
    stride-16 token); [] for another backbone."""
    if hasattr(backbone, "selection_usage"):
        return [usage_panel(image, backbone.selection_usage()[i], 16, backbone.spa_blocks)]
    if hasattr(backbone, "granularity_maps"):
        return [grain_panel(image, choice[i], px) for _, choice, px in backbone.granularity_maps()]
    if hasattr(backbone, "token_usage"):
        return [usage_panel(image, backbone.token_usage()[i], backbone.patch_size, len(backbone.gated))]
    return []


def has_backbone_pictures(model) -> bool:
    backbone = getattr(model, "backbone", None)
    return any(hasattr(backbone, a) for a in ("granularity_maps", "token_usage", "selection_usage"))


def has_sparsity_pictures(model) -> bool:
    """A token-sparse detector (token maps) or a detector on a token-sparse backbone (DGE's
    granularities, SViT's token usage, SPT's selections)."""
    return hasattr(model, "token_maps") or has_backbone_pictures(model)


@torch.no_grad()
def backbone_pictures(model, images, limit: int, ran: bool = False) -> list[torch.Tensor]:
    """A detector on a token-sparse backbone and an ImageBatch -> for its first `limit`
    images, the backbone's panels side by side (uint8 (3, h, n * w + gaps)), from the record
    the backbone keeps of its last pass: a fresh evaluation pass, or (`ran`) the one the
    caller just made on these images."""
    if not ran:
        model(images)
    pictures = []
    for i, (h, w) in enumerate(images.sizes.tolist()[:limit]):
        image = denormalize(images.tensors[i, :, :h, :w].float().cpu())
        pictures.append(side_by_side(backbone_panels(model.backbone, i, image)))
    return pictures


@torch.no_grad()
def sparsity_maps(model, images) -> dict | None:
    """Runs a token-sparse model's `forward_raw` on an ImageBatch -> its `token_maps` (the
    maps {name: (B, S)}, "kept" and "valid" (B, S), "shapes" (L, 2), "starts" (L,), on the
    CPU) with "out", the raw outputs; None for a model, or a pass, without token maps."""
    if not hasattr(model, "token_maps"):
        return None
    out = model.forward_raw(images)
    maps = model.token_maps(out)
    if maps is None:
        return None
    layout = {k: v.cpu() for k, v in maps.items() if k != "maps"}
    return {**layout, "maps": {k: v.float().cpu() for k, v in maps["maps"].items()}, "out": out}


def sparsity_pictures(model, images, limit: int, ran: bool = False) -> list[torch.Tensor]:
    """`sparsity_panels` (or a token-sparse backbone's `backbone_pictures`) of the first
    `limit` images of an ImageBatch (a fresh no-grad pass of `model`; `ran`: the model has
    just run on these images, which spares a backbone's pictures a second pass; token maps
    need the raw outputs, so their pass is made anyway); [] for a dense model."""
    if limit > 0 and has_backbone_pictures(model):
        return backbone_pictures(model, images, limit, ran)
    maps = sparsity_maps(model, images) if limit > 0 else None
    if maps is None:
        return []
    padded = tuple(images.tensors.shape[-2:])
    pictures = []
    for i, (h, w) in enumerate(images.sizes.tolist()[:limit]):
        image = denormalize(images.tensors[i, :, :h, :w].float().cpu())
        pictures.append(sparsity_panels(image, {k: v[i] for k, v in maps["maps"].items()}, maps["shapes"],
                                        maps["starts"], maps["valid"][i], padded))
    return pictures
