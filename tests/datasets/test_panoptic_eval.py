import numpy as np
import pytest
import torch
import torch.distributed as dist

import datasets.panoptic_eval as panoptic_eval
from datasets.coco_panoptic import CocoPanoptic
from datasets.panoptic_eval import SUMMARY_KEYS, PanopticEvaluator, pq_image_stats

# Category 3 never occurs anywhere: a class without GT and predictions must be skipped, not
# averaged in as 0.
CATEGORIES = [
    {"id": 1, "name": "circle", "isthing": 1},
    {"id": 2, "name": "sky", "isthing": 0},
    {"id": 3, "name": "square", "isthing": 1},
]
LABEL_TO_CAT = [1, 2, 3]
CIRCLE, SKY = 0, 1  # labels


def evaluate(gt, gt_segments, pred, pred_segments, image_id=1) -> dict[str, float]:
    evaluator = PanopticEvaluator(CATEGORIES, LABEL_TO_CAT)
    evaluator.update(
        [{"panoptic": torch.tensor(pred), "segments_info": pred_segments}],
        [{"image_id": image_id, "panoptic": torch.tensor(gt), "segments": gt_segments}],
    )
    return evaluator.summarize()["panoptic"]


def gt_seg(seg_id, cat_id, iscrowd=0):
    return {"id": seg_id, "category_id": cat_id, "iscrowd": iscrowd}


# Two circles (ids 1, 2) on the left, sky (id 3) on the right.
GT = [[1, 1, 3, 3],
      [1, 1, 3, 3],
      [2, 2, 3, 3],
      [2, 2, 3, 3]]
GT_SEGMENTS = [gt_seg(1, 1), gt_seg(2, 1), gt_seg(3, 2)]


def test_perfect_prediction_is_one():
    pred = (np.array(GT) * 7).tolist()  # other ids, same segments
    segs = [{"id": 7, "label": CIRCLE}, {"id": 14, "label": CIRCLE}, {"id": 21, "label": SKY}]
    summary = evaluate(GT, GT_SEGMENTS, pred, segs)
    assert set(summary) == set(SUMMARY_KEYS)
    for key in SUMMARY_KEYS:
        assert summary[key] == pytest.approx(1.0), key


def test_hand_computed_case():
    # Prediction 10 (circle): 3 pixels of GT 1 plus 1 of GT 2 -> IoU with GT 1 = 3 / (4 + 4 - 3)
    # = 0.6, a match. Prediction 11 (circle): 2 pixels inside GT 2 -> IoU 2 / 4 = 0.5, which is
    # not > 0.5: prediction 11 is a FP and GT 2 a FN. Prediction 20 is the sky exactly.
    pred = [[10, 10, 20, 20],
            [10, 0, 20, 20],
            [10, 11, 20, 20],
            [0, 11, 20, 20]]
    segs = [{"id": 10, "label": CIRCLE}, {"id": 11, "label": CIRCLE}, {"id": 20, "category_id": 2}]
    summary = evaluate(GT, GT_SEGMENTS, pred, segs)
    # circle: TP 1 (IoU 0.6), FP 1, FN 1 -> PQ 0.6 / (1 + 0.5 + 0.5) = 0.3, SQ 0.6, RQ 0.5
    # sky: TP 1 (IoU 1) -> PQ = SQ = RQ = 1; square: absent, skipped
    expected = {
        "PQ": (0.3 + 1.0) / 2, "SQ": (0.6 + 1.0) / 2, "RQ": (0.5 + 1.0) / 2,
        "PQ_th": 0.3, "SQ_th": 0.6, "RQ_th": 0.5,
        "PQ_st": 1.0, "SQ_st": 1.0, "RQ_st": 1.0,
    }
    assert summary == pytest.approx(expected)


def test_image_stats_of_hand_computed_case():
    pred = np.array([[10, 10, 20, 20], [10, 0, 20, 20], [10, 11, 20, 20], [0, 11, 20, 20]])
    stats = pq_image_stats(np.array(GT), {1: (1, False), 2: (1, False), 3: (2, False)}, pred, {10: 1, 11: 1, 20: 2})
    assert stats[1] == pytest.approx([0.6, 1, 1, 1])  # [sum IoU, TP, FP, FN]
    assert stats[2] == pytest.approx([1.0, 1, 0, 0])


def test_wrong_category_is_no_match():
    pred = (np.array(GT) * 7).tolist()
    segs = [{"id": 7, "label": SKY}, {"id": 14, "label": CIRCLE}, {"id": 21, "label": SKY}]
    summary = evaluate(GT, GT_SEGMENTS, pred, segs)
    # circle: TP 1, FN 1 -> PQ 1 / 1.5; sky: TP 1 (the real sky), FP 1 (the circle called sky)
    assert summary["PQ_th"] == pytest.approx(1 / 1.5)
    assert summary["PQ_st"] == pytest.approx(1 / 1.5)


def test_void_pixels_do_not_hurt_iou():
    # GT: one circle (2x2) and VOID elsewhere. The prediction covers the circle plus two VOID
    # pixels: IoU = 4 / (6 + 4 - 4 - 2) = 1. Prediction 9 lies wholly on VOID: not a FP.
    gt = [[1, 1, 0, 0],
          [1, 1, 0, 0],
          [0, 0, 0, 0],
          [0, 0, 0, 0]]
    pred = [[5, 5, 5, 0],
            [5, 5, 5, 0],
            [0, 0, 9, 9],
            [0, 0, 9, 9]]
    segs = [{"id": 5, "label": CIRCLE}, {"id": 9, "label": SKY}]
    summary = evaluate(gt, [gt_seg(1, 1)], pred, segs)
    assert summary["PQ"] == pytest.approx(1.0)
    assert summary["SQ_th"] == pytest.approx(1.0)
    assert summary["PQ_st"] == 0.0  # sky: no GT and no counted prediction -> skipped


def test_prediction_mostly_on_labelled_pixels_is_a_false_positive():
    gt = [[1, 1, 2, 2],
          [1, 1, 2, 2],
          [0, 0, 2, 2],
          [0, 0, 2, 2]]
    # Prediction 9 (sky): 2 pixels on VOID, 2 on GT 1 -> half on VOID is not more than half.
    pred = [[5, 5, 7, 7],
            [9, 9, 7, 7],
            [9, 9, 7, 7],
            [0, 0, 7, 7]]
    segs = [{"id": 5, "label": CIRCLE}, {"id": 7, "label": SKY}, {"id": 9, "label": SKY}]
    stats = pq_image_stats(np.array(gt), {1: (1, False), 2: (2, False)}, np.array(pred), {5: 1, 7: 2, 9: 2})
    # circle: prediction 5 has IoU 2 / 4 = 0.5 -> no match; it is FP and GT 1 FN.
    assert stats[1] == pytest.approx([0, 0, 1, 1])
    # sky: prediction 7 has IoU 8 / 8 = 1; prediction 9 is a FP (2 of its 4 pixels ignorable).
    assert stats[2] == pytest.approx([1, 1, 1, 0])
    assert evaluate(gt, [gt_seg(1, 1), gt_seg(2, 2)], pred, segs)["PQ_st"] == pytest.approx(1 / 1.5)


def test_crowd_regions():
    # GT: a circle crowd (id 4, left half) and sky (id 3, right half).
    gt = [[4, 4, 3, 3],
          [4, 4, 3, 3],
          [4, 4, 3, 3],
          [4, 4, 3, 3]]
    gt_segments = [gt_seg(4, 1, iscrowd=1), gt_seg(3, 2)]
    # A circle predicted over the crowd: neither TP nor FP, and the crowd is no FN.
    pred = [[6, 6, 8, 8],
            [6, 6, 8, 8],
            [6, 6, 8, 8],
            [0, 0, 8, 8]]
    segs = [{"id": 6, "label": CIRCLE}, {"id": 8, "label": SKY}]
    summary = evaluate(gt, gt_segments, pred, segs)
    assert summary["PQ"] == pytest.approx(1.0)  # only the sky counts
    assert summary["PQ_th"] == 0.0  # no thing category counted at all

    # The crowd excuses predictions of its own category only: sky over a circle crowd is a FP.
    segs_other = [{"id": 6, "label": SKY}, {"id": 8, "label": SKY}]
    pred_other = [[6, 6, 8, 8]] * 4
    summary = evaluate(gt, gt_segments, pred_other, segs_other)
    assert summary["PQ_st"] == pytest.approx(1 / 1.5)  # sky: TP 1, FP 1


def test_crowd_overlap_plus_void_adds_up():
    # Prediction 6 (circle, 4 px): 2 px on VOID + 1 px on the circle crowd = 3/4 ignorable.
    gt = [[0, 0, 4, 3],
          [3, 3, 3, 3]]
    pred = [[6, 6, 6, 6],
            [8, 8, 8, 8]]
    stats = pq_image_stats(np.array(gt), {4: (1, True), 3: (2, False)}, np.array(pred), {6: 1, 8: 2})
    assert 1 not in stats  # no TP, FP or FN for circles
    # sky: IoU = 4 / (4 + 5 - 4) = 0.8
    assert stats[2] == pytest.approx([0.8, 1, 0, 0])


def test_repeated_image_counts_once_and_reset():
    evaluator = PanopticEvaluator(CATEGORIES, LABEL_TO_CAT)
    missed_second_circle = np.where(np.array(GT) == 2, 0, np.array(GT))
    pred = {"panoptic": missed_second_circle, "segments_info": [{"id": 1, "label": CIRCLE}, {"id": 3, "label": SKY}]}
    target = {"image_id": 5, "panoptic": np.array(GT), "segments": GT_SEGMENTS}
    evaluator.update([pred, pred], [target, target])
    assert list(evaluator.image_stats) == [5]
    assert evaluator.summarize()["panoptic"]["RQ_th"] == pytest.approx(1 / 1.5)  # TP 1, FN 1
    assert evaluator.num_counted == {"all": 2, "th": 1, "st": 1}
    evaluator.reset()
    assert evaluator.summarize()["panoptic"] == dict.fromkeys(SUMMARY_KEYS, 0.0)


@pytest.mark.parametrize(
    "pred_map, segs, match",
    [
        ([[1, 1], [2, 2]], [{"id": 1, "label": CIRCLE}], r"predicted map of image id 1 holds segment ids \[2\]"),
        ([[1, 1], [1, 1]], [{"id": 1, "label": 9}], "label 9 outside"),
        ([[1, 1], [1, 1]], [{"id": 1, "category_id": 42}], "category id 42"),
        ([[1, 1, 1]], [{"id": 1, "label": CIRCLE}], "original size"),
        ([[0, 0], [0, 0]], [{"id": 0, "label": CIRCLE}], "reserved"),
    ],
)
def test_bad_predictions_are_named(pred_map, segs, match):
    with pytest.raises(ValueError, match=match):
        evaluate([[1, 1], [1, 1]], [gt_seg(1, 1)], pred_map, segs)


def test_unlisted_ground_truth_id_is_named():
    with pytest.raises(ValueError, match=r"ground-truth map of image id 1 holds segment ids \[2\]"):
        evaluate([[1, 2]], [gt_seg(1, 1)], [[1, 1]], [{"id": 1, "label": CIRCLE}])


def fake_ranks(monkeypatch, per_rank_stats):
    monkeypatch.setattr(panoptic_eval, "is_distributed", lambda: True)
    monkeypatch.setattr(panoptic_eval, "all_gather_objects", lambda obj: [obj, *per_rank_stats])


def test_gather_merges_ranks_taking_each_image_once(monkeypatch):
    evaluator = PanopticEvaluator(CATEGORIES, LABEL_TO_CAT)
    segs = [{"id": 1, "label": CIRCLE}, {"id": 2, "label": CIRCLE}, {"id": 3, "label": SKY}]
    perfect = {"panoptic": np.array(GT), "segments_info": segs}
    evaluator.update([perfect], [{"image_id": 1, "panoptic": np.array(GT), "segments": GT_SEGMENTS}])
    # "rank 1" evaluated image 2 (one circle missed) and image 1 again (sampler padding, with
    # different stats that must be ignored).
    other = {1: {1: np.array([0.0, 0, 5, 5])}, 2: {1: np.array([1.0, 1, 0, 1])}}
    fake_ranks(monkeypatch, [other])
    summary = evaluator.summarize()["panoptic"]
    assert sorted(evaluator.image_stats) == [1, 2]
    # circle over both images: TP 3 (IoU 1 each), FN 1 -> PQ = RQ = 3 / 3.5
    assert summary["PQ_th"] == pytest.approx(3 / 3.5)
    assert summary["SQ_th"] == pytest.approx(1.0)


def test_distributed_path_single_process(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        evaluator = PanopticEvaluator(CATEGORIES, LABEL_TO_CAT)
        segs = [{"id": 1, "label": CIRCLE}, {"id": 2, "label": CIRCLE}, {"id": 3, "label": SKY}]
        target = {"image_id": 3, "panoptic": torch.tensor(GT), "segments": GT_SEGMENTS}
        evaluator.update([{"panoptic": torch.tensor(GT), "segments_info": segs}], [target])
        evaluator.update([{"panoptic": torch.tensor(GT), "segments_info": segs}], [target])
        summary = evaluator.summarize()["panoptic"]
    finally:
        dist.destroy_process_group()
    assert summary == pytest.approx(dict.fromkeys(SUMMARY_KEYS, 1.0))


def test_perfect_predictions_on_the_synthetic_set(tiny_coco):
    ds = CocoPanoptic(tiny_coco, "val2017", return_panoptic=True)
    evaluator = PanopticEvaluator(ds.categories, ds.label_to_cat_id)
    predictions, targets = [], []
    for idx in range(len(ds)):
        _, target = ds[idx]
        predictions.append({
            "panoptic": target["panoptic"],
            "segments_info": [{"id": int(i), "label": int(lab)}
                              for i, lab in zip(target["segment_ids"], target["labels"])],
        })
        targets.append(target)
    evaluator.update(predictions, targets)
    summary = evaluator.summarize()["panoptic"]
    assert summary == pytest.approx(dict.fromkeys(SUMMARY_KEYS, 1.0))
    assert evaluator.num_counted["st"] > 0 and evaluator.num_counted["th"] > 0


def test_prediction_at_the_network_input_size_is_resized_to_the_original():
    # the model saw the 4x4 image at 2x2: its map is scaled up (nearest), not rejected
    small = [[7, 21], [14, 21]]
    segs = [{"id": 7, "label": CIRCLE}, {"id": 14, "label": CIRCLE}, {"id": 21, "label": SKY}]
    evaluator = PanopticEvaluator(CATEGORIES, LABEL_TO_CAT)
    evaluator.update([{"panoptic": torch.tensor(small), "segments_info": segs}],
                     [{"image_id": 1, "panoptic": torch.tensor(GT), "segments": GT_SEGMENTS,
                       "size": torch.tensor([2, 2])}])
    assert evaluator.summarize()["panoptic"]["PQ"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="original size"):  # any other size is still an error
        evaluate(GT, GT_SEGMENTS, [[7, 21, 21]], segs)
