"""Checkpoints: written atomically (temporary file in the same folder, fsync, rename), with
everything needed to continue a run exactly: model, optimizer, scheduler, grad scaler,
epoch, iteration, resolved config and every rank's RNG states."""
from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("detr_sparse.checkpoint")

LAST = "checkpoint.pth"


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


def _from_bytes(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def rng_state() -> dict:
    """This process's RNG states as plain python values (bytes, ints, lists), which both
    all_gather_object and weights_only loading accept."""
    np_state = np.random.get_state()
    state = {
        "torch": _to_bytes(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = [_to_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_from_bytes(state["torch"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_bytes(s) for s in state["cuda"]])


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write `state` to `path` so that `path` is always either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only: checkpoints hold only tensors and plain containers, never pickled code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} is unreadable (truncated or corrupt?): "
                           f"{type(e).__name__}: {e}") from e


def load_model_state(model: torch.nn.Module, state_dict: dict, source: str, strict: bool = True):
    """Load weights, naming missing and unexpected keys; strict raises on either."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        msg = f"{source}: missing keys {missing}; unexpected keys {unexpected}"
        if strict:
            raise RuntimeError(msg)
        log.warning(msg)


def find_last_checkpoint(output_dir: str | Path) -> Path | None:
    path = Path(output_dir) / LAST
    return path if path.is_file() else None
