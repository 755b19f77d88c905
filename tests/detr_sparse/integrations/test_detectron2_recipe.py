"""A project YAML recipe as a detectron2 LazyConfig (configs/detectron2/*.py)."""
import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (DETECTRON2=1 bash launch.sh --setup)")

from detectron2.config import LazyConfig  # noqa: E402

from detr_sparse.integrations.detectron2_recipe import recipe  # noqa: E402
from helpers import REPO  # noqa: E402


def test_every_detectron2_config_loads_with_its_yamls_backbone_and_schedule():
    configs = sorted((REPO / "configs" / "detectron2").glob("*.py"))
    assert len(configs) >= 19
    for path in configs:
        cfg = LazyConfig.load(str(path))
        yaml = (REPO / "configs" / f"{path.stem}.yaml").read_text()
        assert f"output_dir: out/{path.stem}" in yaml and cfg.train.output_dir == f"out/detectron2/{path.stem}"
        assert {"model", "dataloader", "optimizer", "lr_multiplier", "train", "data"} <= set(cfg)
        assert cfg.model.backbone.bottom_up.name in yaml or "_base_" in yaml


def test_the_recipe_carries_over_the_yamls_heads_data_and_schedule():
    model, loader, optimizer, lr, train, data = recipe(REPO / "configs" / "mask_rcnn_r18_synthetic.yaml")
    rpn, heads = model.proposal_generator, model.roi_heads
    assert rpn.in_features == ["p2", "p3", "p4", "p5"] and heads.box_in_features == ["p2", "p3", "p4"]
    assert rpn.anchor_generator.sizes == [[16.0], [32.0], [64.0], [128.0]]  # anchor_scale 4 x strides
    assert rpn.post_nms_topk == (300, 100) and heads.batch_size_per_image == 64 and heads.num_classes == 8
    assert heads.box_head.fc_dims == [512, 512] and heads.mask_head.conv_dims == [64] * 5
    assert heads.box_predictor.test_topk_per_image == 20 and model.backbone.out_channels == 128
    assert model.backbone.bottom_up.pretrained == "out/backbone_r18_synthetic.pth"
    # 2 processes x 4 images: 250 iterations an epoch, 12 epochs, the drop at epoch 10
    assert loader.train.total_batch_size == 8 and train.max_iter == 3000 and lr.scheduler.milestones == [2500]
    assert train.eval_period == 500 and optimizer.params.backbone_lr == 1e-4 and data.name == "synthetic_small"
    assert loader.test.mapper.augmentations[0].short_edge_length == 144
    with pytest.raises(ValueError, match="Mask R-CNN and Panoptic FPN"):
        recipe(REPO / "configs" / "detr_r18_synthetic.yaml")
    *_, lr, _, _ = recipe(REPO / "configs" / "mask_rcnn_r18_synthetic.yaml",
                          overrides=["train.lr_schedule=cosine", "train.min_lr_ratio=0.05"])
    assert (lr.scheduler.start_value, lr.scheduler.end_value) == (1.0, 0.05)
    with pytest.raises(ValueError, match="train.accumulate 2"):
        recipe(REPO / "configs" / "mask_rcnn_r18_synthetic.yaml", overrides=["train.accumulate=2"])
    with pytest.raises(ValueError, match="data.val_images: detectron2's datasets"):
        recipe(REPO / "configs" / "mask_rcnn_r18_synthetic.yaml", overrides=["data.val_images=x", "data.val_annotations=y"])
