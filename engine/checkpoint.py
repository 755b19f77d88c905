"""Checkpoints: written atomically (temporary file in the same folder, fsync, rename), with
everything needed to continue a run exactly: model, optimizer, scheduler, grad scaler,
epoch, iteration, position in the epoch, resolved config and every rank's RNG states.

A run keeps its last K checkpoints as output_dir/checkpoint_<iteration>.pth, and
output_dir/checkpoint.pth links to the newest. Resuming tries the newest first and falls back
to older ones, with a warning, when a file cannot be read."""
from __future__ import annotations

import argparse
import logging
import os
import random
import re
import tempfile
import zipfile
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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the file and why."""


def _reason(e: BaseException) -> str:
    """Why torch.load failed, in one short line (its own message spans lines)."""
    text = str(e)
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+) was not", text)
    if unsafe:
        return f"holds a pickled {unsafe.group(1)}, which safe (weights_only) loading refuses"
    found = re.search(r"WeightsUnpickler error: (.+)", text)
    line = found.group(1) if found else f"{type(e).__name__}: {(text.strip().splitlines() or [''])[0]}"
    line = "".join(c if c.isprintable() else "?" for c in line)
    return "corrupt (" + (line if len(line) <= 120 else line[:117] + "...") + ")"


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint at `path` (a dict with at least "model"; an authors' bare state dict
    becomes {"model": it}, an authors' mmdet one ({"meta", "state_dict"}) {"model": its state
    dict, "meta"}). CheckpointError, one line naming the file and the reason, when it is
    missing, truncated, corrupt or not one."""
    from detr_sparse.official import is_official

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not found")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive: a zip header without the archive's end was cut short
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path}: truncated ({path.stat().st_size} bytes; the "
                              "zip archive's end is missing: was it copied or written completely?)")
    try:
        # weights_only: checkpoints hold only tensors and plain containers, never pickled code;
        # the authors' checkpoints also hold their argparse arguments (plain values)
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if head != b"PK\x03\x04":
            raise CheckpointError(f"checkpoint {path}: not a PyTorch checkpoint (no zip archive, "
                                  "nor a legacy torch file)") from e
        raise CheckpointError(f"checkpoint {path}: {_reason(e)}") from e
    if isinstance(state, dict) and "model" not in state and is_official(state):
        state = {"model": state}  # an authors' bare state dict
    elif isinstance(state, dict) and "model" not in state and is_official(state.get("state_dict") or {}):
        state = {"model": state["state_dict"], "meta": state.get("meta")}  # mmdet's (uzh-rpg/svit)
    if not isinstance(state, dict) or "model" not in state:
        what = f"keys {sorted(state)[:6]}" if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path}: not a detr_sparse checkpoint (no 'model' entry; {what})")
    return state


def load_model_state(model: torch.nn.Module, state_dict: dict, source: str, strict: bool = True):
    """Load weights, naming missing and unexpected keys; strict raises on either."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        msg = f"{source}: missing keys {missing}; unexpected keys {unexpected}"
        if strict:
            raise CheckpointError(msg)
        log.warning(msg)


def load_model_weights(model: torch.nn.Module, state: dict, source: str, strict: bool = True,
                       categories: list[int] | None = None, allow_official: bool = True) -> None:
    """Load the model weights of a checkpoint read by load_checkpoint: a detr_sparse one as
    it is, an authors' release (detr_sparse.official) converted on the fly, its class heads
    cut to `categories` (the category id of each class; None: COCO's). strict as in
    load_model_state. allow_official=False (resuming a run, which needs a detr_sparse training
    checkpoint): an authors' file is a CheckpointError saying where it can be used."""
    from detr_sparse.official import ConversionError, convert_state_dict, detect_layout, is_official

    if not is_official(state["model"]):
        load_model_state(model, state["model"], source, strict)
        return
    if not allow_official:
        layout = detect_layout(state["model"])
        use = (f"train a detector from it with model.backbone.pretrained={source} or model.weights={source}"
               if layout.backbone_only else f"evaluate it with --eval --resume {source}, start from its weights "
               f"with model.weights={source}")
        raise CheckpointError(f"checkpoint {source}: the authors' {layout.describe()} checkpoint, not a detr_sparse "
                              f"training checkpoint to resume: {use}, or tools/convert_checkpoint.py it")
    try:
        converted = convert_state_dict(state["model"], model, categories, strict=strict, source=str(source),
                                       args=state.get("args"))
    except ConversionError as e:
        raise CheckpointError(f"checkpoint {e}") from e
    log.info("%s: the authors' %s checkpoint, converted", source, converted.layout.describe())
    load_model_state(model, converted.state_dict, source, strict)


def checkpoint_name(iteration: int) -> str:
    return f"checkpoint_{iteration:09d}.pth"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The numbered checkpoints of a run, newest (highest iteration) first."""
    return sorted(Path(output_dir).glob("checkpoint_*[0-9].pth"), reverse=True)


def save_numbered(state: dict, output_dir: str | Path, iteration: int, keep: int) -> Path:
    """Save as checkpoint_<iteration>.pth, point checkpoint.pth at it, then delete all but the
    `keep` newest numbered files (and temporary files a killed writer left behind)."""
    out = Path(output_dir)
    path = save_checkpoint(state, out / checkpoint_name(iteration))
    link = out / f".{LAST}.link"
    link.unlink(missing_ok=True)
    link.symlink_to(path.name)
    os.replace(link, out / LAST)  # the link switches atomically too
    for old in list_checkpoints(out)[max(keep, 1):]:
        old.unlink(missing_ok=True)
    for tmp in out.glob("checkpoint*.pth.*.tmp"):
        tmp.unlink(missing_ok=True)
    return path


def load_latest(output_dir: str | Path) -> tuple[Path, dict] | None:
    """(path, state) of the newest readable checkpoint of a run, or None when there is none.
    An unreadable file (truncated by a crash, corrupt) is skipped with a warning."""
    candidates = list_checkpoints(output_dir)
    last = Path(output_dir) / LAST
    if not candidates and last.is_file():  # a single checkpoint.pth (older runs, copies)
        candidates = [last]
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            log.warning("%s; falling back to the previous checkpoint", e)
    if candidates:
        raise CheckpointError(f"{output_dir}: none of the checkpoints {[p.name for p in candidates]} "
                           "is readable")
    return None


COCO_PANOPTIC_THINGS, COCO_PANOPTIC_STUFF = 80, 53  # COCO panoptic labels: the things first


def evaluation_weights(state: dict) -> dict:
    """The checkpoint as evaluation reads it: a run that kept a weight average (train.ema,
    AveragedModel's "module." keys) gives the average as its "model", as its evaluations did."""
    if "ema" not in state:
        return state
    return {**state, "model": {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}}


def build_eval_model(model_cfg, num_classes: int, checkpoint: str, device,
                     is_thing: list[bool] | None = None) -> torch.nn.Module:
    """The configured detector on `device` in eval mode, with the weights of `checkpoint` (its
    `evaluation_weights`; "" keeps the random initial weights): what the tools measure and draw. is_thing: the
    dataset's thing / stuff split for a panoptic model; without it (benchmarks without
    data) COCO panoptic's 80 things + 53 stuff classes stand in, a DETR checkpoint bringing
    its own split (a model buffer). A checkpoint of this project's training names its classes
    (and their split): unless the config sets model.num_classes, their count and split are
    used."""
    from detr_sparse import build_model

    state = load_checkpoint(checkpoint) if checkpoint else None
    num_classes = model_cfg.num_classes or num_classes
    if state is not None and "classes" in state:  # what the run was trained on
        stored = state["classes"]
        num_classes = model_cfg.num_classes or len(stored["names"])  # training's rule (Trainer)
        if is_thing is None and len(stored["is_thing"]) == num_classes:
            is_thing = list(stored["is_thing"])
    if is_thing is None and (model_cfg.panoptic.enabled or model_cfg.name == "panoptic_fpn"):
        num_classes = COCO_PANOPTIC_THINGS + COCO_PANOPTIC_STUFF
        is_thing = [i < COCO_PANOPTIC_THINGS for i in range(num_classes)]
    torch.manual_seed(0)  # random weights (benchmarks, a tool without --checkpoint): the same every run
    model = build_model(model_cfg, num_classes, is_thing).to(device).eval()
    if state is not None:
        load_model_weights(model, evaluation_weights(state), checkpoint)
    return model
