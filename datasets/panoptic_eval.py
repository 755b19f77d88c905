"""Panoptic quality (PQ, SQ, RQ; Kirillov et al., "Panoptic Segmentation", CVPR 2019).

The rules are those of the COCO panoptic evaluation (panopticapi), computed per image on
segment-id maps at the original image size:

- a predicted and a ground-truth segment of the same category match when their IoU > 0.5
  (then the match is unique, since segments of one map do not overlap); the union leaves
  out the predicted pixels that fall on VOID ground truth (id 0), so predicting over
  unlabelled pixels costs nothing;
- crowd ground-truth segments are never matched and never missed;
- an unmatched prediction is a false positive unless more than half of its pixels lie on
  VOID or on crowd regions of its own category;
- an unmatched non-crowd ground-truth segment is a false negative.

Per category: PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP (0 without TP),
RQ = TP / (TP + FP/2 + FN/2). Each average is over the categories that have any TP, FP or
FN (the others are skipped), for all categories, the things and the stuff. Values are
fractions in [0, 1], like the box AP of ``CocoEvaluator`` (panopticapi prints percentages).
"""
from __future__ import annotations

import numpy as np
import torch

from detr_sparse.postprocess import id_map_to_original
from engine.distributed import all_gather_objects, is_distributed

MATCH_IOU = 0.5
IGNORED_FRACTION = 0.5  # an unmatched prediction this much on VOID / crowd is not a FP
VOID = 0
SUMMARY_KEYS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")

# Per-category statistics are arrays [sum IoU, TP, FP, FN].
IOU, TP, FP, FN = range(4)


def _as_numpy_map(value, what: str) -> np.ndarray:
    if torch.is_tensor(value):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be an (H, W) integer segment-id map, got {array.dtype} of shape {array.shape}")
    return array.astype(np.int64, copy=False)


def pq_image_stats(
    gt_map: np.ndarray,
    gt_segments: dict[int, tuple[int, bool]],
    pred_map: np.ndarray,
    pred_segments: dict[int, int],
) -> dict[int, np.ndarray]:
    """PQ statistics of one image: category id -> float64 [sum IoU, TP, FP, FN].

    ``gt_segments``: segment id -> (category id, iscrowd); ``pred_segments``: segment id ->
    category id. Both maps are (H, W) integer arrays of the same shape; id 0 is VOID in the
    ground truth and "no segment" in the prediction. Every non-zero id of a map must be
    listed (checked by the caller)."""
    stats: dict[int, np.ndarray] = {}

    def stat(cat_id: int) -> np.ndarray:
        if cat_id not in stats:
            stats[cat_id] = np.zeros(4, dtype=np.float64)
        return stats[cat_id]

    # Pixel counts of every (GT id, predicted id) pair, through compact indices.
    gt_ids, gt_index = np.unique(gt_map, return_inverse=True)
    pred_ids, pred_index = np.unique(pred_map, return_inverse=True)
    pair = gt_index.reshape(-1) * len(pred_ids) + pred_index.reshape(-1)
    counts = np.bincount(pair, minlength=len(gt_ids) * len(pred_ids)).reshape(len(gt_ids), len(pred_ids))
    gt_area = dict(zip(gt_ids.tolist(), counts.sum(1).tolist()))
    pred_area = dict(zip(pred_ids.tolist(), counts.sum(0).tolist()))
    gt_row = {g: i for i, g in enumerate(gt_ids.tolist())}
    pred_col = {p: j for j, p in enumerate(pred_ids.tolist())}

    def overlap(gt_id: int, pred_id: int) -> int:
        if gt_id not in gt_row or pred_id not in pred_col:
            return 0
        return int(counts[gt_row[gt_id], pred_col[pred_id]])

    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for g, gt_id in enumerate(gt_ids.tolist()):
        if gt_id not in gt_segments or gt_segments[gt_id][1]:
            continue  # VOID, or crowd: never matched
        gt_cat = gt_segments[gt_id][0]
        for p in np.flatnonzero(counts[g]).tolist():
            pred_id = int(pred_ids[p])
            if pred_segments.get(pred_id) != gt_cat:
                continue
            inter = int(counts[g, p])
            union = pred_area[pred_id] + gt_area[gt_id] - inter - overlap(VOID, pred_id)
            iou = inter / union
            if iou > MATCH_IOU:
                s = stat(gt_cat)
                s[IOU] += iou
                s[TP] += 1
                gt_matched.add(gt_id)
                pred_matched.add(pred_id)

    crowd_by_cat: dict[int, list[int]] = {}
    for gt_id, (cat_id, crowd) in gt_segments.items():
        if crowd:
            crowd_by_cat.setdefault(cat_id, []).append(gt_id)
        elif gt_id not in gt_matched:
            stat(cat_id)[FN] += 1  # also a listed segment that has no pixel, as panopticapi counts it

    for pred_id, cat_id in pred_segments.items():
        area = pred_area.get(pred_id, 0)
        if pred_id in pred_matched or area == 0:
            continue  # a listed prediction without pixels predicts nothing
        ignored = overlap(VOID, pred_id) + sum(overlap(c, pred_id) for c in crowd_by_cat.get(cat_id, ()))
        if ignored / area > IGNORED_FRACTION:
            continue
        stat(cat_id)[FP] += 1
    return stats


def pq_from_stats(stats: dict[int, np.ndarray], cat_ids) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Averages over ``cat_ids`` of the per-category PQ, SQ and RQ, skipping categories
    without any TP, FP or FN: ({"PQ", "SQ", "RQ", "n"}, category id -> {"PQ", "SQ", "RQ"}).
    All 0 (and n 0) when no category counts."""
    per_class: dict[int, dict[str, float]] = {}
    for cat_id in cat_ids:
        iou, tp, fp, fn = stats.get(cat_id, np.zeros(4))
        if tp + fp + fn == 0:
            continue
        denom = tp + 0.5 * fp + 0.5 * fn
        per_class[cat_id] = {"PQ": iou / denom, "SQ": iou / tp if tp else 0.0, "RQ": tp / denom}
    n = len(per_class)
    avg = {k: (sum(r[k] for r in per_class.values()) / n if n else 0.0) for k in ("PQ", "SQ", "RQ")}
    return {**{k: float(v) for k, v in avg.items()}, "n": n}, per_class


class PanopticEvaluator:
    """Collects per-image PQ statistics with ``update``; ``summarize`` returns, on every
    rank, ``{"panoptic": {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st",
    "RQ_st"}}`` as fractions in [0, 1] (_th: things only, _st: stuff only). Per-category
    results of the last ``summarize`` are in ``self.per_class`` (category id -> {"PQ", "SQ",
    "RQ"}) and the number of categories averaged in ``self.num_counted``.

    ``categories``: dicts with ``id``, ``isthing`` (and ``name``), e.g.
    ``CocoPanoptic.categories``; ``label_to_cat_id``: contiguous label -> category id, e.g.
    ``CocoPanoptic.label_to_cat_id``.
    """

    def __init__(self, categories: list[dict], label_to_cat_id: list[int]) -> None:
        self.categories = {int(c["id"]): c for c in categories}
        self.thing_ids = sorted(c for c, info in self.categories.items() if info["isthing"])
        self.stuff_ids = sorted(c for c, info in self.categories.items() if not info["isthing"])
        self.label_to_cat_id = [int(c) for c in label_to_cat_id]
        unknown = sorted(set(self.label_to_cat_id) - set(self.categories))
        if unknown:
            raise ValueError(f"label_to_cat_id holds category ids {unknown} missing from categories")
        self.per_class: dict[int, dict[str, float]] = {}
        self.num_counted: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        # image id -> {category id -> [sum IoU, TP, FP, FN]}: a few numbers per image, cheap
        # to gather, and keyed by image so an image a padded DistributedSampler repeats
        # counts once.
        self.image_stats: dict[int, dict[int, np.ndarray]] = {}
        self._gathered = False

    @torch.no_grad()
    def update(self, predictions: list[dict], targets: list[dict]) -> None:
        """predictions[i]: ``panoptic`` (H, W) integer segment-id map (0 = no segment) at
        the image's original size, or at the network input size ``targets[i]["size"]`` (as a
        model predicts it; resized to the original size, nearest) and ``segments_info``: a list of {"id", "label"}
        (contiguous label) or {"id", "category_id"} for every non-zero id of the map.
        targets[i]: ``image_id``, ``panoptic`` (H, W) ground-truth id map at the original
        size (0 = VOID) and ``segments``: a list of {"id", "category_id", "iscrowd"} (what
        ``CocoPanoptic`` gives with ``return_panoptic``). Tensors or numpy arrays."""
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        for pred, target in zip(predictions, targets):
            img_id = int(target["image_id"])
            gt_map = _as_numpy_map(target["panoptic"], f"target 'panoptic' of image id {img_id}")
            pred_map = _as_numpy_map(pred["panoptic"], f"prediction 'panoptic' of image id {img_id}")
            at_input_size = "size" in target and pred_map.shape == tuple(int(v) for v in target["size"])
            if pred_map.shape != gt_map.shape and at_input_size:
                pred_map = id_map_to_original(torch.from_numpy(pred_map), gt_map.shape).numpy()
            if gt_map.shape != pred_map.shape:
                raise ValueError(
                    f"prediction for image id {img_id} is {pred_map.shape[0]}x{pred_map.shape[1]} but the "
                    f"ground truth is {gt_map.shape[0]}x{gt_map.shape[1]}: predictions must be at the original size"
                )
            gt_segments = self._gt_segments(target["segments"], gt_map, img_id)
            pred_segments = self._pred_segments(pred["segments_info"], pred_map, img_id)
            self.image_stats[img_id] = pq_image_stats(gt_map, gt_segments, pred_map, pred_segments)
        self._gathered = False

    def _category(self, cat_id, where: str) -> int:
        if cat_id is None or int(cat_id) not in self.categories:
            raise ValueError(f"{where} has category id {cat_id}, not among the categories {sorted(self.categories)}")
        return int(cat_id)

    def _gt_segments(self, segments: list[dict], gt_map: np.ndarray, img_id: int) -> dict[int, tuple[int, bool]]:
        out = {}
        for seg in segments:
            where = f"ground-truth segment {seg.get('id')} of image id {img_id}"
            if int(seg["id"]) == VOID:
                raise ValueError(f"{where}: id {VOID} is reserved for VOID pixels")
            out[int(seg["id"])] = (self._category(seg.get("category_id"), where), bool(seg.get("iscrowd", 0)))
        self._check_listed(gt_map, out, f"the ground-truth map of image id {img_id}")
        return out

    def _pred_segments(self, segments: list[dict], pred_map: np.ndarray, img_id: int) -> dict[int, int]:
        out = {}
        for seg in segments:
            seg_id = int(seg["id"])
            where = f"predicted segment {seg_id} of image id {img_id}"
            if seg_id == VOID:
                raise ValueError(f"{where}: id {VOID} is reserved for pixels without a segment")
            if "label" in seg:
                label = int(seg["label"])
                if not 0 <= label < len(self.label_to_cat_id):
                    raise ValueError(f"{where} has label {label} outside 0..{len(self.label_to_cat_id) - 1}")
                out[seg_id] = self.label_to_cat_id[label]
            else:
                out[seg_id] = self._category(seg.get("category_id"), where)
        self._check_listed(pred_map, out, f"the predicted map of image id {img_id}")
        return out

    @staticmethod
    def _check_listed(id_map: np.ndarray, segments: dict, what: str) -> None:
        ids = np.unique(id_map)
        missing = [int(i) for i in ids if i != VOID and int(i) not in segments]
        if missing:
            raise ValueError(f"{what} holds segment ids {missing[:10]} that its segment list does not hold")

    def gather(self) -> None:
        """Give every rank all ranks' statistics (no-op without torch.distributed); an
        image seen by several ranks counts once, from the first."""
        if self._gathered or not is_distributed():
            return
        merged: dict[int, dict[int, np.ndarray]] = {}
        for rank_stats in all_gather_objects(self.image_stats):
            for img_id, stats in rank_stats.items():
                merged.setdefault(img_id, stats)
        self.image_stats = merged
        self._gathered = True

    def summarize(self) -> dict[str, dict[str, float]]:
        """PQ / SQ / RQ over every evaluated image; identical on every rank."""
        self.gather()
        totals: dict[int, np.ndarray] = {}
        for img_id in sorted(self.image_stats):
            for cat_id, s in self.image_stats[img_id].items():
                totals[cat_id] = totals.get(cat_id, np.zeros(4)) + s
        summary: dict[str, float] = {}
        self.num_counted = {}
        for suffix, cat_ids in (("", sorted(self.categories)), ("_th", self.thing_ids), ("_st", self.stuff_ids)):
            avg, per_class = pq_from_stats(totals, cat_ids)
            for k in ("PQ", "SQ", "RQ"):
                summary[k + suffix] = avg[k]
            self.num_counted[suffix.strip("_") or "all"] = avg["n"]
            if not suffix:
                self.per_class = per_class
        return {"panoptic": summary}
