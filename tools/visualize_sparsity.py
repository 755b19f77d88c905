"""Where does a token-sparse model spend its computation? For the first val images, writes
DIR/sparsity_{i}.png, panels side by side: the detections (red, ground truth green), then the
model's token maps: Sparse DETR's updated tokens (red) and decoder cross-attention map, DAM
(yellow-orange); PnP-DETR's poll scores (red) and computation density (yellow-orange: 1 at
polled tokens, the summed pool weights elsewhere). Every level of a map is upsampled to the
image and the levels are averaged. Prints, per image, Sparse DETR's kept share per level and
the share of the DAM-referenced tokens (the image's top kept-count tokens by DAM) it kept, or
PnP-DETR's polled share. A detector on a DGE backbone (Mask R-CNN, Panoptic FPN) gets the
granularity each region chose in the pictured blocks (red finest: 16 queries, yellow 4, blue
coarsest: 1; PVT: the first block of every stage, DeiT: layers 1, 4, 8 and 12), with the
image's backbone cost share beta and granularity shares over all blocks. A detector on an
SViT backbone gets its token usage (the redder, the more gated blocks a patch went through),
with the image's keep share per gated block; one on an SPT its selections (the redder, the more
SPA blocks selected a stride-16 token; stage 4's selections count over their 2 x 2 cells), with
the image's selected share per SPA stage and the share of the tokens inside its boxes selected.

    python tools/visualize_sparsity.py --config out/x/config.yaml --checkpoint out/x/checkpoint.pth \
        --out out/x/sparsity [--num-images 4] [--ratio 0.1] [--opts k=v ...]

Without --checkpoint the model keeps its random initial weights."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import build_dataset, collate_fn  # noqa: E402
from detr_sparse.postprocess import postprocess_sigmoid, postprocess_softmax  # noqa: E402
from detr_sparse.sparsity.sparse_detr import binarize_top, reference_correlation  # noqa: E402
from engine.checkpoint import build_eval_model  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.distributed import resolve_device  # noqa: E402
from engine.train import to_cpu  # noqa: E402
from engine.visualize import (backbone_panels, denormalize, draw_detections, has_backbone_pictures,  # noqa: E402
                              side_by_side, sparsity_maps, token_overlays)


def level_shares(kept: torch.Tensor, valid: torch.Tensor, starts: torch.Tensor) -> list[float]:
    """One image's kept share of the valid tokens of each level; kept, valid (S,) bool."""
    bounds = starts.tolist() + [kept.shape[0]]
    return [(kept[a:b].sum() / valid[a:b].sum().clamp(min=1)).item() for a, b in zip(bounds[:-1], bounds[1:])]


@torch.no_grad()
def visualize_batch(model, images, targets, class_names: list[str], threshold: float) -> list[dict]:
    """Pictures (uint8 (3, h, (1 + maps) * w + gaps)) and statistics of every image of a batch:
    the kept share per level and the share of DAM-referenced tokens kept (Sparse DETR), or the
    polled share (PnP-DETR)."""
    maps = sparsity_maps(model, images)
    out = maps["out"]
    postprocess = postprocess_softmax if "sampled" in out else postprocess_sigmoid
    predictions = postprocess(out, images.sizes)
    padded = tuple(images.tensors.shape[-2:])
    valid, shapes, starts = maps["valid"], maps["shapes"], maps["starts"]
    if "kept" in maps["maps"]:
        kept = maps["maps"]["kept"].bool()
        referenced = binarize_top(maps["maps"]["DAM"], maps["counts"], ~valid)
    rows = []
    for i, (h, w) in enumerate(images.sizes.tolist()):
        image = denormalize(images.tensors[i, :, :h, :w].float().cpu())
        prediction = {k: to_cpu(v) for k, v in predictions[i].items()}
        detections = draw_detections(image, prediction, class_names, threshold, targets[i])
        panels = token_overlays(image, {k: v[i] for k, v in maps["maps"].items()}, shapes, starts, valid[i], padded)
        row = {"picture": side_by_side([detections, *panels]), "image_id": targets[i]["image_id"], "size": [h, w]}
        if "kept" in maps["maps"]:
            corr = reference_correlation(referenced[i:i + 1], kept[i:i + 1], ~valid[i:i + 1], starts, shapes)
            row.update({"kept": (kept[i].sum() / valid[i].sum()).item(),
                        "kept_levels": level_shares(kept[i], valid[i], starts),
                        "dam_in_kept": corr[-1].item(), "dam_in_kept_levels": corr[:-1].tolist()})
        else:
            polled = out["sampled"].polled.counts[i].item()
            row.update({"polled": polled / valid[i].sum().item()})
        rows.append(row)
    return rows


@torch.no_grad()
def visualize_backbone_batch(model, images, targets, class_names: list[str], threshold: float) -> list[dict]:
    """A detector on a token-sparse backbone: the detections, then the backbone's panels
    (DGE: the granularity of its pictured blocks, red finest, yellow middle, blue coarsest,
    with each image's cost share beta and granularity shares over all blocks; SViT: the token
    usage, with each image's keep share per gated block; SPT: the selection count, with each
    image's selected shares)."""
    predictions = model(images)
    backbone = model.backbone
    dge = hasattr(backbone, "granularity_maps")
    if hasattr(backbone, "selection_usage"):
        # the instances the detector trains on (things, not crowd): the selection labels' union
        on_device = [{k: v.to(images.tensors.device) for k, v in t.items() if torch.is_tensor(v)} for t in targets]
        objects = [{"boxes": t["boxes"][model.instance_rows(t)] if hasattr(model, "instance_rows") else t["boxes"]}
                   for t in on_device]
        spt = {k: v.tolist() for k, v in backbone.image_shares(objects).items()}
    elif dge:
        betas, grains = backbone.image_shares()
        blocks = [m[0] for m in backbone.granularity_maps()]
    else:
        shares = backbone.image_keep_shares()  # (L, B)
    rows = []
    for i, (h, w) in enumerate(images.sizes.tolist()):
        image = denormalize(images.tensors[i, :, :h, :w].float().cpu())
        prediction = {k: to_cpu(v) for k, v in predictions[i].items()}
        row = {"picture": side_by_side([draw_detections(image, prediction, class_names, threshold, targets[i]),
                                        *backbone_panels(backbone, i, image)]),
               "image_id": targets[i]["image_id"], "size": [h, w]}
        if hasattr(backbone, "selection_usage"):
            row.update({k: v[i] for k, v in spt.items()})
        else:
            row.update({"blocks": blocks, "beta": betas[i].item(), "grains": grains[i].tolist()} if dge else
                       {"keep_shares": shares[:, i].tolist()})
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", default="", help="weights to load (default: random initial weights)")
    p.add_argument("--num-images", type=int, default=4, help="first val images to draw")
    p.add_argument("--ratio", type=float, default=None,
                   help="Sparse DETR's rho or PnP-DETR's poll ratio to run at (default: the model's)")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--opts", nargs="*", default=[], help="config overrides")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.opts)
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.data, "val")
    model = build_eval_model(cfg.model, dataset.num_classes, args.checkpoint, device, getattr(dataset, "is_thing", None))
    on_backbone = has_backbone_pictures(model)
    if not hasattr(model, "token_maps") and not on_backbone:
        p.error(f"model.name '{cfg.model.name}' has no token maps: use a sparse_detr, pnp_detr, *_dge, *_svit "
                "or spt_* backbone config")
    if args.ratio is not None:
        setattr(model, "rho" if hasattr(model, "rho") else "poll_ratio", args.ratio)
    if getattr(model, "rho", 1) <= 0:
        p.error(f"rho is {model.rho}: the dense encoder keeps no token selection to draw "
                "(set --ratio or model.sparse.rho > 0)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    count, batch = min(args.num_images, len(dataset)), max(cfg.eval.batch_size, 1)
    rows = []
    for first in range(0, count, batch):
        images, targets = collate_fn([dataset[i] for i in range(first, min(first + batch, count))])
        draw = visualize_backbone_batch if on_backbone else visualize_batch
        rows += draw(model, images.to(device), targets, list(dataset.cat_names), cfg.eval.vis_score_threshold)
    for i, row in enumerate(rows):
        row["path"] = str(out / f"sparsity_{i}.png")
        Image.fromarray(row.pop("picture").permute(1, 2, 0).numpy()).save(row["path"])
        head = f"{row['path']}: image {row['image_id']} {row['size'][0]}x{row['size'][1]}"
        if "beta" in row:
            finest, middle, coarsest = row["grains"]
            print(f"{head} backbone cost share {row['beta']:.3f}, regions finest {finest:.3f} middle "
                  f"{middle:.3f} coarsest {coarsest:.3f} (panels: {', '.join(row['blocks'])})")
            continue
        if "object_selected" in row:
            stages = " ".join(f"{k.split('_')[1]} {v:.3f}" for k, v in row.items() if k.startswith("select_"))
            print(f"{head} selected {stages}; object tokens selected {row['object_selected']:.3f}")
            continue
        if "keep_shares" in row:
            print(f"{head} keep shares of the gated blocks {' '.join(f'{v:.3f}' for v in row['keep_shares'])}")
            continue
        if "polled" in row:
            print(f"{head} polled {row['polled']:.3f}")
            continue
        levels = " ".join(f"{s:.3f}" for s in row["kept_levels"])
        dam_levels = " ".join(f"{s:.3f}" for s in row["dam_in_kept_levels"])
        print(f"{head} kept {row['kept']:.3f} (levels {levels}) "
              f"DAM-referenced kept {row['dam_in_kept']:.3f} (levels {dam_levels})")
    return rows


if __name__ == "__main__":
    main()
