import json
import logging

import pytest
import torch
from torchvision import tv_tensors

from datasets import CocoDetection, build_dataset, build_transforms, check_same_categories, collate_fn
from engine.config import ConfigError


def dataset(root, helpers, **kwargs):
    img_folder, ann_file = helpers.val_paths(root)
    return CocoDetection(img_folder, ann_file, **kwargs)


def index_of(ds, img_id):
    return ds.ids.index(img_id)


# ---- errors that name what is wrong -------------------------------------------------------

def test_missing_image_folder_names_path(coco_root, coco_helpers):
    _, ann_file = coco_helpers.val_paths(coco_root)
    missing = coco_root / "test2017"
    with pytest.raises(FileNotFoundError) as err:
        CocoDetection(missing, ann_file)
    assert str(missing) in str(err.value)
    assert "instances_train2017.json" in str(err.value)  # says what layout was expected


def test_missing_annotation_file_names_path(coco_root, coco_helpers):
    img_folder, _ = coco_helpers.val_paths(coco_root)
    missing = coco_root / "annotations" / "instances_test2017.json"
    with pytest.raises(FileNotFoundError, match="annotation file not found") as err:
        CocoDetection(img_folder, missing)
    assert str(missing) in str(err.value)


def test_build_dataset_missing_root_names_split_folder(tmp_path, make_data_cfg):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(make_data_cfg(tmp_path / "nowhere"), "val")
    assert str(tmp_path / "nowhere" / "val2017") in str(err.value)


def test_malformed_json_names_file(coco_root, coco_helpers):
    img_folder, ann_file = coco_helpers.val_paths(coco_root)
    ann_file.write_text('{"images": [')
    with pytest.raises(ValueError) as err:
        CocoDetection(img_folder, ann_file)
    assert str(ann_file) in str(err.value)


def test_unknown_category_names_annotation_image_and_category(make_coco, coco_helpers):
    anns = coco_helpers.clean_annotations() + [coco_helpers.annotation(77, 2, 99, [1, 1, 5, 5])]
    root = make_coco(annotations=anns)
    with pytest.raises(ValueError) as err:
        dataset(root, coco_helpers)
    msg = str(err.value)
    assert "annotation id 77" in msg and "image id 2" in msg and "category_id 99" in msg
    assert str(coco_helpers.val_paths(root)[1]) in msg


def test_corrupt_image_raises_with_file_name(make_coco, coco_helpers):
    root = make_coco(corrupt=(2,))
    ds = dataset(root, coco_helpers)
    ds[index_of(ds, 1)]  # readable images still load
    with pytest.raises(OSError) as err:
        ds[index_of(ds, 2)]
    assert str(root / "val2017" / "000002.jpg") in str(err.value)


def test_corrupt_image_skipped_and_counted(make_coco, coco_helpers, caplog):
    root = make_coco(corrupt=(2,))
    ds = dataset(root, coco_helpers, skip_unreadable=True)
    with caplog.at_level(logging.WARNING, logger="detr_sparse.data"):
        _, target = ds[index_of(ds, 2)]
    assert target["image_id"] == 5  # the next image stands in
    assert ds.num_skipped_images == 1
    assert "000002.jpg" in caplog.text
    ds[index_of(ds, 2)]  # a known-bad file is not re-read or re-counted
    assert ds.num_skipped_images == 1


def test_all_images_unreadable_gives_up(make_coco, coco_helpers):
    ds = dataset(make_coco(corrupt=(1, 2, 5)), coco_helpers, skip_unreadable=True)
    with pytest.raises(RuntimeError, match="no readable image"):
        ds[0]
    assert ds.num_skipped_images == 3


def test_degenerate_boxes_dropped_and_counted(make_coco, coco_helpers, caplog):
    anns = coco_helpers.clean_annotations() + [
        coco_helpers.annotation(20, 1, 3, [10, 10, 0, 5]),
        coco_helpers.annotation(21, 1, 7, [10, 10, 5, -3]),
    ]
    root = make_coco(annotations=anns)
    with caplog.at_level(logging.WARNING, logger="detr_sparse.data"):
        ds = dataset(root, coco_helpers)
    assert ds.num_dropped_boxes == 2
    record = [r for r in caplog.records if r.name == "detr_sparse.data"]
    assert len(record) == 1 and "2" in record[0].getMessage()
    assert str(coco_helpers.val_paths(root)[1]) in record[0].getMessage()
    _, target = ds[index_of(ds, 1)]
    assert len(target["boxes"]) == 2  # only the two valid annotations of image 1


# ---- targets ------------------------------------------------------------------------------

def test_contiguous_labels_map_back_to_category_ids(coco_root, coco_helpers):
    ds = dataset(coco_root, coco_helpers)
    assert ds.cat_ids == [3, 7, 11] and ds.num_classes == 3
    assert ds.cat_names == ["dog", "bird", "cat"]
    for idx, img_id in enumerate(ds.ids):
        _, target = ds[idx]
        expected = [a["category_id"] for a in coco_helpers.clean_annotations()
                    if a["image_id"] == img_id and not a["iscrowd"]]
        assert target["labels"].dtype == torch.int64
        assert [ds.label_to_cat_id[lab] for lab in target["labels"].tolist()] == expected
        assert all(ds.cat_id_to_label[c] == lab for c, lab in zip(expected, target["labels"].tolist()))


def test_crowd_annotations_excluded(coco_root, coco_helpers):
    ds = dataset(coco_root, coco_helpers, return_masks=True)
    _, target = ds[index_of(ds, 5)]  # image 5 has one normal and one crowd annotation
    assert target["boxes"].tolist() == [[10.0, 20.0, 50.0, 50.0]]
    assert target["iscrowd"].tolist() == [0]
    assert target["masks"].shape == (1, 64, 64)


def test_sample_without_transforms_is_plain_and_exact(coco_root, coco_helpers):
    ds = dataset(coco_root, coco_helpers, return_masks=True)
    image, target = ds[index_of(ds, 1)]
    assert type(image) is torch.Tensor and image.dtype == torch.float32 and image.shape == (3, 48, 64)
    assert 0.0 <= image.min() and image.max() <= 1.0
    for key in ("boxes", "labels", "masks", "area", "iscrowd", "orig_size", "size"):
        assert type(target[key]) is torch.Tensor, key
    assert target["image_id"] == 1
    assert target["orig_size"].tolist() == [48, 64] and target["size"].tolist() == [48, 64]
    assert target["boxes"].tolist() == [[4, 6, 24, 22], [30, 10, 54, 40]]
    assert target["masks"].dtype == torch.uint8
    # Polygon (first) and compressed RLE (second) both rasterise inside their boxes.
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        got = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(got, box, atol=1.0), (got, box)
    assert torch.equal(target["area"], target["masks"].flatten(1).sum(1).float())


def test_train_transform_gives_plain_tensors(coco_root, coco_helpers, make_data_cfg):
    cfg = make_data_cfg(coco_root)
    ds = dataset(coco_root, coco_helpers, transforms=build_transforms(True, cfg), return_masks=True)
    image, target = ds[0]
    assert type(image) is torch.Tensor and image.dtype == torch.float32
    assert not any(isinstance(v, tv_tensors.TVTensor) for v in target.values())
    assert target["size"].tolist() == list(image.shape[-2:])
    assert target["masks"].shape[-2:] == image.shape[-2:]
    n = len(target["boxes"])
    assert len(target["labels"]) == len(target["area"]) == len(target["iscrowd"]) == len(target["masks"]) == n


# ---- deterministic augmentation -----------------------------------------------------------

def test_augmentation_depends_only_on_seed_epoch_idx(coco_root, coco_helpers, make_data_cfg):
    cfg = make_data_cfg(coco_root)
    make = lambda: dataset(coco_root, coco_helpers, transforms=build_transforms(True, cfg), seed=3)
    ds_a, ds_b = make(), make()
    ds_a.set_epoch(4)
    ds_b.set_epoch(4)
    img_a, tgt_a = ds_a[2]
    torch.rand(10)  # unrelated RNG use and other samples in between must not matter
    ds_b[0], ds_b[1]
    img_b, tgt_b = ds_b[2]
    assert torch.equal(img_a, img_b) and torch.equal(tgt_a["boxes"], tgt_b["boxes"])

    ds_b.set_epoch(5)
    img_c, tgt_c = ds_b[2]
    assert img_c.shape != img_a.shape or not torch.equal(img_c, img_a)


def test_getitem_leaves_caller_rng_untouched(coco_root, coco_helpers, make_data_cfg):
    import random

    ds = dataset(coco_root, coco_helpers, transforms=build_transforms(True, make_data_cfg(coco_root)))
    torch.manual_seed(123)
    random.seed(123)
    ds[0]
    after = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(123)
    assert torch.equal(after[0], torch.rand(3)) and after[1] == random.random()


# ---- build_dataset and collate_fn ---------------------------------------------------------

def test_build_dataset_reads_config(coco_root, make_data_cfg):
    cfg = make_data_cfg(coco_root, masks=True, val_size=32, seed=9)
    val = build_dataset(cfg, "val")
    train = build_dataset(cfg, "train")
    assert val.img_folder.endswith("val2017") and train.img_folder.endswith("train2017")
    assert val.return_masks and val.seed == 9 and len(val) == 3
    image, target = val[val.ids.index(1)]  # 64x48 -> shorter side 32
    assert image.shape == (3, 32, 42) and "masks" in target
    with pytest.raises(ValueError, match="split"):
        build_dataset(cfg, "test")


def _custom_split(root, helpers, tmp_path):
    """The fixture's val split moved into a layout of its own -> (image folder, annotation file)."""
    images, annotations = tmp_path / "somewhere" / "pictures", tmp_path / "labels" / "my_val.json"
    annotations.parent.mkdir()
    images.parent.mkdir()
    helpers.val_paths(root)[0].rename(images)
    helpers.val_paths(root)[1].rename(annotations)
    return images, annotations


def test_a_split_given_by_its_own_folder_and_file(coco_root, coco_helpers, make_data_cfg, tmp_path):
    images, annotations = _custom_split(coco_root, coco_helpers, tmp_path)
    cfg = make_data_cfg(tmp_path / "no_root", val_images=str(images), val_annotations=str(annotations), masks=True)
    val = build_dataset(cfg, "val")
    assert val.img_folder == str(images) and val.ann_file == str(annotations) and len(val) == 3
    assert val.cat_names == [c["name"] for c in sorted(coco_helpers.categories, key=lambda c: c["id"])]
    assert "masks" in val[0][1]
    # data.root still serves the other split, as before
    assert build_dataset(make_data_cfg(coco_root, val_images=str(images), val_annotations=str(annotations)),
                         "train").img_folder == str(coco_root / "train2017")


@pytest.mark.parametrize("case, message", [
    ("only_images", r"^data.val_annotations is not set but data.val_images is"),
    ("no_file", r"^data.val_annotations: annotation file not found: .*missing.json$"),
    ("no_folder", r"^data.val_images: image folder not found: .*nowhere$"),
    ("bad_json", r"^data.val_annotations: annotation file .*my_val.json is not valid JSON"),
    ("image_missing", r"^data.val_images .*pictures lacks 1 of the 3 images data.val_annotations .*my_val.json "
                      r"lists, e.g. .*pictures/"),
])
def test_a_custom_split_that_is_missing_or_malformed_is_a_one_line_error(
        coco_root, coco_helpers, make_data_cfg, tmp_path, case, message):
    images, annotations = _custom_split(coco_root, coco_helpers, tmp_path)
    keys = {"val_images": str(images), "val_annotations": str(annotations)}
    if case == "only_images":
        del keys["val_annotations"]
    elif case == "no_file":
        keys["val_annotations"] = str(tmp_path / "missing.json")
    elif case == "no_folder":
        keys["val_images"] = str(tmp_path / "nowhere")
    elif case == "bad_json":
        annotations.write_text('{"images": [')
    else:
        next(images.iterdir()).unlink()
    with pytest.raises(ConfigError, match=message) as e:
        build_dataset(make_data_cfg(tmp_path / "no_root", **keys), "val")
    assert "\n" not in str(e.value)


def test_splits_of_other_categories_are_refused(coco_root, coco_helpers, make_coco, make_data_cfg):
    other = make_coco(categories=[{"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 11, "name": "c"},
                                  {"id": 12, "name": "d"}])
    train = build_dataset(make_data_cfg(other), "train")
    with pytest.raises(ConfigError, match=r"category ids \[3, 7, 11, 12\] but the val annotations .* have \[3, 7, 11\]"):
        check_same_categories(train, build_dataset(make_data_cfg(coco_root), "val"))


def test_collate_pads_to_batch_max_with_mask(coco_root, coco_helpers):
    ds = dataset(coco_root, coco_helpers)
    batch = [ds[index_of(ds, 1)], ds[index_of(ds, 2)]]  # 48x64 and 64x48
    images, targets = collate_fn(batch)
    assert images.tensors.shape == (2, 3, 64, 64)
    assert images.sizes.tolist() == [[48, 64], [64, 48]]
    assert not images.mask[0, :48].any() and images.mask[0, 48:].all()
    assert not images.mask[1, :, :48].any() and images.mask[1, :, 48:].all()
    assert torch.equal(images.tensors[0, :, :48, :64], batch[0][0])
    assert images.tensors[1, :, :, 48:].abs().sum() == 0
    assert [t["image_id"] for t in targets] == [1, 2]


def test_annotation_json_roundtrip_of_fixture(coco_root, coco_helpers):
    # Guards the fixture itself: the file must hold what the tests above assume.
    data = json.loads(coco_helpers.val_paths(coco_root)[1].read_text())
    assert {c["id"] for c in data["categories"]} == {3, 7, 11}
    assert sum(a["iscrowd"] for a in data["annotations"]) == 1
