"""Pretrain a backbone (ResNet, PVT, ViT) on the training set itself, for when no ImageNet weights are
available (offline machines, the synthetic data): every cell of the last feature map
predicts the class of the smallest ground-truth box that contains its centre, or background
(with a panoptic dataset: of the thing or stuff segment under its centre).
This teaches the backbone what the objects look like in context, which DETR's set loss alone
learns very slowly from scratch. (Classifying object crops instead trains fast but does not
carry over: 99.6% on crops, 18% for a linear probe on the same objects in full images.)

    python tools/pretrain_backbone.py --config configs/detr_r18_synthetic.yaml \
        --out out/backbone_r18_synthetic.pth

The weights are saved under torchvision's names (ResNet) or the backbone's own (PVT, ViT; a
DGE backbone built on them loads them too, its routers fresh); point
`model.backbone.pretrained` at them.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import build_dataset, collate_fn  # noqa: E402
from detr_sparse.backbones import build_backbone  # noqa: E402
from detr_sparse.detr import mask_to_feature  # noqa: E402
from engine.checkpoint import save_checkpoint  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.distributed import DistInfo  # noqa: E402
from engine.trainer import ensure_synthetic_data, seed_everything  # noqa: E402

log = logging.getLogger("detr_sparse.pretrain")


class DenseClassifier(nn.Module):
    """backbone -> last feature map -> 1x1 convolution to K + 1 (background) logits per cell."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.name = backbone.out_features[-1]
        self.stride = backbone.strides[self.name]
        self.head = nn.Conv2d(backbone.channels[self.name], num_classes + 1, kernel_size=1)

    def forward(self, images) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> logits, and the backbone's own losses and statistics in training (a DGE
        backbone's budget loss, beta and granularity shares), else {}."""
        # a transformer backbone that takes them sees each image's size in the padded batch
        kwargs = {"sizes": images.sizes.tolist()} if getattr(self.backbone, "takes_sizes", False) else {}
        if self.training and hasattr(self.backbone, "forward_with_losses"):
            maps, extra = self.backbone.forward_with_losses(images.tensors, [], **kwargs)
            return self.head(maps[self.name]), extra
        return self.head(self.backbone(images.tensors, **kwargs)[self.name]), {}


def dense_labels(targets: list[dict], mask: torch.Tensor, shape: tuple[int, int], stride: int,
                 num_classes: int) -> torch.Tensor:
    """(B, h, w) int64: the label of the smallest region holding each cell centre, num_classes
    for background, -100 (ignored) on padding. A region is a target's mask when it has masks
    (panoptic data: things and stuff, the pixel at the centre decides), else its box."""
    h, w = shape
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * stride
    out = torch.full((len(targets), h, w), num_classes, dtype=torch.int64)
    for i, t in enumerate(targets):
        boxes = t["boxes"]
        order = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).argsort(descending=True)
        if "masks" in t:
            masks = t["masks"]
            rows = ys.long().clamp(max=masks.shape[-2] - 1)
            cols = xs.long().clamp(max=masks.shape[-1] - 1)
            inside = masks[order][:, rows][:, :, cols].bool()
        else:
            b = boxes[order]
            inside_y = (ys >= b[:, 1:2]) & (ys <= b[:, 3:4])
            inside_x = (xs >= b[:, 0:1]) & (xs <= b[:, 2:3])
            inside = inside_y[:, :, None] & inside_x[:, None, :]
        for region, label in zip(inside, t["labels"][order]):  # smaller regions drawn last win
            out[i][region] = label
    out[mask_to_feature(mask, shape)] = -100
    return out


def train_dense(model, dataset, cfg, epochs: int, batch: int, lr: float) -> None:
    k = dataset.num_classes
    # background covers most cells; down-weighting it keeps the object classes in view
    class_weight = torch.ones(k + 1)
    class_weight[-1] = 0.2
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers, collate_fn=collate_fn,
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * len(loader))
    start = time.perf_counter()
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        model.train()
        loss_sum, correct, seen, beta = 0.0, 0.0, 0, []
        for images, targets in loader:
            logits, extra = model(images)
            labels = dense_labels(targets, images.mask, logits.shape[-2:], model.stride, k)
            loss = F.cross_entropy(logits, labels, class_weight, ignore_index=-100)
            loss = loss + sum(v for name, v in extra.items() if name.startswith("loss_"))
            if "dge_beta" in extra:
                beta.append(float(extra["dge_beta"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            on_object = (labels >= 0) & (labels < k)
            loss_sum += loss.item()
            correct += (logits.argmax(1)[on_object] == labels[on_object]).sum().item()
            seen += int(on_object.sum())
        log.info("epoch %d: loss %.4f, accuracy on object cells %.3f%s (%.0f s)", epoch,
                 loss_sum / len(loader), correct / max(seen, 1),
                 f", DGE beta {sum(beta) / len(beta):.3f}" if beta else "", time.perf_counter() - start)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="its data and model.backbone sections are used")
    p.add_argument("--out", required=True, help="where to write the backbone weights")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="peak of the one-cycle schedule")
    p.add_argument("--opts", nargs="*", default=[])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.config, args.opts)
    seed_everything(cfg.train.seed)
    ensure_synthetic_data(cfg.data, DistInfo())
    dataset = build_dataset(cfg.data, "train")
    bb_cfg = cfg.model.backbone
    # the weights to pretrain start from scratch whatever the config points at, and every
    # layer trains; a detector with frozen_bn gets batch norm statistics learnt here, as it
    # would from ImageNet weights
    norm = "bn" if bb_cfg.norm == "frozen_bn" else bb_cfg.norm
    backbone = build_backbone(OmegaConf.merge(bb_cfg, {"pretrained": "", "norm": norm, "freeze_at": 0}),
                              tuple(bb_cfg.out_features))
    train_dense(DenseClassifier(backbone, dataset.num_classes), dataset, cfg, args.epochs,
                args.batch, args.lr)
    if hasattr(backbone, "torchvision_state_dict"):  # ResNet: torchvision's names
        state = backbone.torchvision_state_dict()
    else:  # PVT, ViT: our own names, which their loaders read as well (no detection-only layers;
        # a DGE backbone's routers, trained with its budget loss, are kept)
        learnt = getattr(backbone, "learnt_in_pretraining", lambda key: not backbone.fresh(key))
        state = {k: v for k, v in backbone.state_dict().items() if learnt(k)}
    path = save_checkpoint(state, args.out)
    log.info("wrote %s", path)
    return path


if __name__ == "__main__":
    main()
