"""Run a detector (detr_sparse.Predictor) on an image, a folder of images or a video, and write
what it finds into OUT:

- NAME.png: the image with its detections (boxes, class names and scores above --threshold,
  instance masks), and beside it a panoptic model's segments;
- NAME_sparsity.png for a token-sparse model (Sparse DETR, PnP-DETR, a DGE / SViT / SPT
  backbone): where it computed, as tools/visualize_sparsity.py draws it (at the network's
  input size);
- NAME_panoptic.png for a panoptic model: its segment ids in COCO's panoptic PNG encoding;
- predictions.json: per image its file, size and detections (boxes absolute xyxy in its own
  pixels, score, label, class name, category id, masks as COCO RLE) and panoptic segments.

    python tools/demo.py --config out/x/config.yaml --checkpoint out/x/checkpoint.pth \
        --input photo.jpg | photos/ | clip.mp4 --out out/demo [--threshold 0.5] [--batch-size 2] \
        [--annotations instances.json] [--every 10] [--opts k=v ...]

NAME: the image's name (its path under a folder, which is searched recursively); a video's
frames are NAME_<frame>, every --every frame (decoded with PyAV, in requirements.txt)."""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.coco_eval import encode_rle  # noqa: E402
from datasets.coco_panoptic import id_to_rgb  # noqa: E402
from detr_sparse.predictor import Predictor, load_image  # noqa: E402
from engine.checkpoint import CheckpointError  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.visualize import (draw_detections, draw_panoptic, has_sparsity_pictures, side_by_side,  # noqa: E402
                              sparsity_pictures)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


class InputError(ValueError):
    """An input the demo cannot read; one line naming it."""


def video_frames(path: Path, every: int):
    """(frame index, PIL image) of every `every`-th frame of a video, decoded by PyAV."""
    try:
        import av
    except ImportError:
        raise InputError(f"--input {path} is a video: reading it needs PyAV (pip install av), which is not "
                         "installed (torchvision no longer decodes video)") from None
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index % every == 0:
                yield index, frame.to_image()


def inputs(path: Path, every: int = 1):
    """(name, image (a path or a PIL image), record) for each image of --input."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"--input {path}: no image ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder")
        for file in files:
            yield file.relative_to(path).with_suffix("").as_posix(), file, {"file": str(file)}
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        for index, frame in video_frames(path, every):
            yield f"{path.stem}_{index:06d}", frame, {"file": str(path), "frame": index}
    elif path.is_file():
        yield path.stem, path, {"file": str(path)}
    else:
        raise InputError(f"--input {path}: no such file or folder")


def as_uint8(image: torch.Tensor) -> torch.Tensor:
    return image if image.dtype == torch.uint8 else F.to_dtype(image.as_subclass(torch.Tensor), torch.uint8, scale=True)


def record(result: dict, entry: dict) -> dict:
    """One image's entry of predictions.json."""
    h, w = result["image_size"]
    masks = encode_rle(result["masks"]) if "masks" in result else [None] * len(result["labels"])
    detections = [{"box": [round(v, 2) for v in box], "score": round(score, 4), "label": label, "class_name": name,
                   "category_id": cat_id, **({"mask": rle} if rle is not None else {})}
                  for box, score, label, name, cat_id, rle in zip(
                      result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist(),
                      result["class_names"], result["category_ids"], masks)]
    return {**entry, "height": h, "width": w, "detections": detections,
            **({"segments": result["segments"]} if "segments" in result else {})}


def write_outputs(out: Path, name: str, image: torch.Tensor, result: dict, sparsity, predictor) -> dict:
    """The pictures of one image; returns the files written (relative to out)."""
    written = {"picture": f"{name}.png"}
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    picture = draw_detections(image, result, predictor.classes.names, threshold=-1.0)  # already thresholded
    if "panoptic" in result:
        picture = side_by_side([picture, draw_panoptic(image, result["panoptic"])])
        written["panoptic_png"] = f"{name}_panoptic.png"
        Image.fromarray(id_to_rgb(result["panoptic"].numpy())).save(out / written["panoptic_png"])
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(out / written["picture"])
    if sparsity is not None:
        written["sparsity_picture"] = f"{name}_sparsity.png"
        Image.fromarray(sparsity.permute(1, 2, 0).numpy()).save(out / written["sparsity_picture"])
    return written


def run(predictor: Predictor, items, out: Path) -> list[dict]:
    """Predict, draw and record every (name, image, entry) of `items`, a batch at a time."""
    out.mkdir(parents=True, exist_ok=True)
    sparse = has_sparsity_pictures(predictor.model)
    records = []
    items = iter(items)
    while chunk := list(itertools.islice(items, predictor.batch_size)):
        images = [load_image(image) for _, image, _ in chunk]
        batch, sizes = predictor.prepare(images)
        results = predictor.predict_batch(batch, sizes)
        pictures = [None] * len(chunk)
        if sparse:
            with predictor.autocast():
                pictures = sparsity_pictures(predictor.model, batch.to(predictor.device), len(chunk),
                                             ran=True) or pictures
        for (name, _, entry), image, result, sparsity in zip(chunk, images, results, pictures):
            files = write_outputs(out, name, as_uint8(image), result, sparsity, predictor)
            records.append({**record(result, entry), **files})
            print(f"{out / files['picture']}: {len(result['labels'])} detections")
    (out / "predictions.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")  # an image a line
    return records


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", default="", help="a run's checkpoint or an authors' file (random weights without)")
    p.add_argument("--input", required=True, type=Path, help="an image, a folder of images or a video")
    p.add_argument("--out", required=True, type=Path, help="folder for the pictures and predictions.json")
    p.add_argument("--threshold", type=float, default=0.5, help="lowest score of a detection kept")
    p.add_argument("--batch-size", type=int, default=0, help="images per forward pass (default: eval.batch_size)")
    p.add_argument("--annotations", default="", help="a COCO annotation file naming the classes, for a "
                   "checkpoint that does not (an authors' file, an older run)")
    p.add_argument("--every", type=int, default=1, help="a video: every N-th frame")
    p.add_argument("--opts", nargs="*", default=[], help="config overrides, e.g. eval.precision=bf16")
    args = p.parse_args(argv)
    try:
        predictor = Predictor(args.config, args.checkpoint, annotations=args.annotations,
                              score_threshold=args.threshold, batch_size=args.batch_size, opts=args.opts)
        return run(predictor, inputs(args.input, max(args.every, 1)), args.out)
    except (ConfigError, CheckpointError, InputError) as e:
        sys.exit(f"error: {e}")  # one line naming the file or key


if __name__ == "__main__":
    main()
