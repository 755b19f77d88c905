"""Class layouts: the authors' heads have one row per category id (the id is the label their
code trains with), this project's one row per class in category-id order (0..K-1). Here:
the COCO category lists, the rows of an authors' head that make ours, and a dataset's
categories read from its COCO annotation file."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .errors import ConversionError

# COCO 2017 detection: 80 ids of 1..90 (DETR's head: 91 id rows + no-object)
COCO_THING_IDS = (*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
                  *range(72, 83), *range(84, 91))
# COCO panoptic: those 80 things and 53 stuff ids of 92..200 (panoptic DETR: 250 rows + no-object)
COCO_STUFF_IDS = (92, 93, 95, 100, 107, 109, 112, 118, 119, 122, 125, 128, 130, 133, 138, 141, 144,
                  145, 147, 148, 149, 151, 154, 155, 156, 159, 161, 166, 168, 171, 175, 176, 177,
                  178, 180, 181, *range(184, 201))

# how a head's rows relate to the classes:
#   softmax: a row per category id, then the no-object row (DETR, PnP-DETR)
#   sigmoid: a row per category id, no no-object row (the Deformable DETR family)
#   objectness: two-stage Deformable DETR's proposal head, trained with every object as
#     class 0: its row 0 scores objectness and is what proposals are ranked by
HEAD_KINDS = ("softmax", "sigmoid", "objectness")


def coco_categories(panoptic: bool) -> tuple[list[int], list[bool]]:
    """COCO's category ids in id order and which are things: detection's 80 (all things),
    or panoptic's 133 (80 things, 53 stuff)."""
    ids = list(COCO_THING_IDS) + (list(COCO_STUFF_IDS) if panoptic else [])
    return ids, [c in COCO_THING_IDS for c in ids]


def read_categories(path: str | Path) -> tuple[list[int], list[bool]]:
    """The category ids of a COCO instances or panoptic annotation file in id order (the
    project's label order) and whether each is a thing ("isthing", 1 when absent), as the
    datasets read them (`datasets.coco.read_categories`); ConversionError naming the file."""
    from datasets.coco import read_categories as dataset_categories

    try:
        cats = dataset_categories(str(path))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: no COCO 'categories' list ({type(e).__name__}: {e})") from e
    return [c["id"] for c in cats], [bool(c["isthing"]) for c in cats]


def head_rows(kind: str, rows: int, categories: list[int], key: str = "class head") -> Tensor:
    """The row indices (int64) of an authors' `rows`-row head that give this project's head
    for `categories` (category ids in label order): the id rows in label order, then the
    no-object row for a softmax head; an objectness head keeps its first rows (row 0 ranks
    the proposals). ConversionError when a category id has no row."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"head kind '{kind}' not in {HEAD_KINDS}")
    if kind == "objectness":
        if len(categories) > rows:
            raise ConversionError(f"{key}: {rows} rows, fewer than the {len(categories)} classes")
        return torch.arange(len(categories))
    id_rows = rows - 1 if kind == "softmax" else rows
    too_large = [c for c in categories if not 0 <= c < id_rows]
    if too_large:
        raise ConversionError(f"{key}: {rows} rows hold category ids 0..{id_rows - 1}"
                            f"{' and no-object' if kind == 'softmax' else ''}; the dataset's ids "
                            f"{too_large[:5]} have no row (a checkpoint of another dataset?)")
    return torch.tensor(list(categories) + ([rows - 1] if kind == "softmax" else []), dtype=torch.int64)
