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
import torch.nn.functional as nnf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

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
                scale_x, scale_y = orig_hw[1] / in_w, orig_hw[0] / in_h
                boxes = pred["boxes"].detach().float().cpu().reshape(-1, 4)
                boxes = boxes * torch.tensor([scale_x, scale_y, scale_x, scale_y])
                xywh = box_convert(boxes, "xyxy", "xywh").tolist()
                self.results["bbox"][img_id] = [
                    {"image_id": img_id, "category_id": c, "bbox": b, "score": s}
                    for c, b, s in zip(cat_ids, xywh, scores)
                ]
            if "segm" in self.iou_types:
                if "masks" not in pred:
                    raise ValueError("'segm' evaluation needs 'masks' in every prediction")
                rles = self._encode_masks(pred["masks"], (in_h, in_w), orig_hw)
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

    @staticmethod
    def _encode_masks(masks: torch.Tensor, in_hw: tuple[int, int], orig_hw: tuple[int, int]) -> list[dict]:
        masks = masks.detach().float().cpu()
        if masks.dim() == 4:
            masks = masks[:, 0]
        if masks.shape[0] == 0:
            return []
        # Masks handed over at the padded batch size hold padding beyond the image: cut it.
        masks = masks[:, : in_hw[0], : in_hw[1]]
        masks = nnf.interpolate(masks[:, None], size=orig_hw, mode="bilinear", align_corners=False)[:, 0] > 0.5
        # pycocotools wants a Fortran-ordered (H, W, N) uint8 array.
        rles = mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # str, so results pickle and dump to JSON
        return rles

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

    def _evaluate(self, iou_type: str) -> dict[str, float]:
        results = [dict(r) for img_id in sorted(self.results[iou_type]) for r in self.results[iou_type][img_id]]
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
