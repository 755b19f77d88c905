import logging

import pytest
import torch
import torch.distributed as dist

from datasets import CocoDetection, CocoEvaluator, build_transforms
from datasets.coco_eval import STAT_NAMES, merge_rank_results


def eval_samples(root, helpers, make_data_cfg, val_size):
    """(dataset, targets) through the val transform, so target["size"] != target["orig_size"]."""
    img_folder, ann_file = helpers.val_paths(root)
    ds = CocoDetection(img_folder, ann_file, transforms=build_transforms(False, make_data_cfg(val_size=val_size)),
                       return_masks=True)
    return ds, [ds[i][1] for i in range(len(ds))]


def perfect_predictions(targets):
    return [
        {"boxes": t["boxes"].clone(), "scores": torch.ones(len(t["labels"])), "labels": t["labels"].clone(),
         "masks": t["masks"].float()[:, None]}
        for t in targets
    ]


def test_perfect_predictions_give_ap_one_after_rescaling(coco_root, coco_helpers, make_data_cfg):
    # Shorter side 48 -> 96 (and 64 -> 128): the evaluator has to map predictions back by 1/2.
    ds, targets = eval_samples(coco_root, coco_helpers, make_data_cfg, val_size=96)
    assert any(t["size"].tolist() != t["orig_size"].tolist() for t in targets)
    evaluator = CocoEvaluator(ds.coco, ds.label_to_cat_id, iou_types=("bbox", "segm"))
    evaluator.update(perfect_predictions(targets), targets)
    summary = evaluator.summarize()
    for iou_type in ("bbox", "segm"):
        assert set(summary[iou_type]) == set(STAT_NAMES)
        assert summary[iou_type]["AP"] == pytest.approx(1.0)
        assert summary[iou_type]["AP75"] == pytest.approx(1.0)
    assert len(evaluator.coco_eval["bbox"].stats) == 12


def test_boxes_rescaled_with_non_integer_factor(coco_root, coco_helpers, make_data_cfg):
    ds, targets = eval_samples(coco_root, coco_helpers, make_data_cfg, val_size=37)
    evaluator = CocoEvaluator(ds.coco, ds.label_to_cat_id)
    evaluator.update(perfect_predictions(targets), targets)
    assert evaluator.summarize()["bbox"]["AP"] == pytest.approx(1.0)


def test_masks_at_padded_batch_size_are_cropped(coco_root, coco_helpers, make_data_cfg):
    ds, targets = eval_samples(coco_root, coco_helpers, make_data_cfg, val_size=96)
    preds = perfect_predictions(targets)
    for p in preds:  # pad to a 140x140 batch canvas, as a model working on ImageBatch would
        n, _, h, w = p["masks"].shape
        padded = torch.zeros(n, 1, 140, 140)
        padded[..., :h, :w] = p["masks"]
        p["masks"] = padded
    evaluator = CocoEvaluator(ds.coco, ds.label_to_cat_id, iou_types=("segm",))
    evaluator.update(preds, targets)
    assert evaluator.summarize()["segm"]["AP"] == pytest.approx(1.0)


def test_shifted_box_lowers_ap(coco_root, coco_helpers, make_data_cfg):
    ds, targets = eval_samples(coco_root, coco_helpers, make_data_cfg, val_size=96)
    preds = perfect_predictions(targets)
    preds[0]["boxes"][0] += torch.tensor([12.0, 8.0, 12.0, 8.0])
    evaluator = CocoEvaluator(ds.coco, ds.label_to_cat_id)
    evaluator.update(preds, targets)
    ap = evaluator.summarize()["bbox"]["AP"]
    assert 0.0 < ap < 0.9


def test_wrong_category_is_not_a_match(coco_root, coco_helpers, make_data_cfg):
    ds, targets = eval_samples(coco_root, coco_helpers, make_data_cfg, val_size=48)
    preds = perfect_predictions(targets)
    for p in preds:
        p["labels"] = (p["labels"] + 1) % ds.num_classes
    evaluator = CocoEvaluator(ds.coco, ds.label_to_cat_id)
    evaluator.update(preds, targets)
    assert evaluator.summarize()["bbox"]["AP"] == pytest.approx(0.0)


def test_no_predictions_give_zeros(coco_root, coco_helpers, make_data_cfg):
    ds, targets = eval_samples(coco_root, coco_helpers, make_data_cfg, val_size=48)
    never_updated = CocoEvaluator(ds.coco, ds.label_to_cat_id, iou_types=("bbox", "segm"))
    assert never_updated.summarize() == {t: dict.fromkeys(STAT_NAMES, 0.0) for t in ("bbox", "segm")}

    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 1, *t["size"].tolist())} for t in targets]
    evaluator = CocoEvaluator(ds.coco, ds.label_to_cat_id, iou_types=("bbox", "segm"))
    evaluator.update(empty, targets)
    summary = evaluator.summarize()
    assert all(v == 0.0 for stats in summary.values() for v in stats.values())


def test_pycocotools_output_goes_to_debug_log(coco_root, coco_helpers, make_data_cfg, capsys, caplog):
    ds, targets = eval_samples(coco_root, coco_helpers, make_data_cfg, val_size=48)
    evaluator = CocoEvaluator(ds.coco, ds.label_to_cat_id)
    evaluator.update(perfect_predictions(targets), targets)
    with caplog.at_level(logging.DEBUG, logger="detr_sparse.eval"):
        evaluator.summarize()
    assert capsys.readouterr().out == ""
    assert "Average Precision" in caplog.text


def test_only_evaluated_images_count(coco_root, coco_helpers, make_data_cfg):
    # Evaluating a subset must not count the other images' ground truth as missed.
    ds, targets = eval_samples(coco_root, coco_helpers, make_data_cfg, val_size=48)
    evaluator = CocoEvaluator(ds.coco, ds.label_to_cat_id)
    evaluator.update(perfect_predictions(targets[:1]), targets[:1])
    assert evaluator.summarize()["bbox"]["AP"] == pytest.approx(1.0)


def test_merge_takes_each_image_once():
    rank0 = ([1, 2], {"bbox": {1: ["a"], 2: ["b"]}})
    rank1 = ([3, 1], {"bbox": {3: ["c"], 1: ["a-again"]}})  # image 1 repeated by sampler padding
    img_ids, results = merge_rank_results([rank0, rank1], ("bbox",))
    assert img_ids == {1, 2, 3}
    assert results["bbox"] == {1: ["a"], 2: ["b"], 3: ["c"]}


def test_distributed_path_single_process(coco_root, coco_helpers, make_data_cfg, tmp_path):
    ds, targets = eval_samples(coco_root, coco_helpers, make_data_cfg, val_size=96)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        evaluator = CocoEvaluator(ds.coco, ds.label_to_cat_id)
        # The same images twice, as a padded DistributedSampler would deliver them.
        evaluator.update(perfect_predictions(targets), targets)
        evaluator.update(perfect_predictions(targets[:1]), targets[:1])
        summary = evaluator.summarize()
    finally:
        dist.destroy_process_group()
    assert summary["bbox"]["AP"] == pytest.approx(1.0)
