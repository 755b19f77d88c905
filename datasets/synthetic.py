"""A synthetic COCO-format detection / instance / panoptic dataset, written to disk.

    python -m datasets.synthetic --out data/synthetic [--train 2000] [--val 200] [--sparse]

Each image is a background of 1-4 wavy bands of "stuff" (sky, grass, water, wall, each with
its own texture family) with 0..max_objects textured "things" on top. A thing's class is its
shape only: colour and texture are drawn independently of the class, so a detector has to
learn shape. Things are drawn in order, later ones occluding earlier ones.

Occlusion rule: a thing whose visible part is under MIN_VISIBLE_FRACTION of its full area or
under MIN_VISIBLE_PIXELS pixels is not drawn at all (decided from the top object down, so
each decision already knows what covers it). Every visible thing pixel is therefore
annotated, and every other pixel belongs to a stuff segment: the panoptic PNGs have no void.

The output is a pure function of the arguments: each image draws from its own numpy
Generator seeded by (seed, split, index), so ``workers`` does not change a single byte.
``meta.json`` is written last; its presence means the folder is complete.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw

# Bump when the generator changes what it draws, so callers comparing meta.json regenerate.
FORMAT_VERSION = 1
SPLITS = ("train2017", "val2017")
JPEG_QUALITY = 90
MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_PIXELS = 16
MIN_OBJECT_SIZE = 8  # diameter of the circle a shape is inscribed in, pixels
SPARSE_MAX_OBJECT_SIZE = 40
SPARSE_MAX_OBJECTS = 3
DEFAULT_SIDES = {False: (256, 320), True: (512, 640)}  # keyed by ``sparse``


def _regular_polygon(n: int, radius: float = 1.0, start: float = -math.pi / 2) -> np.ndarray:
    angles = start + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _regular_polygon(5), _regular_polygon(5, 0.45, -math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)  # alternate outer and inner tips


def _cross(arm: float = 0.32) -> np.ndarray:
    a = arm
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
                     (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)], dtype=float)


# Thing classes: (name, outline, hole or None, (min, max) aspect). Outlines fit the unit circle;
# the aspect squeezes one axis before rotation. Circle and ring keep aspect 1 and the ellipse
# is always clearly elongated, so no two classes can produce the same shape.
THING_SHAPES = [
    ("circle", _regular_polygon(40), None, (1.0, 1.0)),
    ("ellipse", _regular_polygon(40), None, (0.35, 0.6)),
    ("triangle", _regular_polygon(3), None, (0.8, 1.0)),
    ("square", _regular_polygon(4, start=math.pi / 4), None, (0.8, 1.0)),
    ("hexagon", _regular_polygon(6), None, (0.85, 1.0)),
    ("star", _star(), None, (0.85, 1.0)),
    ("cross", _cross(), None, (0.85, 1.0)),
    ("ring", _regular_polygon(40), _regular_polygon(40, 0.55), (1.0, 1.0)),
]
STUFF_NAMES = ["sky", "grass", "water", "wall"]
THING_CATEGORIES = [{"id": i + 1, "name": name, "supercategory": "shape"}
                    for i, (name, *_) in enumerate(THING_SHAPES)]
STUFF_CATEGORIES = [{"id": len(THING_SHAPES) + i + 1, "name": name, "supercategory": "background"}
                    for i, name in enumerate(STUFF_NAMES)]


# ---- textures: float32 (H, W, 3) arrays in [0, 255] ---------------------------------------

def _thing_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random colour pair blended by one of five patterns (solid, stripes, checker, noise,
    gradient); the pattern is a blend factor in [0, 1] so all five share the colour code."""
    c1, c2 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    kind = rng.integers(5)
    yy, xx = np.ogrid[0:h, 0:w]
    angle = rng.uniform(0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)  # coordinate across stripes / gradient
    if kind == 0:
        t = np.zeros((h, w), np.float32)
    elif kind == 1:
        t = (along / rng.uniform(3, 10)) % 1.0 < 0.5
    elif kind == 2:
        cell = int(rng.integers(2, 7))
        t = (xx // cell + yy // cell) % 2
    elif kind == 3:
        t = rng.random((h, w), dtype=np.float32)
    else:
        t = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    t = np.broadcast_to(np.asarray(t, np.float32), (h, w))
    return c1 + t[..., None] * (c2 - c1)


def _jitter(rng, rgb, spread=25.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-spread, spread, 3), 0, 255).astype(np.float32)


def _stuff_texture(rng: np.random.Generator, name: str, h: int, w: int) -> np.ndarray:
    """Each stuff class has its own texture family and colour range, so a stuff region can be
    told apart by appearance; contrast is kept moderate so things stand out from it."""
    yy, xx = np.ogrid[0:h, 0:w]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    if name == "sky":  # vertical gradient, darker blue at the top
        top, bottom = _jitter(rng, (80, 140, 220)), _jitter(rng, (200, 225, 250), 15)
        t = np.broadcast_to(yy / h, (h, w))[..., None]
        return top + t * (bottom - top)
    if name == "grass":  # fine noise mixed with vertical blade streaks
        base = _jitter(rng, (70, 140, 50))
        t = 0.6 * rng.random((h, w), dtype=np.float32) + 0.4 * rng.random((1, w), dtype=np.float32)
        return base * (0.7 + 0.6 * t)[..., None]
    if name == "water":  # horizontal waves bent by a slower wave along x
        base = _jitter(rng, (40, 110, 160))
        f1, f2, phase = rng.uniform(0.15, 0.4), rng.uniform(0.02, 0.06), rng.uniform(0, 2 * math.pi)
        waves = np.sin(yy * f1 + 3 * np.sin(xx * f2 + phase))
        return base * (0.85 + 0.15 * waves)[..., None]
    # wall: bricks in offset rows, each brick a slightly different shade, light mortar lines
    base = _jitter(rng, (150, 70, 50), 30)
    brick_h, brick_w = int(rng.integers(8, 17)), int(rng.integers(16, 33))
    row = (yy // brick_h).astype(int)
    shifted = xx + (row % 2) * (brick_w / 2)
    col = (shifted // brick_w).astype(int)
    shade = rng.uniform(0.8, 1.15, (h // brick_h + 1, w // brick_w + 2)).astype(np.float32)
    tex = base * shade[row, col][..., None]
    mortar = (yy % brick_h < 2) | (shifted % brick_w < 2)
    tex[mortar] = _jitter(rng, (190, 190, 180), 10)
    return tex


# ---- one image ------------------------------------------------------------------------------

def _stuff_layout(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[int]]:
    """(H, W) band index map and the stuff class index of each band: 1-4 distinct classes in
    roughly horizontal bands whose boundaries are sine waves of random amplitude."""
    classes = rng.permutation(len(STUFF_NAMES))[: int(rng.integers(1, len(STUFF_NAMES) + 1))]
    yy, xx = (a.astype(np.float32) for a in np.ogrid[0:h, 0:w])  # float32: runs on every pixel
    tilt = rng.uniform(-0.5, 0.5)
    across = (yy * math.cos(tilt) + xx * math.sin(tilt)) / h  # ~0 at top, ~1 at bottom
    along = (xx * math.cos(tilt) - yy * math.sin(tilt)) / w
    bands = np.zeros((h, w), np.int64)
    for b in np.sort(rng.uniform(0.1, 0.9, len(classes) - 1)):
        amp, freq, phase = rng.uniform(0, 0.08), rng.uniform(0.5, 3), rng.uniform(0, 2 * math.pi)
        bands += across + amp * np.sin(2 * math.pi * freq * along + phase) > b
    return bands, [int(c) for c in classes]


def _place_thing(rng: np.random.Generator, h: int, w: int, size_range) -> dict:
    """A random shape: class, full mask drawn in a crop around it, and where the crop sits."""
    label = int(rng.integers(len(THING_SHAPES)))
    _, outline, hole, (lo, hi) = THING_SHAPES[label]
    diameter = math.exp(rng.uniform(math.log(size_range[0]), math.log(size_range[1])))
    radius = diameter / 2
    cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
    aspect, angle = rng.uniform(lo, hi), rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    x0, y0 = max(int(cx - radius) - 1, 0), max(int(cy - radius) - 1, 0)
    x1, y1 = min(int(cx + radius) + 2, w), min(int(cy + radius) + 2, h)
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    for points, fill in ((outline, 1), (hole, 0)):
        if points is not None:
            xy = (points * [1.0, aspect]) @ rot.T * radius + [cx - x0, cy - y0]
            draw.polygon([tuple(p) for p in xy], fill=fill)
    return {"label": label, "box": (y0, y1, x0, x1), "mask": np.asarray(canvas, bool)}


def _mask_stats(mask: np.ndarray) -> tuple[dict, list[int], int]:
    """Compressed RLE (counts as str, for json), [x, y, w, h] and pixel count of a mask."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [int(v) for v in mask_util.toBbox(rle)]
    area = int(mask_util.area(rle))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}, bbox, area


def _make_image(task: tuple) -> dict:
    """Draws one image, writes its JPEG and panoptic PNG, and returns its annotations
    (everything except the split-wide annotation ids, which the caller numbers)."""
    out, split, image_id, seed, min_size, max_size, max_objects, sparse, min_object = task
    rng = np.random.default_rng([seed, SPLITS.index(split), image_id])
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))

    bands, band_classes = _stuff_layout(rng, h, w)
    image = np.empty((h, w, 3), np.float32)
    for band, cls in enumerate(band_classes):
        region = bands == band
        image[region] = _stuff_texture(rng, STUFF_NAMES[cls], h, w)[region]

    if sparse:
        count = int(rng.integers(1, min(SPARSE_MAX_OBJECTS, max_objects) + 1)) if max_objects else 0
        size_range = (min_object, max(min_object, min(SPARSE_MAX_OBJECT_SIZE, min(h, w))))
    else:
        count = int(rng.integers(0, max_objects + 1))
        size_range = (min_object, max(min_object, min(h, w) / 2))
    things = [_place_thing(rng, h, w, size_range) for _ in range(count)]

    # Top object first: what an object shows is its mask minus everything kept above it.
    covered = np.zeros((h, w), bool)
    kept = []
    for thing in reversed(things):
        y0, y1, x0, x1 = thing["box"]
        visible = thing["mask"] & ~covered[y0:y1, x0:x1]
        if visible.sum() >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * thing["mask"].sum()):
            covered[y0:y1, x0:x1] |= visible
            kept.append((thing, visible))
    kept.reverse()  # back to drawing order, so annotations list objects bottom to top

    # Panoptic ids: stuff segments first (band order), then things; 0 would be void.
    segment_ids = np.zeros((h, w), np.int32)
    segments, annotations = [], []
    for band, cls in enumerate(band_classes):
        region = (bands == band) & ~covered
        if region.any():
            _, bbox, area = _mask_stats(region)
            segments.append({"id": len(segments) + 1, "category_id": STUFF_CATEGORIES[cls]["id"],
                             "area": area, "bbox": bbox, "iscrowd": 0})
            segment_ids[region] = len(segments)
    for thing, visible in kept:
        y0, y1, x0, x1 = thing["box"]
        image[y0:y1, x0:x1][visible] = _thing_texture(rng, y1 - y0, x1 - x0)[visible]
        full = np.zeros((h, w), bool)
        full[y0:y1, x0:x1] = visible
        rle, bbox, area = _mask_stats(full)
        category_id = THING_CATEGORIES[thing["label"]]["id"]
        annotations.append({"category_id": category_id, "bbox": bbox, "area": area,
                            "iscrowd": 0, "segmentation": rle})
        segments.append({"id": len(segments) + 1, "category_id": category_id,
                         "area": area, "bbox": bbox, "iscrowd": 0})
        segment_ids[full] = len(segments)

    name = f"{image_id:012d}"
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        Path(out, split, name + ".jpg"), quality=JPEG_QUALITY)
    rgb = np.stack([segment_ids % 256, segment_ids // 256 % 256, segment_ids // 256**2], axis=-1)
    Image.fromarray(rgb.astype(np.uint8)).save(Path(out, "annotations", f"panoptic_{split}", name + ".png"))
    return {"image": {"id": image_id, "file_name": name + ".jpg", "height": h, "width": w},
            "annotations": annotations,
            "panoptic": {"image_id": image_id, "file_name": name + ".png", "segments_info": segments}}


# ---- the dataset ----------------------------------------------------------------------------

def generation_args(num_train: int = 2000, num_val: int = 200, seed: int = 0, min_size: int | None = None,
                    max_size: int | None = None, max_objects: int = 6, sparse: bool = False,
                    min_object_size: int = MIN_OBJECT_SIZE) -> dict:
    """The arguments with defaults resolved, validated: exactly what meta.json records."""
    lo, hi = DEFAULT_SIDES[bool(sparse)]
    args = {"version": FORMAT_VERSION, "num_train": int(num_train), "num_val": int(num_val),
            "seed": int(seed), "min_size": int(lo if min_size is None else min_size),
            "max_size": int(hi if max_size is None else max_size),
            "max_objects": int(max_objects), "sparse": bool(sparse)}
    if min_object_size != MIN_OBJECT_SIZE:  # recorded only when set, so older folders still match
        args["min_object_size"] = int(min_object_size)
    if not MIN_OBJECT_SIZE <= min_object_size <= args["min_size"] // 2:
        raise ValueError(f"need {MIN_OBJECT_SIZE} <= min_object_size <= min_size / 2, "
                         f"got {min_object_size}")
    if args["num_train"] < 0 or args["num_val"] < 0 or args["max_objects"] < 0:
        raise ValueError(f"image and object counts must be >= 0, got {args}")
    if not 2 * MIN_OBJECT_SIZE <= args["min_size"] <= args["max_size"]:
        raise ValueError(f"need {2 * MIN_OBJECT_SIZE} <= min_size <= max_size, "
                         f"got min_size={args['min_size']}, max_size={args['max_size']}")
    if args["seed"] < 0:
        raise ValueError(f"seed must be >= 0 (numpy seeds), got {args['seed']}")
    return args


def matches(out: str | Path, **kwargs) -> bool:  # kwargs: those of generation_args
    """Whether ``out`` holds a complete dataset generated with these arguments."""
    meta = Path(out) / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()) == generation_args(**kwargs)


def _dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")))


def generate(out: str | Path, num_train: int = 2000, num_val: int = 200, seed: int = 0,
             min_size: int | None = None, max_size: int | None = None, max_objects: int = 6,
             sparse: bool = False, workers: int = 1, min_object_size: int = MIN_OBJECT_SIZE) -> Path:
    """Writes the dataset to ``out`` in the COCO layout and returns ``out`` as a Path.

    Image sides are drawn in [min_size, max_size] (default 256..320, or 512..640 when
    ``sparse``); images hold 0..max_objects things (1..min(3, max_objects) things of 8-40 px
    when ``sparse``). Files of an earlier run that this one does not rewrite are left alone."""
    args = generation_args(num_train, num_val, seed, min_size, max_size, max_objects, sparse,
                           min_object_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the folder is incomplete until we finish

    tasks = []
    for split, count in zip(SPLITS, (args["num_train"], args["num_val"])):
        (out / split).mkdir(exist_ok=True)
        (out / "annotations" / f"panoptic_{split}").mkdir(parents=True, exist_ok=True)
        tasks += [(str(out), split, i, args["seed"], args["min_size"], args["max_size"],
                   args["max_objects"], args["sparse"], min_object_size)
                  for i in range(1, count + 1)]
    if workers > 1 and len(tasks) > 1:
        # fork, where there is one: spawned workers would re-import the datasets package
        # (and torch with it) only to run numpy and PIL code.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ctx.Pool(workers) as pool:
            records = pool.map(_make_image, tasks, chunksize=max(1, len(tasks) // (8 * workers)))
    else:
        records = [_make_image(t) for t in tasks]

    thing_ids = {c["id"] for c in THING_CATEGORIES}
    panoptic_categories = [{**c, "isthing": int(c["id"] in thing_ids)}
                           for c in THING_CATEGORIES + STUFF_CATEGORIES]
    info = {"description": "detr_sparse synthetic shapes", "version": str(FORMAT_VERSION)}
    for split in SPLITS:
        split_records = [r for r, t in zip(records, tasks) if t[1] == split]
        images = [r["image"] for r in split_records]
        annotations = []
        for r in split_records:
            for ann in r["annotations"]:
                annotations.append({"id": len(annotations) + 1, "image_id": r["image"]["id"], **ann})
        _dump({"info": info, "licenses": [], "images": images, "annotations": annotations,
               "categories": THING_CATEGORIES}, out / "annotations" / f"instances_{split}.json")
        _dump({"info": info, "licenses": [], "images": images,
               "annotations": [r["panoptic"] for r in split_records],
               "categories": panoptic_categories}, out / "annotations" / f"panoptic_{split}.json")
    _dump(args, out / "meta.json")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="dataset root to write")
    parser.add_argument("--train", type=int, default=2000, help="number of training images")
    parser.add_argument("--val", type=int, default=200, help="number of validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=None, help="smallest image side (px)")
    parser.add_argument("--max-size", type=int, default=None, help="largest image side (px)")
    parser.add_argument("--max-objects", type=int, default=6, help="most things per image")
    parser.add_argument("--sparse", action="store_true",
                        help="large images (512-640 px) with 1-3 small (8-40 px) things")
    parser.add_argument("--min-object-size", type=int, default=MIN_OBJECT_SIZE,
                        help="smallest thing diameter (px)")
    parser.add_argument("--workers", type=int, default=1, help="processes (output is the same)")
    a = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = generate(a.out, a.train, a.val, a.seed, a.min_size, a.max_size, a.max_objects,
                       a.sparse, a.workers, a.min_object_size)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {a.train} train + {a.val} val images to {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
