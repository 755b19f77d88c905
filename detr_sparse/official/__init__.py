"""The authors' released checkpoints of DETR, PnP-DETR, Deformable DETR and Sparse DETR, SViT's and
ViT-Adapter's mmdet Mask R-CNN (svit.py) and DGE's DeiT classification weights (vtpack.py, a
backbone), read into this project's models: which one a file holds (layout.py), the renaming of
its keys (names.py; vit.py: the ViT parts both ViT formats share), its class heads cut to a
dataset's classes (categories.py), and the checked conversion (convert.py).
tools/convert_checkpoint.py writes the result as a checkpoint (a backbone's: backbone weights);
engine/checkpoint.py converts on the fly where weights are loaded."""
from .categories import coco_categories, head_rows, read_categories
from .convert import Converted, convert_state_dict, head_kind, training_arg
from .layout import FORMATS, ConversionError, Layout, detect_layout, is_official

__all__ = ["FORMATS", "ConversionError", "Converted", "Layout", "coco_categories", "convert_state_dict",
           "detect_layout", "head_kind", "head_rows", "is_official", "read_categories", "training_arg"]
