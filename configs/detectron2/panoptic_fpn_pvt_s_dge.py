# detectron2's Panoptic FPN, recipe of configs/panoptic_fpn_pvt_s_dge.yaml:
#   python tools/train_detectron2.py --config-file configs/detectron2/panoptic_fpn_pvt_s_dge.py
from pathlib import Path

from detr_sparse.integrations.detectron2_recipe import recipe

model, dataloader, optimizer, lr_multiplier, train, data = recipe(
    Path(__file__).parents[1] / "panoptic_fpn_pvt_s_dge.yaml")
