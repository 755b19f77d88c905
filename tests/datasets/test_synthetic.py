import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from datasets.synthetic import MIN_VISIBLE_PIXELS, SPLITS, generate, matches

REPO = Path(__file__).resolve().parents[2]
TINY = dict(num_train=6, num_val=4, seed=0, min_size=64, max_size=96, max_objects=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("tiny"), **TINY)


def files(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path; JPEG bytes equal implies pixels equal."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load_json(root: Path, kind: str, split: str) -> dict:
    return json.loads((root / "annotations" / f"{kind}_{split}.json").read_text())


def load_coco(root: Path, split: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(root / "annotations" / f"instances_{split}.json"))


def panoptic_ids(root: Path, split: str, file_name: str) -> np.ndarray:
    rgb = np.asarray(Image.open(root / "annotations" / f"panoptic_{split}" / file_name), np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def mask_bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


# ---- determinism ------------------------------------------------------------------------------

def test_same_seed_gives_identical_files(tiny, tmp_path):
    again = files(generate(tmp_path / "again", **TINY))
    assert again == files(tiny)
    assert any(name.endswith(".jpg") for name in again)


def test_different_seed_gives_different_data(tiny, tmp_path):
    other = generate(tmp_path / "other", **{**TINY, "seed": 1})
    for split in SPLITS:
        assert load_json(other, "instances", split) != load_json(tiny, "instances", split)
    name = "train2017/000000000001.jpg"
    a, b = (np.asarray(Image.open(root / name)) for root in (tiny, other))
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_workers_do_not_change_output(tiny, tmp_path):
    assert files(generate(tmp_path / "pool", **TINY, workers=2)) == files(tiny)


# ---- instances --------------------------------------------------------------------------------

def test_instances_load_and_masks_match_boxes_and_areas(tiny):
    total = 0
    for split, count in zip(SPLITS, (TINY["num_train"], TINY["num_val"])):
        coco = load_coco(tiny, split)
        assert sorted(coco.imgs) == list(range(1, count + 1))
        for img in coco.imgs.values():
            with Image.open(tiny / split / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"])
                assert TINY["min_size"] <= min(im.size) and max(im.size) <= TINY["max_size"]
        ann_ids = [a["id"] for a in coco.dataset["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        for ann in coco.dataset["annotations"]:
            img = coco.imgs[ann["image_id"]]
            mask = coco.annToMask(ann)
            assert mask.shape == (img["height"], img["width"])
            assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
            assert int(mask.sum()) == ann["area"] >= MIN_VISIBLE_PIXELS
            assert np.allclose(mask_bbox(mask), ann["bbox"], atol=1)
            total += 1
    assert total > 0


def test_category_ids_are_declared(tiny):
    for split in SPLITS:
        inst, pan = load_json(tiny, "instances", split), load_json(tiny, "panoptic", split)
        thing_ids = {c["id"] for c in inst["categories"]}
        assert {a["category_id"] for a in inst["annotations"]} <= thing_ids
        pan_cats = {c["id"]: c for c in pan["categories"]}
        assert {i for i, c in pan_cats.items() if c["isthing"] == 1} == thing_ids
        assert any(c["isthing"] == 0 for c in pan_cats.values())
        used = {s["category_id"] for a in pan["annotations"] for s in a["segments_info"]}
        assert used <= set(pan_cats)


# ---- panoptic ---------------------------------------------------------------------------------

def test_panoptic_png_ids_match_segments_info(tiny):
    for split in SPLITS:
        pan = load_json(tiny, "panoptic", split)
        assert [a["image_id"] for a in pan["annotations"]] == [i["id"] for i in pan["images"]]
        stuff_ids = {c["id"] for c in pan["categories"] if not c["isthing"]}
        for ann in pan["annotations"]:
            ids = panoptic_ids(tiny, split, ann["file_name"])
            segments = {s["id"]: s for s in ann["segments_info"]}
            assert len(segments) == len(ann["segments_info"])
            assert set(np.unique(ids).tolist()) == set(segments)  # no void and no stray ids
            for seg_id, seg in segments.items():
                assert int((ids == seg_id).sum()) == seg["area"] > 0
                assert mask_bbox(ids == seg_id) == seg["bbox"]
            stuff = [s["category_id"] for s in segments.values() if s["category_id"] in stuff_ids]
            assert stuff and len(stuff) == len(set(stuff))  # one segment per stuff class


def test_panoptic_things_are_the_instances(tiny):
    for split in SPLITS:
        coco = load_coco(tiny, split)
        pan = load_json(tiny, "panoptic", split)
        thing_ids = {c["id"] for c in pan["categories"] if c["isthing"]}
        for ann in pan["annotations"]:
            ids = panoptic_ids(tiny, split, ann["file_name"])
            things = [s for s in ann["segments_info"] if s["category_id"] in thing_ids]
            instances = coco.imgToAnns[ann["image_id"]]
            assert len(things) == len(instances)
            for inst in instances:
                mask = coco.annToMask(inst).astype(bool)
                same = [s for s in things if np.array_equal(ids == s["id"], mask)]
                assert len(same) == 1 and same[0]["category_id"] == inst["category_id"]
                assert same[0]["area"] == inst["area"] and same[0]["bbox"] == inst["bbox"]


def test_no_objects_gives_stuff_only(tmp_path):
    root = generate(tmp_path / "empty", num_train=2, num_val=1, min_size=64, max_size=64, max_objects=0)
    for split in SPLITS:
        assert load_json(root, "instances", split)["annotations"] == []
        pan = load_json(root, "panoptic", split)
        stuff_ids = {c["id"] for c in pan["categories"] if not c["isthing"]}
        assert all(s["category_id"] in stuff_ids for a in pan["annotations"] for s in a["segments_info"])


# ---- sparse scenes, arguments, CLI --------------------------------------------------------------

def test_sparse_gives_few_small_objects_on_large_images(tmp_path):
    root = generate(tmp_path / "sparse", num_train=4, num_val=2, seed=2, sparse=True)
    for split in SPLITS:
        inst = load_json(root, "instances", split)
        assert all(min(i["width"], i["height"]) >= 512 for i in inst["images"])
        per_image = [sum(a["image_id"] == i["id"] for a in inst["annotations"]) for i in inst["images"]]
        assert max(per_image) <= 3 and sum(per_image) >= len(per_image)
        assert all(max(a["bbox"][2:]) <= 40 for a in inst["annotations"])


def test_invalid_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="min_size"):
        generate(tmp_path / "bad", num_train=1, num_val=1, min_size=100, max_size=50)
    with pytest.raises(ValueError, match=">= 0"):
        generate(tmp_path / "bad", num_train=-1)
    assert not (tmp_path / "bad" / "meta.json").exists()


def test_matches_reads_meta(tiny):
    assert matches(tiny, **TINY)
    assert not matches(tiny, **{**TINY, "seed": 1})
    assert not matches(tiny, **{**TINY, "sparse": True})


def test_cli_writes_dataset_and_meta_last(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "datasets.synthetic", "--out", str(out), "--train", "3",
           "--val", "2", "--seed", "5", "--min-size", "64", "--max-size", "80", "--max-objects", "2"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    args = dict(num_train=3, num_val=2, seed=5, min_size=64, max_size=80, max_objects=2)
    meta = out / "meta.json"
    assert matches(out, **args)
    assert all(p.stat().st_mtime_ns <= meta.stat().st_mtime_ns for p in out.rglob("*") if p.is_file())
    # the flags reach the same arguments as the Python call
    assert files(out) == files(generate(tmp_path / "py", **args))


def test_min_object_size_removes_tiny_objects(tmp_path):
    def max_sides(root, **kw):
        generate(root, num_train=12, num_val=0, seed=5, min_size=96, max_size=112, **kw)
        anns = json.loads((root / "annotations" / "instances_train2017.json").read_text())["annotations"]
        return [max(a["bbox"][2], a["bbox"][3]) for a in anns]

    default = max_sides(tmp_path / "default")
    larger = max_sides(tmp_path / "larger", min_object_size=24)
    # occlusion may hide up to 70% of an object, so the bound is loose
    assert min(default) < 14 <= min(larger)
    assert matches(tmp_path / "larger", num_train=12, num_val=0, seed=5, min_size=96,
                             max_size=112, min_object_size=24)
