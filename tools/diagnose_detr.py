"""Does a DETR checkpoint look at its input? Prints, on a batch of val images, how much the
predictions and the encoder memory vary across images versus across queries / positions.
A model stuck at the dataset prior predicts the same boxes for every image.

    python tools/diagnose_detr.py --config out/x/config.yaml --checkpoint out/x/checkpoint.pth
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import build_dataset, collate_fn  # noqa: E402
from detr_sparse import build_model  # noqa: E402
from engine.checkpoint import load_checkpoint, load_model_state  # noqa: E402
from engine.config import load_config  # noqa: E402


@torch.no_grad()
def diagnose(model, images) -> dict[str, float]:
    """Standard deviations over images and over queries / positions (means over the rest)."""
    model.eval()
    src, mask, pos = model.tokens(images)
    memory = model.transformer.encode(src, mask, pos)
    out = model.forward_raw(images)
    boxes = out["pred_boxes"]
    object_prob = out["pred_logits"].softmax(-1)[..., :-1].max(-1).values
    return {"box_std_over_images": boxes.std(0).mean().item(),
            "box_std_over_queries": boxes.std(1).mean().item(),
            "input_std_over_images": src.std(0).mean().item(),
            "input_std_over_positions": src.std(1).mean().item(),
            "memory_std_over_images": memory.std(0).mean().item(),
            "memory_std_over_positions": memory.std(1).mean().item(),
            "max_object_probability": object_prob.max().item()}


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", type=int, default=8, help="val images in the batch")
    p.add_argument("--opts", nargs="*", default=[])
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.opts)
    dataset = build_dataset(cfg.data, "val")
    model = build_model(cfg.model, cfg.model.num_classes or dataset.num_classes)
    load_model_state(model, load_checkpoint(args.checkpoint)["model"], args.checkpoint)
    # images of one size, so padding does not make them differ
    images, _ = collate_fn([dataset[i] for i in range(min(args.images, len(dataset)))])
    stats = diagnose(model, images)
    for k, v in stats.items():
        print(f"{k:28s} {v:.4g}")
    return stats


if __name__ == "__main__":
    main()
