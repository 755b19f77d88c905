import json
from collections import Counter

import torch

from datasets import CocoDetection, CocoEvaluator
from engine.eval_outputs import markdown_table, per_category_rows, write_eval_outputs


def _table(path) -> list[dict]:
    """The rows of a per-category Markdown table as {column: text}."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_an_evaluation_writes_the_coco_results_and_the_per_category_table(tiny_run, custom_coco):
    val_file = next(o for o in custom_coco if o.startswith("data.val_annotations=")).split("=", 1)[1]
    truth = json.loads(open(val_file).read())
    results = json.loads((tiny_run / "eval_epoch1_bbox.json").read_text())
    # DETR reports every query: 4 val images x 8 queries, in COCO's results format
    assert len(results) == 4 * 8
    assert {r["image_id"] for r in results} == {i["id"] for i in truth["images"]}
    cat_ids = [c["id"] for c in truth["categories"]]
    assert all(r["category_id"] in cat_ids and len(r["bbox"]) == 4 and 0 <= r["score"] <= 1 for r in results)
    assert not (tiny_run / "eval_epoch1_segm.json").exists()  # a box model

    rows = _table(tiny_run / "eval_epoch1_per_category.md")
    assert [int(r["id"]) for r in rows] == sorted(cat_ids)
    # the names of the split's own annotation file (custom_coco renames them)
    assert [r["name"] for r in rows] == [c["name"] for c in sorted(truth["categories"], key=lambda c: c["id"])]
    assert rows[0]["name"] == "shape circle"
    gt = Counter(a["category_id"] for a in truth["annotations"] if not a.get("iscrowd", 0))
    found = Counter(r["category_id"] for r in results)
    for row in rows:
        cat = int(row["id"])
        assert int(row["gt"]) == gt[cat] and int(row["bbox detections"]) == found[cat]
        assert row["bbox AP"] == "-" if gt[cat] == 0 else 0 <= float(row["bbox AP"]) <= 1


def test_perfect_masks_give_ap_one_per_category_and_older_results_are_replaced(tiny_coco, tmp_path, caplog):
    val = CocoDetection(tiny_coco / "val2017", tiny_coco / "annotations" / "instances_val2017.json", return_masks=True)
    targets = [val[i][1] for i in range(len(val))]
    evaluator = CocoEvaluator(val.coco, val.label_to_cat_id, ("bbox", "segm"))
    evaluator.update([{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"],
                       "masks": t["masks"].float()} for t in targets], targets)
    evaluator.summarize()
    (tmp_path / "eval_epoch2_bbox.json").write_text("[]")  # an earlier evaluation's
    with caplog.at_level("INFO", logger="detr_sparse.eval"):
        written = write_eval_outputs(tmp_path, 3, [evaluator])
    assert sorted(p.name for p in written) == ["eval_epoch3_bbox.json", "eval_epoch3_per_category.md",
                                               "eval_epoch3_segm.json"]
    assert not (tmp_path / "eval_epoch2_bbox.json").exists()
    segm = json.loads((tmp_path / "eval_epoch3_segm.json").read_text())
    assert len(segm) == sum(len(t["labels"]) for t in targets) and all("counts" in r["segmentation"] for r in segm)
    present = {val.label_to_cat_id[label] for t in targets for label in t["labels"].tolist()}
    for row in _table(tmp_path / "eval_epoch3_per_category.md"):
        for iou_type in ("bbox", "segm"):
            expected = "1.000" if int(row["id"]) in present else "-"
            assert row[f"{iou_type} AP"] == row[f"{iou_type} AP50"] == expected, row
    assert "per-category results at epoch 3" in caplog.text and "| 1 | circle |" in caplog.text


def test_the_table_marks_missing_values():
    rows = [{"id": 1, "name": "a", "bbox AP": 0.5}, {"id": 2, "name": "b", "bbox AP": -1.0, "PQ": 0.25}]
    assert markdown_table(rows).splitlines() == ["| id | name | bbox AP | PQ |", "| --- | --- | --- | --- |",
                                                 "| 1 | a | 0.500 |  |", "| 2 | b | - | 0.250 |"]
    assert per_category_rows([]) == []


def test_nothing_detected_gives_zero_ap_rows(tiny_coco):
    val = CocoDetection(tiny_coco / "val2017", tiny_coco / "annotations" / "instances_val2017.json")
    evaluator = CocoEvaluator(val.coco, val.label_to_cat_id)
    targets = [val[i][1] for i in range(len(val))]
    evaluator.update([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
                      for _ in targets], targets)
    evaluator.summarize()
    rows = evaluator.per_category("bbox")
    assert all(r["detections"] == 0 and r["AP"] == (0.0 if r["gt"] else -1.0) for r in rows.values())
