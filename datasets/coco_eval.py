"""COCO box and mask AP with pycocotools, across any number of processes.

Predictions arrive in the coordinates of the network input (the transformed image) and are
mapped back to the original image, where the ground truth of the annotation file lives.
"""
from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from detr_sparse.postprocess import boxes_to_original, masks_to_original
from engine.distributed import all_gather_objects, broadcast_object, get_rank, is_distributed

logger = logging.getLogger("detr_sparse.eval")

# The order of COCOeval.stats.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def merge_rank_results(per_rank: list[tuple[list[int], dict]], iou_types) -> tuple[set[int], dict]:
    """Union of the ranks' (image ids, results) with every image taken once, from the first
    rank that saw it: a DistributedSampler pads the last batch by repeating images, and a
    repeated image must not count its detections twice."""
    img_ids: set[int] = set()
    results: dict[str, dict[int, list]] = {t: {} for t in iou_types}
    for rank_ids, rank_results in per_rank:
        for img_id in rank_ids:
            if img_id in img_ids:
                continue
            img_ids.add(img_id)
            for t in iou_types:
                results[t][img_id] = rank_results[t].get(img_id, [])
    return img_ids, results


def encode_rle(masks: torch.Tensor) -> list[dict]:
    """(N, H, W) bool masks -> COCO RLEs ({"size", "counts"} with counts as str, so results
    pickle and dump to JSON)."""
    if masks.shape[0] == 0:
        return []
    # pycocotools wants a Fortran-ordered (H, W, N) uint8 array.
    rles = mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


class CocoEvaluator:
    """Collects detections with ``update``, then ``summarize`` returns, on every rank,
    ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
    "ARm", "ARl"}}`` (COCOeval's 12 stats by name; -1 where pycocotools finds no ground
    truth for a stat, all 0 when there were no detections at all). The COCOeval objects
    stay in ``self.coco_eval`` on the rank that ran them (rank 0).
    """

    def __init__(self, coco_gt: COCO, label_to_cat_id: list[int], iou_types=("bbox",)) -> None:
        for t in iou_types:
            if t not in IOU_TYPES:
                raise ValueError(f"unsupported iou type {t!r}; expected one of {IOU_TYPES}")
        self.coco_gt = coco_gt
        self.label_to_cat_id = [int(c) for c in label_to_cat_id]
        self.iou_types = tuple(iou_types)
        self.coco_eval: dict[str, COCOeval] = {}
        self.reset()

    def reset(self) -> None:
        # Every evaluated image, including those without detections: they still count
        # their ground truth as missed.
        self.img_ids: set[int] = set()
        # iou type -> image id -> COCO result entries; keyed by image so repeats dedupe.
        self.results: dict[str, dict[int, list[dict]]] = {t: {} for t in self.iou_types}
        self._gathered = False

    @torch.no_grad()
    def update(self, predictions: list[dict], targets: list[dict]) -> None:
        """predictions[i]: ``boxes`` (N, 4) absolute xyxy in the input image of size
        targets[i]["size"], ``scores`` (N,), ``labels`` (N,) contiguous, and for "segm"
        ``masks`` (N, H, W) or (N, 1, H, W) probabilities at the input-image size.
        targets[i]: ``image_id``, ``size`` and ``orig_size`` ([h, w])."""
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        for pred, target in zip(predictions, targets):
            img_id = int(target["image_id"])
            self.img_ids.add(img_id)
            in_h, in_w = (int(v) for v in target["size"])
            orig_hw = tuple(int(v) for v in target["orig_size"])
            scores = pred["scores"].detach().float().cpu().tolist()
            cat_ids = self._cat_ids(pred["labels"])
            if "bbox" in self.iou_types:
                boxes = boxes_to_original(pred["boxes"].detach().cpu(), (in_h, in_w), orig_hw)
                xywh = box_convert(boxes, "xyxy", "xywh").tolist()
                self.results["bbox"][img_id] = [
                    {"image_id": img_id, "category_id": c, "bbox": b, "score": s}
                    for c, b, s in zip(cat_ids, xywh, scores)
                ]
            if "segm" in self.iou_types:
                if "masks" not in pred:
                    raise ValueError("'segm' evaluation needs 'masks' in every prediction")
                rles = encode_rle(masks_to_original(pred["masks"].detach().cpu(), (in_h, in_w), orig_hw))
                # No "bbox" key: loadRes would then take the box area as the segment area.
                self.results["segm"][img_id] = [
                    {"image_id": img_id, "category_id": c, "segmentation": r, "score": s}
                    for c, r, s in zip(cat_ids, rles, scores)
                ]
        self._gathered = False

    def _cat_ids(self, labels: torch.Tensor) -> list[int]:
        labels = labels.detach().cpu().tolist()
        bad = [lab for lab in labels if not 0 <= lab < len(self.label_to_cat_id)]
        if bad:
            raise ValueError(f"labels {sorted(set(bad))} outside 0..{len(self.label_to_cat_id) - 1}")
        return [self.label_to_cat_id[lab] for lab in labels]

    def gather(self) -> None:
        """Give every rank all ranks' results (no-op without torch.distributed)."""
        if self._gathered or not is_distributed():
            return
        per_rank = all_gather_objects((sorted(self.img_ids), self.results))
        self.img_ids, self.results = merge_rank_results(per_rank, self.iou_types)
        self._gathered = True

    def summarize(self) -> dict[str, dict[str, float]]:
        """COCO AP per iou type on the evaluated images; identical on every rank."""
        self.gather()
        summary = {t: self._evaluate(t) for t in self.iou_types} if get_rank() == 0 else None
        return broadcast_object(summary)

    def coco_results(self, iou_type: str) -> list[dict]:
        """This rank's results of an iou type (every rank's after ``gather``) in COCO's results
        format, by image id: what ``loadRes`` reads and a results JSON holds."""
        return [dict(r) for img_id in sorted(self.results[iou_type]) for r in self.results[iou_type][img_id]]

    def per_category(self, iou_type: str) -> dict[int, dict]:
        """After ``summarize``, on rank 0: category id -> {"AP", "AP50" (area all, 100
        detections; -1 for a category without ground truth in the evaluated images), "gt" (its
        non-crowd instances there), "detections" (its results)}, in label order."""
        gt = dict.fromkeys(self.label_to_cat_id, 0)
        for img_id in self.img_ids:
            for ann in self.coco_gt.imgToAnns.get(img_id, []):
                if not ann.get("iscrowd", 0) and ann["category_id"] in gt:
                    gt[ann["category_id"]] += 1
        found = dict.fromkeys(self.label_to_cat_id, 0)
        for r in self.coco_results(iou_type):
            found[r["category_id"]] += 1
        coco_eval = self.coco_eval.get(iou_type)
        rows = {}
        for cat_id in self.label_to_cat_id:
            ap = ap50 = -1.0 if gt[cat_id] == 0 else 0.0
            if coco_eval is not None and cat_id in coco_eval.params.catIds:
                # precision: (IoU thresholds, recall points, categories, areas, max detections); -1: none
                precision = coco_eval.eval["precision"][:, :, coco_eval.params.catIds.index(cat_id), 0, -1]
                ap = float(precision[precision > -1].mean()) if (precision > -1).any() else -1.0
                ap50 = float(precision[0][precision[0] > -1].mean()) if (precision[0] > -1).any() else -1.0
            rows[cat_id] = {"AP": ap, "AP50": ap50, "gt": gt[cat_id], "detections": found[cat_id]}
        return rows

    def _evaluate(self, iou_type: str) -> dict[str, float]:
        results = self.coco_results(iou_type)
        if not results:
            # pycocotools' loadRes cannot take an empty list; nothing detected is AP 0.
            return dict.fromkeys(STAT_NAMES, 0.0)
        unknown = {r["image_id"] for r in results} - set(self.coco_gt.getImgIds())
        if unknown:
            raise ValueError(f"results for image ids {sorted(unknown)[:10]} that the ground truth lacks")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            coco_dt = self.coco_gt.loadRes(results)
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType=iou_type)
            coco_eval.params.imgIds = sorted(self.img_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        logger.debug("COCOeval %s:\n%s", iou_type, printed.getvalue())
        self.coco_eval[iou_type] = coco_eval
        return {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}
