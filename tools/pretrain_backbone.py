"""Pretrain a ResNet backbone on the training set itself, for when no ImageNet weights are
available (offline machines, the synthetic data). Two tasks:
- crops (default): classify every ground-truth object, cropped with some context and resized
  to a small square (roi_align), from the pooled last feature map. Crops are tiny, so many
  epochs fit in a few minutes.
- dense: every cell of the last feature map predicts the class of the smallest ground-truth
  box that contains its centre, or background.
Both teach the backbone what the objects look like, which DETR's set loss alone learns very
slowly from scratch.

    python tools/pretrain_backbone.py --config configs/detr_r18_synthetic.yaml \
        --task crops --epochs 30 --out out/backbone_r18_synthetic.pth

The weights are saved under torchvision's names; point `model.backbone.pretrained` at them.
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
from torchvision.ops import roi_align

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import build_dataset, collate_fn  # noqa: E402
from datasets.coco import CocoDetection  # noqa: E402
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
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

    def forward(self, images) -> torch.Tensor:
        return self.head(self.backbone(images.tensors)[self.name])


def dense_labels(targets: list[dict], mask: torch.Tensor, shape: tuple[int, int], stride: int,
                 num_classes: int) -> torch.Tensor:
    """(B, h, w) int64: the label of the smallest box holding each cell centre, num_classes for
    background, -100 (ignored) on padding."""
    h, w = shape
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * stride
    out = torch.full((len(targets), h, w), num_classes, dtype=torch.int64)
    for i, t in enumerate(targets):
        boxes = t["boxes"]
        order = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).argsort(descending=True)
        for box, label in zip(boxes[order], t["labels"][order]):  # smaller boxes drawn last win
            inside_y = (ys >= box[1]) & (ys <= box[3])
            inside_x = (xs >= box[0]) & (xs <= box[2])
            out[i][inside_y[:, None] & inside_x[None, :]] = label
    out[mask_to_feature(mask, shape)] = -100
    return out


class CropClassifier(nn.Module):
    """backbone -> global average pool of the last map -> linear classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.name = backbone.out_features[-1]
        self.head = nn.Linear(backbone.channels[self.name], num_classes)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(crops)[self.name].mean((2, 3)))


def object_crops(dataset, size: int, context: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Every annotated object of `dataset` (un-augmented), its box grown by `context` on each
    side, resampled to size x size and normalised as in training."""
    raw = CocoDetection(dataset.img_folder, dataset.ann_file)  # no transforms: [0, 1] pixels
    crops, labels = [], []
    for i in range(len(raw)):
        image, target = raw[i]
        if not len(target["boxes"]):
            continue
        boxes = target["boxes"]
        grow = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2) * context * torch.tensor([-1, -1, 1, 1])
        crops.append(roi_align(image[None], [boxes + grow], size, aligned=True))
        labels.append(target["labels"])
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (torch.cat(crops) - mean) / std, torch.cat(labels)


def _one_cycle(model, lr: float, total_steps: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=total_steps)


def train_crops(model, crops, labels, epochs: int, batch: int, lr: float) -> None:
    steps = len(crops) // batch
    optimizer, scheduler = _one_cycle(model, lr, epochs * steps)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(crops))
        correct = loss_sum = 0.0
        for step in range(steps):
            idx = order[step * batch:(step + 1) * batch]
            x = crops[idx]
            flip = torch.rand(len(idx)) < 0.5
            x[flip] = x[flip].flip(-1)
            logits = model(x)
            loss = F.cross_entropy(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item()
            correct += (logits.argmax(1) == labels[idx]).sum().item()
        log.info("epoch %d: loss %.4f, accuracy %.3f (%.0f s)", epoch, loss_sum / steps,
                 correct / (steps * batch), time.perf_counter() - start)


def train_dense(model, dataset, cfg, epochs: int, batch: int, lr: float) -> None:
    k = dataset.num_classes
    # background covers most cells; down-weighting it keeps the object classes in view
    class_weight = torch.ones(k + 1)
    class_weight[-1] = 0.2
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers, collate_fn=collate_fn,
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    optimizer, scheduler = _one_cycle(model, lr, epochs * len(loader))
    start = time.perf_counter()
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        model.train()
        loss_sum, correct, seen = 0.0, 0.0, 0
        for images, targets in loader:
            logits = model(images)
            labels = dense_labels(targets, images.mask, logits.shape[-2:], model.stride, k)
            loss = F.cross_entropy(logits, labels, class_weight, ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            on_object = (labels >= 0) & (labels < k)
            loss_sum += loss.item()
            correct += (logits.argmax(1)[on_object] == labels[on_object]).sum().item()
            seen += int(on_object.sum())
        log.info("epoch %d: loss %.4f, accuracy on object cells %.3f (%.0f s)", epoch,
                 loss_sum / len(loader), correct / max(seen, 1), time.perf_counter() - start)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="its data and model.backbone sections are used")
    p.add_argument("--out", required=True, help="where to write the backbone weights")
    p.add_argument("--task", choices=["crops", "dense"], default="crops")
    p.add_argument("--crop-size", type=int, default=48)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--opts", nargs="*", default=[])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.config, args.opts)
    seed_everything(cfg.train.seed)
    ensure_synthetic_data(cfg.data, DistInfo())
    dataset = build_dataset(cfg.data, "train")
    bb_cfg = cfg.model.backbone
    # the weights to pretrain start from scratch whatever the config points at
    backbone = build_backbone(OmegaConf.merge(bb_cfg, {"pretrained": ""}), tuple(bb_cfg.out_features))
    if args.task == "crops":
        crops, labels = object_crops(dataset, args.crop_size)
        log.info("%d object crops of %d px", len(crops), args.crop_size)
        train_crops(CropClassifier(backbone, dataset.num_classes), crops, labels, args.epochs,
                    args.batch, args.lr)
    else:
        train_dense(DenseClassifier(backbone, dataset.num_classes), dataset, cfg, args.epochs,
                    args.batch, args.lr)
    path = save_checkpoint(backbone.torchvision_state_dict(), args.out)
    log.info("wrote %s", path)
    return path


if __name__ == "__main__":
    main()
