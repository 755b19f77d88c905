"""What an evaluation leaves next to its run, written by the main process once the ranks'
results are gathered: the COCO results JSON of its box and mask evaluation
(`eval_epoch<N>_bbox.json`, `eval_epoch<N>_segm.json`: the newest evaluation's, earlier ones are
replaced, since on COCO each holds hundreds of thousands of detections) and a Markdown table of
every category's AP, ground-truth and detection counts (and PQ / SQ / RQ on a panoptic set),
`eval_epoch<N>_per_category.md`, which is kept and also logged."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from datasets.coco_eval import CocoEvaluator
from datasets.panoptic_eval import PanopticEvaluator

log = logging.getLogger("detr_sparse.eval")

NOTE = ("AP: IoU 0.50:0.95, all areas, 100 detections per image; gt: non-crowd instances in the "
        "evaluated images; -: no ground truth (AP) or not counted (PQ)")


def per_category_rows(evaluators) -> list[dict]:
    """A row per category in label order: "id", "name", "gt" and, per COCO iou type T,
    "T detections", "T AP", "T AP50"; "PQ", "SQ", "RQ" from a panoptic evaluator (-1: a
    category without ground truth, or not counted)."""
    rows: dict[int, dict] = {}
    for evaluator in evaluators:
        if isinstance(evaluator, CocoEvaluator):
            for iou_type in evaluator.iou_types:
                for cat_id, r in evaluator.per_category(iou_type).items():
                    row = rows.setdefault(cat_id, {"id": cat_id, "name": evaluator.coco_gt.cats[cat_id].get("name", "")})
                    row.update({"gt": r["gt"], f"{iou_type} detections": r["detections"],
                                f"{iou_type} AP": r["AP"], f"{iou_type} AP50": r["AP50"]})
        elif isinstance(evaluator, PanopticEvaluator):
            for cat_id in evaluator.label_to_cat_id:
                row = rows.setdefault(cat_id, {"id": cat_id, "name": evaluator.categories[cat_id].get("name", "")})
                counted = evaluator.per_class.get(cat_id, {})
                row.update({k: counted.get(k, -1.0) for k in ("PQ", "SQ", "RQ")})
    return list(rows.values())


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (columns in the order first seen; -1 shown as -)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value) -> str:
        if isinstance(value, float):
            return "-" if value < 0 else f"{value:.3f}"
        return str(value)

    lines = [columns, ["---"] * len(columns)] + [[cell(row.get(c, "")) for c in columns] for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def write_eval_outputs(output_dir: str | Path, epoch: int, evaluators) -> list[Path]:
    """Write (main process only, after `evaluate` gathered and summarized) the results JSON of
    every COCO iou type and the per-category table; log the table. Returns the paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for evaluator in evaluators:
        if not isinstance(evaluator, CocoEvaluator):
            continue
        for iou_type in evaluator.iou_types:
            path = out / f"eval_epoch{epoch}_{iou_type}.json"
            for older in out.glob(f"eval_epoch*_{iou_type}.json"):
                older.unlink()
            path.write_text(json.dumps(evaluator.coco_results(iou_type)))
            written.append(path)
    rows = per_category_rows(evaluators)
    if rows:
        table = markdown_table(rows)
        path = out / f"eval_epoch{epoch}_per_category.md"
        path.write_text(f"# Per-category results, epoch {epoch}\n\n{NOTE}.\n\n{table}")
        written.append(path)
        log.info("per-category results at epoch %d (%s):\n%s", epoch, path, table.rstrip())
    return written
