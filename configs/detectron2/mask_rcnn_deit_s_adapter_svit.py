# detectron2's Mask R-CNN, recipe of configs/mask_rcnn_deit_s_adapter_svit.yaml:
#   python tools/train_detectron2.py --config-file configs/detectron2/mask_rcnn_deit_s_adapter_svit.py
# The SViT fine-tune starts from the dense detector trained by mask_rcnn_deit_s_adapter.py.
from pathlib import Path

from detr_sparse.integrations.detectron2_recipe import recipe

model, dataloader, optimizer, lr_multiplier, train, data = recipe(
    Path(__file__).parents[1] / "mask_rcnn_deit_s_adapter_svit.yaml",
    init_checkpoint="out/detectron2/mask_rcnn_deit_s_adapter/model_final.pth")
