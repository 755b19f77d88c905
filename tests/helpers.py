"""Shared test constants and config overrides (fixtures live in conftest.py)."""
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = ["model.backbone.name=resnet18", "model.backbone.norm=gn", "model.backbone.lr=1e-4",
              "model.num_queries=8", "model.transformer.hidden_dim=64", "model.transformer.nheads=4",
              "model.transformer.enc_layers=1", "model.transformer.dec_layers=2",
              "model.transformer.dim_feedforward=128"]


def tiny_overrides(data_root, output_dir, **extra) -> list[str]:
    """A tiny DETR on the tiny synthetic set, one process, CPU."""
    opts = TINY_MODEL + [
        f"data.root={data_root}", f"output_dir={output_dir}", "data.train_scales=[64,80]",
        "data.max_size=128", "data.crop_resize_scales=[64]", "data.crop_size=[48,64]",
        "data.val_size=80", "data.num_workers=0", "train.batch_size=2", "eval.batch_size=2",
        "train.log_every=1", "train.lr=1e-4", "device=cpu"]
    return opts + [f"{k}={v}" for k, v in extra.items()]


def train_losses(out) -> list[float]:
    """The loss of every logged training step of a run (log.jsonl)."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def checkpoint_model(out) -> dict:
    """The model weights of a run's newest checkpoint."""
    return torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]

# A tiny Deformable DETR (3 backbone levels + 0 extra by default, 2 sampling points)
TINY_DEFORMABLE = ["model.name=deformable_detr", "model.backbone.name=resnet18",
                   "model.backbone.norm=gn", "model.backbone.out_features=[res3,res4,res5]",
                   "model.num_queries=10", "model.transformer.hidden_dim=64",
                   "model.transformer.nheads=4", "model.transformer.enc_layers=1",
                   "model.transformer.dec_layers=2", "model.transformer.dim_feedforward=64",
                   "model.transformer.num_feature_levels=3", "model.transformer.enc_n_points=2",
                   "model.transformer.dec_n_points=2", "model.loss.cls_weight=2",
                   "model.loss.cost_class=2"]
