"""Session fixtures shared by every test folder."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> Path:
    """A tiny synthetic COCO set: 8 train and 4 val images of 64-96 px."""
    from datasets.synthetic import generate

    root = tmp_path_factory.mktemp("tiny_coco")
    generate(root, num_train=8, num_val=4, seed=3, min_size=64, max_size=96, max_objects=3)
    return root


@pytest.fixture(scope="session")
def custom_coco(tiny_coco, tmp_path_factory) -> list[str]:
    """tiny_coco in a layout of its own: both splits' images in one folder, the annotation
    files in another, the categories renamed "shape <name>" -> its data.* overrides."""
    import json
    import shutil

    root = tmp_path_factory.mktemp("custom_coco")
    (root / "pictures").mkdir()
    (root / "labels").mkdir()
    opts = []
    for split, folder in (("train", "train2017"), ("val", "val2017")):
        data = json.loads((tiny_coco / "annotations" / f"instances_{folder}.json").read_text())
        for image in data["images"]:
            shutil.copy(tiny_coco / folder / image["file_name"], root / "pictures" / f"{split}_{image['file_name']}")
            image["file_name"] = f"{split}_{image['file_name']}"
        for category in data["categories"]:
            category["name"] = f"shape {category['name']}"
        (root / "labels" / f"{split}.json").write_text(json.dumps(data))
        opts += [f"data.{split}_images={root / 'pictures'}", f"data.{split}_annotations={root / 'labels' / split}.json"]
    return opts


@pytest.fixture(scope="session")
def tiny_run(custom_coco, tmp_path_factory) -> Path:
    """A tiny DETR trained for one epoch, and evaluated, on custom_coco (data.root names no
    folder, and no synthetic set is generated there): its output folder (checkpoint.pth,
    config.yaml, log.jsonl, eval_epoch1_*)."""
    from engine.config import load_config
    from engine.distributed import DistInfo
    from engine.trainer import Trainer
    from helpers import tiny_overrides

    out = tmp_path_factory.mktemp("tiny_run")
    synthetic = {"data.synthetic.generate": "true", "data.synthetic.num_train": 2, "data.synthetic.num_val": 1}
    trainer = Trainer(load_config(None, tiny_overrides(out / "no_coco_here", out, **{"train.epochs": 1}, **synthetic)
                                  + custom_coco), DistInfo())
    trainer.train()
    trainer.close()
    return out


@pytest.fixture(autouse=True)
def _reset_run_logging():
    """setup_logging points the package logger at a run's console and log.txt and stops it
    propagating; undo that after each test, so the next one's caplog sees its records."""
    import logging

    yield
    logger = logging.getLogger("detr_sparse")
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
