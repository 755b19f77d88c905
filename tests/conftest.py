"""Shared fixtures: a tiny synthetic COCO dataset and a tiny DETR config on it."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY_MODEL = ["model.backbone.name=resnet18", "model.backbone.norm=gn", "model.backbone.lr=1e-4",
              "model.num_queries=8", "model.transformer.hidden_dim=64", "model.transformer.nheads=4",
              "model.transformer.enc_layers=1", "model.transformer.dec_layers=2",
              "model.transformer.dim_feedforward=128"]


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> Path:
    from datasets.synthetic import generate

    root = tmp_path_factory.mktemp("tiny_coco")
    generate(root, num_train=8, num_val=4, seed=3, min_size=64, max_size=96, max_objects=3)
    return root


def tiny_overrides(data_root, output_dir, **extra) -> list[str]:
    opts = TINY_MODEL + [
        f"data.root={data_root}", f"output_dir={output_dir}", "data.train_scales=[64,80]",
        "data.max_size=128", "data.crop_resize_scales=[64]", "data.crop_size=[48,64]",
        "data.val_size=80", "data.num_workers=0", "train.batch_size=2", "eval.batch_size=2",
        "train.log_every=1", "train.lr=1e-4", "device=cpu"]
    return opts + [f"{k}={v}" for k, v in extra.items()]
