"""The project's backbones inside detectron2's Mask R-CNN and Panoptic FPN (run where
detectron2 is installed: DETECTRON2=1 bash launch.sh --setup)."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (DETECTRON2=1 bash launch.sh --setup)")

from detectron2 import model_zoo  # noqa: E402
from detectron2.config import CfgNode, get_cfg, instantiate  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from PIL import Image  # noqa: E402

from datasets.coco_panoptic import rgb_to_id  # noqa: E402
from detr_sparse.integrations.detectron2 import (PanopticQuality, ProjectBackbone, PyramidLevels,  # noqa: E402
                                                 add_project_config, register_coco_folder, with_pyramid)
from detr_sparse.integrations.detectron2_recipe import recipe  # noqa: E402
from helpers import REPO  # noqa: E402

# every kind of backbone, at its smallest: its own loss (or none) and the statistic it logs
BACKBONES = {"resnet18": (None, None), "swin_mini": (None, None), "pvt_t": (None, None),
             "deit_mini": (None, None), "deit_mini_adapter": (None, None),
             "pvt_t_dge": ("loss_budget", "dge_beta"), "deit_mini_dge": ("loss_budget", "dge_beta"),
             "deit_mini_svit": ("loss_keep_ratio", "svit_keep"),
             "deit_mini_adapter_svit": ("loss_keep_ratio", "svit_keep"),
             "spt_mini": ("loss_select", "spt_select_res4")}


def model_of(backbone: str, panoptic: bool = False, **rcnn):
    yaml = "panoptic_fpn_r18_synthetic.yaml" if panoptic else "mask_rcnn_r18_synthetic.yaml"
    opts = [f"model.backbone.name={backbone}", "model.backbone.pretrained=''", "model.backbone.drop_path_rate=0.0"]
    opts += [f"model.rcnn.{k}={v}" for k, v in rcnn.items()]
    model = instantiate(recipe(REPO / "configs" / yaml, overrides=opts)[0])
    return model


def batch(panoptic: bool = False) -> list[dict]:
    """Two images of different sizes, with two / one instances (boxes, classes, masks)."""
    torch.manual_seed(0)
    out = []
    for (h, w), boxes, classes in (((96, 128), [[10, 20, 60, 70], [70, 10, 120, 50]], [1, 3]),
                                   ((128, 96), [[20, 30, 80, 100]], [5])):
        inst = Instances((h, w), gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                         gt_classes=torch.tensor(classes))
        masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, boxes):
            m[y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
        item = {"image": torch.rand(3, h, w) * 255, "instances": inst, "height": h, "width": w, "image_id": len(out)}
        if panoptic:
            item["sem_seg"] = torch.where(masks.any(0), 0, 1 + (torch.arange(w) * 4 // w)).long()
        out.append(item)
    return out


def loss_of(model, inputs) -> tuple[torch.Tensor, dict]:
    with EventStorage() as storage:
        losses = model(inputs)
    return sum(losses.values()), {**losses, **{k: v.latest() for k, v in storage.histories().items()}}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_each_backbone_trains_and_predicts_inside_detectrons_mask_rcnn_and_panoptic_fpn(name):
    loss_key, stat_key = BACKBONES[name]
    for panoptic in (False, True):
        model = model_of(name, panoptic)
        assert isinstance(getattr(model.backbone, "bottom_up", None), ProjectBackbone)
        total, logged = loss_of(model.train(), batch(panoptic))
        assert torch.isfinite(total)
        total.backward()
        if loss_key:  # the backbone's own loss is in the loss dict, its statistic in the storage
            assert torch.isfinite(logged[loss_key]) and stat_key in logged
        with torch.no_grad():
            out = model.eval()(batch(panoptic))
        assert isinstance(out[0]["instances"], Instances) and out[1]["instances"].image_size == (128, 96)
        if panoptic:
            seg, segments = out[0]["panoptic_seg"]
            assert seg.shape == (96, 128) and all({"id", "isthing", "category_id"} <= set(s) for s in segments)


def test_a_training_step_lowers_the_loss_of_the_dge_model_and_reaches_towards_its_budget():
    torch.manual_seed(0)
    model = model_of("pvt_t_dge").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, budgets = [], []
    for _ in range(6):  # the hard gates' first choices flip after a few steps
        total, logged = loss_of(model, batch())
        opt.zero_grad()
        total.backward()
        routers = [p.grad for n, p in model.named_parameters() if ".router." in n]
        assert routers and all(g is not None and g.abs().sum() > 0 for g in routers)  # the gates learn
        opt.step()
        losses.append(total.item())
        budgets.append(logged["loss_budget"].item())
    assert losses[-1] < losses[0] and budgets[-1] < budgets[0]


def test_the_spt_backbone_gets_the_batchs_instances_as_its_selection_labels():
    model = model_of("spt_mini").train()
    _, logged = loss_of(model, batch())
    assert 0 < logged["spt_object_selected"] <= 1  # computed from the instances' boxes
    net = model.backbone.bottom_up
    assert net.targets is None and net.sizes is None and net.extras == {}  # nothing kept after the pass


def test_the_vits_simple_pyramid_is_named_as_detectrons_levels_with_the_pooled_one():
    bottom_up = ProjectBackbone("deit_mini", ["res2", "res3", "res4"], pretrained="")
    pyramid = with_pyramid(bottom_up)
    assert isinstance(pyramid, PyramidLevels)
    maps = pyramid(torch.randn(1, 3, 64, 96))
    assert list(maps) == ["p2", "p3", "p4", "p5"]
    assert {n: tuple(m.shape[-2:]) for n, m in maps.items()} == {"p2": (16, 24), "p3": (8, 12), "p4": (4, 6),
                                                                 "p5": (2, 3)}
    assert {s.stride for s in pyramid.output_shape().values()} == {4, 8, 16, 32}
    fpn = with_pyramid(ProjectBackbone("resnet18", ["res2", "res3", "res4"], pretrained=""), 32)
    assert list(fpn.output_shape()) == ["p2", "p3", "p4", "p5"] and fpn.size_divisibility == 16


def test_a_bad_backbone_option_names_the_key():
    with pytest.raises(ValueError, match="dge.budgett"):
        ProjectBackbone("pvt_t_dge", dge={"budgett": 0.3})


def test_the_registries_build_the_backbone_and_meta_architecture_from_a_yacs_config():
    cfg = add_project_config(get_cfg())
    cfg.merge_from_file(model_zoo.get_config_file("Base-RCNN-FPN.yaml"))  # the FPN levels and heads
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PROJECT_BACKBONE.NAME = "pvt_t_dge"
    cfg.MODEL.PROJECT_BACKBONE.OPTIONS.dge = CfgNode({"budget": 0.3})
    cfg.MODEL.BACKBONE.NAME = "build_project_fpn_backbone"
    cfg.MODEL.META_ARCHITECTURE = "SparseRCNN"
    cfg.MODEL.MASK_ON = True
    backbone = build_backbone(cfg)
    assert backbone.bottom_up.net.budget == 0.3 and list(backbone.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]
    model = build_model(cfg).train()
    total, logged = loss_of(model, batch())
    assert "loss_budget" in logged and torch.isfinite(total)


def test_a_synthetic_folder_registers_its_instances_and_separated_panoptic_splits(tiny_coco):
    names = register_coco_folder(tiny_coco, prefix="tiny_reg")
    assert names == ["tiny_reg_train2017", "tiny_reg_train2017_panoptic_separated", "tiny_reg_val2017",
                     "tiny_reg_val2017_panoptic_separated"]
    assert len(DatasetCatalog.get("tiny_reg_val2017")) == 4
    meta = MetadataCatalog.get("tiny_reg_val2017_panoptic_separated")
    assert meta.stuff_classes == ["things", "sky", "grass", "water", "wall"]
    record = DatasetCatalog.get("tiny_reg_val2017_panoptic_separated")[0]
    semantic = np.asarray(Image.open(record["sem_seg_file_name"]))
    panoptic = json.loads((tiny_coco / "annotations" / "panoptic_val2017.json").read_text())["annotations"][0]
    ids = rgb_to_id(np.asarray(Image.open(tiny_coco / "annotations" / "panoptic_val2017" / panoptic["file_name"])))
    for seg in panoptic["segments_info"]:  # things 0, stuff 1..4 (category ids 9..12)
        expected = 0 if seg["category_id"] <= 8 else seg["category_id"] - 8
        assert (semantic[ids == seg["id"]] == expected).all()


def test_panoptic_quality_of_the_ground_truth_itself_is_100(tiny_coco):
    register_coco_folder(tiny_coco, prefix="tiny_pq")
    name = "tiny_pq_val2017_panoptic_separated"
    meta = MetadataCatalog.get(name)
    evaluator = PanopticQuality(name)
    evaluator.reset()
    things = meta.thing_dataset_id_to_contiguous_id
    stuff = meta.stuff_dataset_id_to_contiguous_id
    for ann in json.loads((tiny_coco / "annotations" / "panoptic_val2017.json").read_text())["annotations"]:
        ids = rgb_to_id(np.asarray(Image.open(tiny_coco / "annotations" / "panoptic_val2017" / ann["file_name"])))
        segments = [{"id": s["id"], "isthing": s["category_id"] in things,
                     "category_id": things.get(s["category_id"], stuff.get(s["category_id"]))}
                    for s in ann["segments_info"]]
        evaluator.process([{"image_id": ann["image_id"]}], [{"panoptic_seg": (torch.from_numpy(ids), segments)}])
    result = evaluator.evaluate()["panoptic_seg"]
    assert result["PQ"] == pytest.approx(100) and result["PQ_st"] == pytest.approx(100)
