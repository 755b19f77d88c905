import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import CocoEvaluator, build_dataset, collate_fn
from datasets.coco_panoptic import CocoPanoptic, build_panoptic_dataset, id_to_rgb, masks_to_xyxy, rgb_to_id
from datasets.synthetic import STUFF_NAMES, THING_SHAPES
from engine.config import ConfigError

SPLIT = "val2017"


@pytest.fixture
def pan_root(tiny_coco, tmp_path):
    """A writable copy of the tiny synthetic set's val split (the session fixture is shared)."""
    root = tmp_path / "pan"
    shutil.copytree(tiny_coco / SPLIT, root / SPLIT)
    shutil.copytree(tiny_coco / "annotations" / f"panoptic_{SPLIT}", root / "annotations" / f"panoptic_{SPLIT}")
    shutil.copy(tiny_coco / "annotations" / f"panoptic_{SPLIT}.json", root / "annotations")
    return root


def ann_path(root):
    return root / "annotations" / f"panoptic_{SPLIT}.json"


def edit_json(root, edit):
    data = json.loads(ann_path(root).read_text())
    edit(data)
    ann_path(root).write_text(json.dumps(data))


def mask_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0]


def check_consistent(ds, image, target):
    masks, boxes, labels = target["masks"], target["boxes"], target["labels"]
    n = len(labels)
    assert masks.dtype == torch.bool and masks.shape == (n, *image.shape[-2:])
    assert boxes.shape == (n, 4) and boxes.dtype == torch.float32
    assert target["size"].tolist() == list(image.shape[-2:])
    assert len(target["iscrowd"]) == len(target["area"]) == len(target["segment_ids"]) == n
    assert masks.flatten(1).any(1).all()  # no empty row
    assert masks.sum(0).max() <= 1  # no overlap
    for mask, box in zip(masks, boxes):
        assert box.tolist() == mask_box(mask)
    assert target["area"].tolist() == masks.flatten(1).sum(1).float().tolist()
    assert ((labels >= 0) & (labels < ds.num_classes)).all()


# ---- the label mapping and targets -------------------------------------------------------------

def test_labels_cover_things_and_stuff(tiny_coco):
    ds = CocoPanoptic(tiny_coco, SPLIT)
    names = [name for name, *_ in THING_SHAPES] + STUFF_NAMES
    assert ds.cat_names == names and "sky" in ds.cat_names
    assert ds.is_thing == [True] * len(THING_SHAPES) + [False] * len(STUFF_NAMES)
    assert ds.label_to_cat_id == sorted(ds.label_to_cat_id)
    assert ds.num_classes == len(names)
    assert {c["id"]: c["isthing"] for c in ds.categories} == dict(zip(ds.label_to_cat_id, map(int, ds.is_thing)))


def test_targets_match_the_png_and_json(tiny_coco):
    ds = CocoPanoptic(tiny_coco, SPLIT)
    data = json.loads(ann_path(tiny_coco).read_text())
    by_image = {a["image_id"]: a for a in data["annotations"]}
    seen_stuff = False
    for idx in range(len(ds)):
        image, target = ds[idx]
        check_consistent(ds, image, target)
        assert 0.0 <= image.min() and image.max() <= 1.0  # no transforms: plain [0, 1]
        assert target["size"].tolist() == target["orig_size"].tolist()
        ann = by_image[target["image_id"]]
        assert target["file_name"] == ann["file_name"].replace(".png", ".jpg")
        ids = rgb_to_id(np.asarray(Image.open(ds.png_path(idx))))
        segments = {s["id"]: s for s in ann["segments_info"]}
        assert sorted(target["segment_ids"].tolist()) == sorted(segments)
        assert target["masks"].any(0).all()  # the synthetic PNGs have no VOID
        for mask, seg_id, label, box in zip(target["masks"], target["segment_ids"], target["labels"], target["boxes"]):
            seg = segments[int(seg_id)]
            assert torch.equal(mask, torch.from_numpy(ids == int(seg_id)))
            assert ds.label_to_cat_id[label] == seg["category_id"]
            x, y, w, h = seg["bbox"]
            assert box.tolist() == [x, y, x + w, y + h]
            seen_stuff |= not ds.is_thing[label]
        assert "panoptic" not in target and "segments" not in target
    assert seen_stuff


def test_id_rgb_round_trip():
    ids = np.array([[0, 1, 255], [256, 65535, 256**3 - 1]])
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)
    assert rgb_to_id(np.array([[[1, 2, 3]]], np.uint8)).item() == 1 + 2 * 256 + 3 * 256**2


def test_one_pixel_mask_has_a_one_pixel_box():
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, 2, 3] = True
    assert masks_to_xyxy(mask).tolist() == [[3.0, 2.0, 4.0, 3.0]]
    assert masks_to_xyxy(torch.zeros(0, 5, 5)).shape == (0, 4)


def test_train_and_val_transforms_keep_targets_consistent(tiny_coco, make_data_cfg):
    cfg = make_data_cfg(tiny_coco)
    train = build_panoptic_dataset(cfg, "train")
    for epoch in range(2):
        train.set_epoch(epoch)
        for idx in range(len(train)):
            image, target = train[idx]
            check_consistent(train, image, target)
            assert image.min() < 0  # normalised
            assert "panoptic" not in target
    val = build_panoptic_dataset(cfg, "val")
    for idx in range(len(val)):
        image, target = val[idx]
        check_consistent(val, image, target)
        assert max(target["size"]) <= cfg.max_size and min(target["size"]) == cfg.val_size
        h0, w0 = target["orig_size"].tolist()
        assert target["panoptic"].shape == (h0, w0) and target["panoptic"].dtype == torch.int64
        assert {s["id"] for s in target["segments"]} == set(target["panoptic"].unique().tolist())
        assert all(set(s) == {"id", "category_id", "iscrowd"} for s in target["segments"])


def test_augmentation_is_deterministic(tiny_coco, make_data_cfg):
    a = build_panoptic_dataset(make_data_cfg(tiny_coco), "train")
    b = build_panoptic_dataset(make_data_cfg(tiny_coco), "train")
    for ds in (a, b):
        ds.set_epoch(3)
    (img_a, tgt_a), (img_b, tgt_b) = a[2], b[2]
    assert torch.equal(img_a, img_b) and torch.equal(tgt_a["masks"], tgt_b["masks"])
    assert torch.equal(tgt_a["labels"], tgt_b["labels"])


def test_collate(tiny_coco, make_data_cfg):
    val = build_panoptic_dataset(make_data_cfg(tiny_coco), "val")
    images, targets = collate_fn([val[0], val[1]])
    assert len(targets) == 2 and images.tensors.shape[0] == 2


def test_crowd_segments_keep_their_flag(pan_root):
    def make_first_crowd(data):
        data["annotations"][0]["segments_info"][0]["iscrowd"] = 1
    edit_json(pan_root, make_first_crowd)
    ds = CocoPanoptic(pan_root, SPLIT, return_panoptic=True)
    _, target = ds[0]
    first = json.loads(ann_path(pan_root).read_text())["annotations"][0]["segments_info"][0]["id"]
    crowd = dict(zip(target["segment_ids"].tolist(), target["iscrowd"].tolist()))
    assert crowd[first] == 1 and sum(crowd.values()) == 1
    assert [s["iscrowd"] for s in target["segments"] if s["id"] == first] == [1]


def test_coco_index_gives_box_ap_of_one(tiny_coco):
    ds = CocoPanoptic(tiny_coco, SPLIT)
    assert len(ds.coco.getAnnIds()) == sum(len(a["segments_info"]) for a in ds.panoptic_anns.values())
    evaluator = CocoEvaluator(ds.coco, ds.label_to_cat_id)
    preds, targets = [], []
    for idx in range(len(ds)):
        _, target = ds[idx]
        n = len(target["labels"])
        preds.append({"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(n)})
        targets.append(target)
    evaluator.update(preds, targets)
    assert evaluator.summarize()["bbox"]["AP"] == pytest.approx(1.0)


# ---- layouts and errors that name what is wrong ------------------------------------------------

def test_coco_layout_with_png_folder_at_root(pan_root):
    (pan_root / "annotations" / f"panoptic_{SPLIT}").rename(pan_root / f"panoptic_{SPLIT}")
    ds = CocoPanoptic(pan_root, SPLIT)
    assert ds.png_folder == str(pan_root / f"panoptic_{SPLIT}")
    check_consistent(ds, *ds[0])


def test_missing_json_names_file(pan_root):
    ann_path(pan_root).unlink()
    with pytest.raises(FileNotFoundError) as err:
        CocoPanoptic(pan_root, SPLIT)
    assert str(ann_path(pan_root)) in str(err.value)


def test_missing_png_folder_names_both_places(pan_root):
    shutil.rmtree(pan_root / "annotations" / f"panoptic_{SPLIT}")
    with pytest.raises(FileNotFoundError) as err:
        CocoPanoptic(pan_root, SPLIT)
    assert str(pan_root / "annotations" / f"panoptic_{SPLIT}") in str(err.value)
    assert str(pan_root / f"panoptic_{SPLIT}") in str(err.value)


def test_missing_image_folder_names_path(pan_root):
    with pytest.raises(FileNotFoundError) as err:
        CocoPanoptic(pan_root, "test2017")
    assert str(pan_root / "test2017") in str(err.value)


def test_build_rejects_unknown_split(tiny_coco, make_data_cfg):
    with pytest.raises(ValueError, match="'test'"):
        build_panoptic_dataset(make_data_cfg(tiny_coco), "test")


def test_malformed_json_names_file(pan_root):
    ann_path(pan_root).write_text('{"images": [')
    with pytest.raises(ValueError) as err:
        CocoPanoptic(pan_root, SPLIT)
    assert str(ann_path(pan_root)) in str(err.value)


def test_unknown_category_names_file_image_and_category(pan_root):
    def break_category(data):
        data["annotations"][1]["segments_info"][0]["category_id"] = 99
    edit_json(pan_root, break_category)
    img_id = json.loads(ann_path(pan_root).read_text())["annotations"][1]["image_id"]
    with pytest.raises(ValueError) as err:
        CocoPanoptic(pan_root, SPLIT)
    msg = str(err.value)
    assert "category_id 99" in msg and f"image id {img_id}" in msg and str(ann_path(pan_root)) in msg


def test_png_id_missing_from_segments_info_names_png(pan_root):
    removed = {}

    def drop_last_segment(data):
        removed["id"] = data["annotations"][0]["segments_info"].pop()["id"]
    edit_json(pan_root, drop_last_segment)
    ds = CocoPanoptic(pan_root, SPLIT)
    with pytest.raises(ValueError) as err:
        ds[0]
    msg = str(err.value)
    assert ds.png_path(0) in msg and f"[{removed['id']}]" in msg and str(ann_path(pan_root)) in msg


def test_unreadable_png_is_named_or_skipped(pan_root):
    ds = CocoPanoptic(pan_root, SPLIT)
    png = ds.png_path(0)
    with open(png, "wb") as f:
        f.write(b"not a png" * 10)
    with pytest.raises(OSError) as err:
        ds[0]
    assert png in str(err.value)
    skipping = CocoPanoptic(pan_root, SPLIT, skip_unreadable=True)
    _, target = skipping[0]
    assert target["image_id"] == skipping.ids[1] and skipping.num_skipped_images == 1


def test_png_of_another_size_is_named(pan_root):
    ds = CocoPanoptic(pan_root, SPLIT)
    png = ds.png_path(0)
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(png)
    with pytest.raises(ValueError) as err:
        ds[0]
    assert png in str(err.value) and ds.image_path(0) in str(err.value)


def test_train_transforms_keep_every_border_segment(tiny_coco, make_data_cfg):
    # The synthetic PNGs have no VOID, so the masks must tile every augmented image.
    train = build_panoptic_dataset(make_data_cfg(tiny_coco), "train")
    for epoch in range(3):
        train.set_epoch(epoch)
        for idx in range(len(train)):
            _, target = train[idx]
            assert target["masks"].any(0).all(), (epoch, idx)


def test_a_custom_panoptic_split_finds_its_pngs_beside_its_file(pan_root, tmp_path, make_data_cfg):
    labels = tmp_path / "labels"
    labels.mkdir()
    ann_path(pan_root).rename(labels / "mine.json")
    keys = dict(panoptic=True, val_images=str(pan_root / SPLIT), val_annotations=str(labels / "mine.json"))
    with pytest.raises(ConfigError, match=r"^data.val_annotations: the panoptic PNG folder .*labels/mine \(the"):
        build_dataset(make_data_cfg(tmp_path / "no_root", **keys), "val")
    (pan_root / "annotations" / f"panoptic_{SPLIT}").rename(labels / "mine")
    val = build_dataset(make_data_cfg(tmp_path / "no_root", **keys), "val")
    assert val.png_folder == str(labels / "mine") and val.cat_names[-1] == STUFF_NAMES[-1]
    assert "panoptic" in val[0][1]  # the val split carries what PQ needs
