"""Run logging on rank 0: python logging to the console and `log.txt`, scalars to TensorBoard
and to a JSON-lines file (`log.jsonl`), images to TensorBoard. Other ranks log warnings only."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch


def setup_logging(output_dir: str | Path, is_main: bool) -> logging.Logger:
    root = logging.getLogger("detr_sparse")
    root.handlers.clear()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    root.propagate = False
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    if is_main:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(output_dir) / "log.txt")
        file.setFormatter(fmt)
        root.addHandler(file)
    return root


class RunLogger:
    """Scalars go to TensorBoard and, one JSON object per call, to log.jsonl. A no-op off rank 0."""

    def __init__(self, output_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            self.jsonl = open(Path(output_dir) / "log.jsonl", "a", buffering=1)

    def scalars(self, kind: str, values: dict[str, float], step: int, **extra) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{kind}/{k}", v, step)
        record = {"kind": kind, "step": step, "time": time.time(), **extra, **values}
        self.jsonl.write(json.dumps(record) + "\n")

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """image: (3, H, W) uint8."""
        if self.enabled:
            self.writer.add_image(tag, image, step)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
