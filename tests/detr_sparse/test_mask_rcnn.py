import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from datasets import CocoDetection, CocoEvaluator, PanopticEvaluator, build_dataset, collate_fn
from detr_sparse import build_model
from detr_sparse.backbones.resnet import ResNetBackbone
from detr_sparse.heads.panoptic_fpn import IGNORE, combine_semantic_and_instance_outputs, semantic_targets
from detr_sparse.image_batch import ImageBatch
from detr_sparse.mask_rcnn import LevelAnchorGenerator
from engine.config import load_config
from helpers import tiny_overrides

SEED = 0
TINY_RCNN = ["model.name=mask_rcnn", "model.backbone.name=resnet18", "model.backbone.norm=gn",
             "model.backbone.out_features=[res2,res3,res4,res5]", "model.rcnn.fpn_channels=32",
             "model.rcnn.box_head_dim=64", "model.rcnn.mask_head_dim=16", "model.rcnn.semantic_channels=32",
             "model.rcnn.rpn_pre_nms_top_n_train=200", "model.rcnn.rpn_post_nms_top_n_train=100",
             "model.rcnn.rpn_pre_nms_top_n_test=100", "model.rcnn.rpn_post_nms_top_n_test=50",
             "model.rcnn.box_batch_size_per_image=64", "model.rcnn.detections_per_img=20",
             # an untrained model's scores are ~1 / (K + 1): keep them, to have detections to check
             "model.rcnn.box_score_thresh=0.0"]


def _model(*extra, num_classes=3, is_thing=None):
    torch.manual_seed(SEED)
    return build_model(load_config(None, TINY_RCNN + list(extra)).model, num_classes, is_thing)


def _padded_batch():
    """Two images of different sizes (one padded; 90 is no multiple of any stride), with 1
    object (label 1) and 2 objects (labels 0, 2); boxes absolute xyxy, masks inside them."""
    torch.manual_seed(1)
    images = ImageBatch.from_images([torch.randn(3, 64, 96), torch.randn(3, 90, 70)])
    boxes = [torch.tensor([[10.0, 20.0, 60.0, 50.0]]), torch.tensor([[5.0, 5.0, 40.0, 30.0], [20.0, 60.0, 50.0, 90.0]])]
    targets = []
    for b, (h, w), labels in zip(boxes, images.sizes.tolist(), ([1], [0, 2])):
        masks = torch.zeros(len(b), h, w, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, b.int().tolist()):
            m[y0:y1, x0:x1] = True
        targets.append({"boxes": b, "labels": torch.tensor(labels), "masks": masks})
    return images, targets


@pytest.mark.parametrize("backbone", ["resnet18", "deit_t"])
def test_trains_and_predicts_masks_at_each_image_size(backbone):
    model = _model(f"model.backbone.name={backbone}").train()
    assert model.eval_types == ("bbox", "segm")
    for prefix in model.parts.values():
        model.get_submodule(prefix)
    # ViTDet: the ViT's maps are the pyramid, no FPN on top (a parameter-free max-pool level only)
    assert (model.neck.fpn is None) == (backbone == "deit_t")
    assert model.neck.strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "pool": 64}
    images, targets = _padded_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    first = model.backbone.stem[0] if backbone == "resnet18" else model.backbone.conv_proj
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0

    with torch.no_grad():
        preds = model.eval()(images)
    for p, (h, w) in zip(preds, images.sizes.tolist()):
        n = len(p["scores"])
        assert n > 0 and p["boxes"].shape == (n, 4) and p["masks"].shape == (n, 1, h, w)
        assert p["masks"].min() >= 0 and p["masks"].max() <= 1
        assert p["boxes"][:, 0::2].max() <= w and p["boxes"][:, 1::2].max() <= h
        assert p["labels"].min() >= 0 and p["labels"].max() <= 2


def test_levels_anchors_and_roi_pools_follow_the_backbone_out_features():
    model = _model("model.backbone.out_features=[res3,res4,res5]").eval()
    assert model.neck.strides == {"p3": 8, "p4": 16, "p5": 32, "pool": 64}
    assert model.rpn.anchor_generator.sizes == ((64.0,), (128.0,), (256.0,), (512.0,))
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        assert pool.featmap_names == ["p3", "p4", "p5"] and pool.scales == [1 / 8, 1 / 16, 1 / 32]
    images, _ = _padded_batch()
    with torch.no_grad():
        assert [p["masks"].shape[-2:] for p in model(images)] == [(64, 96), (90, 70)]


def test_backbone_losses_and_statistics_join_the_outputs_in_training_only():
    class GatedResNet(ResNetBackbone):
        def forward_with_losses(self, x, targets):
            self.seen = targets
            maps = self(x)
            return maps, {"loss_budget": maps["res5"].mean() ** 2, "keep_ratio": torch.tensor(0.5)}

    model = _model()
    model.backbone.__class__ = GatedResNet
    images, targets = _padded_batch()
    out = model.train()(images, targets)
    # the instances the heads train on, with our labels (not torchvision's 1..K)
    assert [t["labels"].tolist() for t in model.backbone.seen] == [t["labels"].tolist() for t in targets]
    assert torch.equal(model.backbone.seen[0]["boxes"], targets[0]["boxes"])
    assert {"loss_budget", "keep_ratio", "loss_mask"} <= set(out)
    model.backbone.seen = None
    with torch.no_grad():
        model.eval()(images)
    assert model.backbone.seen is None


def test_anchors_sit_at_the_level_strides():
    sizes, ratios = ((32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 3
    ours = LevelAnchorGenerator(sizes, ratios, [8, 16, 32])
    theirs = AnchorGenerator(sizes, ratios)
    maps = [torch.zeros(1, 1, 128 // s, 128 // s) for s in (8, 16, 32)]
    images = ImageList(torch.zeros(1, 3, 128, 128), [(128, 128)])
    torch.testing.assert_close(ours(images, maps)[0], theirs(images, maps)[0])
    # a max-pool level of stride 64 on 96 px is ceil(96 / 64) = 2 wide: torchvision would
    # infer stride 96 // 2 = 48 and put the second anchor column at 48
    maps = [torch.zeros(1, 1, 12, 12), torch.zeros(1, 1, 6, 6), torch.zeros(1, 1, 2, 2)]
    ours = LevelAnchorGenerator(sizes, ratios, [8, 16, 64])
    centres = ours(ImageList(torch.zeros(1, 3, 96, 96), [(96, 96)]), maps)[0][-4 * 3:]
    assert sorted({float(c) for c in (centres[:, 0] + centres[:, 2]) / 2}) == [0.0, 64.0]


def test_panoptic_merge_drops_overlapping_instances_and_small_stuff():
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[0, 0:4, 0:4] = True  # A: 16 px
    masks[1, 2:6, 2:6] = True  # B: 4 of its 16 px on A (25%): takes the other 12
    masks[2, 0:4, 1:5] = True  # C: 14 of 16 px on A and B (> 50%): dropped
    masks[3, 6:8, 4:6] = True  # D: free, but its score is below the threshold
    scores, labels = torch.tensor([0.9, 0.8, 0.7, 0.3]), torch.tensor([0, 1, 0, 1])
    semantic = torch.zeros(8, 8, dtype=torch.int64)
    semantic[:, 4:] = 1  # stuff class 1: 32 px, 8 under B -> 24 free
    semantic[6:, :4] = 2  # stuff class 2: 8 px < stuff_area, dropped
    id_map, segments = combine_semantic_and_instance_outputs(masks, scores, labels, semantic, stuff_labels=[5, 7],
                                                             stuff_area=10)
    assert segments == [{"id": 1, "label": 0, "isthing": True, "area": 16},
                        {"id": 2, "label": 1, "isthing": True, "area": 12},
                        {"id": 3, "label": 5, "isthing": False, "area": 24}]
    assert (id_map[0:4, 0:4] == 1).all() and (id_map[4:6, 2:6] == 2).all() and (id_map[2:4, 4:6] == 2).all()
    assert (id_map[:, 6:] == 3).all() and (id_map[6:, :4] == 0).all()
    assert [(id_map == s["id"]).sum() for s in segments] == [s["area"] for s in segments]


def test_semantic_targets_mark_things_zero_and_ignore_void_and_padding():
    semantic_class = torch.tensor([0, 0, 1, 2])  # labels 0, 1 things; 2, 3 stuff
    masks = torch.zeros(3, 4, 5, dtype=torch.bool)
    masks[0, :2, :2] = True  # thing
    masks[1, 2:, :] = True  # stuff label 3
    masks[2, :2, 3:] = True  # stuff label 2; column 2 of rows 0-1 stays VOID
    target = semantic_targets([{"masks": masks, "labels": torch.tensor([1, 3, 2])}], semantic_class, (6, 6))
    expected = torch.full((6, 6), IGNORE)
    expected[:2, :2], expected[2:4, :5], expected[:2, 3:5] = 0, 2, 1
    assert torch.equal(target[0], expected)


def test_ground_truth_in_the_output_format_gives_mask_ap_one(tiny_coco):
    """Perfect predictions, (a) in the eval output format (masks (N, 1, h, w) at the input
    size, contiguous labels) and (b) as the RoI heads would give them (torchvision labels
    1..K, 28 x 28 mask targets in the boxes) through the model's postprocess. Images at
    their original size: the evaluator's resizing of masks back to it costs IoU on small
    objects, which is not what is tested here."""
    val = CocoDetection(tiny_coco / "val2017", tiny_coco / "annotations" / "instances_val2017.json",
                        return_masks=True)
    model = _model(num_classes=val.num_classes)
    direct, through_model = (CocoEvaluator(val.coco, val.label_to_cat_id, iou_types=("bbox", "segm"))
                             for _ in range(2))
    for i in range(0, len(val), 2):
        images, targets = collate_fn([val[i], val[i + 1]])
        direct.update([{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"],
                        "masks": t["masks"].float()[:, None]} for t in targets], targets)
        detections = [{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"] + 1,
                       "masks": project_masks_on_boxes(t["masks"], t["boxes"], torch.arange(len(t["boxes"])), 28)}
                      for t in targets]
        detections = [{**d, "masks": d["masks"][:, None]} for d in detections]  # (N, 1, 28, 28)
        predictions = model.postprocess(detections, [tuple(s) for s in images.sizes.tolist()])
        for p, t in zip(predictions, targets):
            assert torch.equal(p["labels"], t["labels"]) and p["masks"].shape[-2:] == t["masks"].shape[-2:]
        through_model.update(predictions, targets)
    stats = direct.summarize()
    assert stats["bbox"]["AP"] == 1.0 and stats["segm"]["AP"] == 1.0, stats
    # torchvision's mask encoding (roi_align without half-pixel alignment for the targets,
    # paste_masks_in_image one pixel wider than the box) loses some IoU on 8-40 px objects
    stats = through_model.summarize()
    assert stats["bbox"]["AP"] == 1.0 and stats["segm"]["AP50"] == 1.0, stats


def test_panoptic_fpn_trains_and_its_predictions_are_evaluated(tiny_coco, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_coco, tmp_path, **{"data.panoptic": "true"}) + TINY_RCNN
                      + ["model.name=panoptic_fpn", "model.rcnn.stuff_area=16", "model.rcnn.detections_per_img=3",
                         "model.rcnn.instance_score_thresh=0.0"])  # untrained: let a few instances in
    val = build_dataset(cfg.data, "val")
    torch.manual_seed(SEED)
    model = build_model(cfg.model, val.num_classes, val.is_thing).train()
    assert model.eval_types == ("bbox", "segm", "panoptic") and model.stuff_labels == [8, 9, 10, 11]
    images, targets = collate_fn([val[0], val[1]])
    losses = model(images, targets)
    assert {"loss_sem_seg", "loss_mask", "loss_classifier"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.semantic_head.predictor.weight.grad.abs().sum() > 0

    evaluator = PanopticEvaluator(val.categories, val.label_to_cat_id)
    with torch.no_grad():
        preds = model.eval()(images)
    for p, (h, w) in zip(preds, images.sizes.tolist()):
        assert p["panoptic"].shape == (h, w) and p["masks"].shape[-2:] == (h, w)
        assert all(val.is_thing[s["label"]] == s["isthing"] for s in p["segments_info"])
        assert any(s["isthing"] for s in p["segments_info"]) and any(not s["isthing"] for s in p["segments_info"])
        assert all(val.is_thing[label] for label in p["labels"].tolist())
    evaluator.update(preds, targets)
    assert 0.0 <= evaluator.summarize()["panoptic"]["PQ"] <= 1.0


def test_a_dge_backbone_trains_with_its_budget_loss_and_predicts_each_image_at_its_size():
    model = _model("model.backbone.name=pvt_t_dge").train()
    images, targets = _padded_batch()
    outputs = model(images, targets)
    assert {"loss_budget", "dge_beta", "dge_beta_layers", "dge_grain1", "dge_grain2", "dge_grain4"} <= set(outputs)
    assert outputs["dge_beta"] > 0.8  # routers start at the finest granularity
    sum(v for k, v in outputs.items() if k.startswith("loss")).backward()
    assert model.backbone.stages[0].blocks[0].router.gate.weight.grad is not None
    model.eval()
    with torch.no_grad():
        predictions = model(images)
    for p, (h, w) in zip(predictions, images.sizes.tolist()):
        assert p["masks"].shape[-2:] == (h, w)
    # each image's regions only: the second image (90 x 70) is padded to 96 x 96 in the batch
    label, choice, px = model.backbone.granularity_maps()[0]
    assert (choice[1] >= 0).sum() == -(-90 // px) * -(-70 // px)


@pytest.mark.parametrize("name", ["mask_rcnn", "panoptic_fpn"])
def test_an_svit_adapter_backbone_trains_with_its_ratio_loss_and_predicts_each_image_at_its_size(name):
    model = _model("model.backbone.name=deit_mini_adapter_svit", f"model.name={name}",
                   is_thing=[True, True, False] if name == "panoptic_fpn" else None).train()
    assert not model.backbone.is_pyramid and model.neck.fpn is not None  # the adapter's maps get an FPN
    images, targets = _padded_batch()  # with panoptic_fpn, label 2 is a stuff region
    outputs = model(images, targets)
    assert {"loss_keep_ratio", "svit_keep", "svit_keep1", "svit_keep2", "svit_keep3"} <= set(outputs)
    sum(v for k, v in outputs.items() if k.startswith("loss")).backward()
    assert model.backbone.layers[1].gate.net[1].weight.grad is not None
    model.eval()
    with torch.no_grad():
        predictions = model(images)
    for p, (h, w) in zip(predictions, images.sizes.tolist()):
        assert p["masks"].shape[-2:] == (h, w)
    usage = model.backbone.token_usage()
    assert usage.shape[0] == 2 and (usage[1] == -1).any()  # the second image is padded in the batch


@pytest.mark.parametrize("backbone", ["pvt_t_dge", "deit_t_dge", "deit_mini_adapter_svit", "deit_t_svit", "spt_mini"])
def test_a_bf16_training_step_on_each_sparse_backbone_is_finite(backbone):
    from engine.train import autocast

    model = _model(f"model.backbone.name={backbone}", "model.backbone.drop_path_rate=0.1").train()
    images, targets = _padded_batch()
    with autocast(torch.device("cpu"), "bf16"):
        losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_under_bf16_autocast_anchors_and_box_decoding_stay_fp32():
    from engine.train import autocast

    model = _model().eval()
    images, _ = _padded_batch()
    seen = {}
    model.rpn.register_forward_pre_hook(lambda m, a: seen.__setitem__(
        "anchors", m.anchor_generator(a[0], list(a[1].values()))[0].dtype))
    model.rpn.head.register_forward_hook(lambda m, i, o: seen.__setitem__("objectness", o[0][0].dtype))
    model.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: seen.__setitem__("deltas", o[1].dtype))
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
        detections = model(images)
    assert seen == {"anchors": torch.float32, "objectness": torch.float32, "deltas": torch.float32}
    assert all(d["boxes"].dtype == torch.float32 for d in detections)
