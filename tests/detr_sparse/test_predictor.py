import json

import pytest
import torch
from PIL import Image

from datasets.coco import read_image
from detr_sparse import Predictor
from engine.checkpoint import save_checkpoint
from engine.config import ConfigError, load_config
from helpers import tiny_overrides
from official_reference import DETR_OPTS, ReferenceDETR

PANOPTIC_FPN = ["model.name=panoptic_fpn", "data.panoptic=true", "model.backbone.out_features=[res2,res3,res4,res5]",
                "model.rcnn.box_head_dim=64", "model.rcnn.mask_head_dim=16", "model.rcnn.fpn_channels=32",
                "model.rcnn.rpn_post_nms_top_n_test=50", "model.rcnn.stuff_area=16"]


def _val_images(custom_coco) -> tuple[list[str], dict]:
    """The val image paths in the dataset's order (image id) and the annotation file's content."""
    val_file = next(o for o in custom_coco if o.startswith("data.val_annotations=")).split("=", 1)[1]
    folder = next(o for o in custom_coco if o.startswith("data.val_images=")).split("=", 1)[1]
    truth = json.loads(open(val_file).read())
    images = sorted(truth["images"], key=lambda i: i["id"])
    return [f"{folder}/{i['file_name']}" for i in images], truth


def test_a_trained_checkpoint_gives_the_evaluators_boxes_in_original_pixels(tiny_run, custom_coco):
    paths, truth = _val_images(custom_coco)
    predictor = Predictor(tiny_run / "config.yaml", tiny_run / "checkpoint.pth", score_threshold=0.0)
    # the class names the training stored in the checkpoint: the split's annotation file's
    assert predictor.classes.names[0] == "shape circle" and predictor.classes.category_ids == list(range(1, 9))
    results = predictor(paths)  # batched as the evaluation was (eval.batch_size 2, same order)
    evaluated = json.loads((tiny_run / "eval_epoch1_bbox.json").read_text())
    for image, result in zip(sorted(truth["images"], key=lambda i: i["id"]), results):
        assert result["image_size"] == (image["height"], image["width"])
        mine = [r for r in evaluated if r["image_id"] == image["id"]]
        x1, y1, x2, y2 = result["boxes"].unbind(1)
        xywh = torch.stack([x1, y1, x2 - x1, y2 - y1], 1)
        assert torch.allclose(xywh, torch.tensor([r["bbox"] for r in mine]), atol=1e-3)
        assert result["scores"].tolist() == pytest.approx([r["score"] for r in mine], abs=1e-5)
        assert result["category_ids"] == [r["category_id"] for r in mine]
        assert result["class_names"] == [predictor.classes.names[i] for i in result["labels"].tolist()]


def test_boxes_follow_the_image_size_whatever_the_input_type(tiny_coco, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_coco, tmp_path))
    path = next((tiny_coco / "val2017").iterdir())
    small = read_image(str(path))
    h, w = small.shape[-2:]
    large = Image.open(path).convert("RGB").resize((2 * w, 2 * h), Image.BILINEAR)
    predictor = Predictor(cfg, score_threshold=0.0, batch_size=1)
    a, b, c = predictor([path, large, small.float() / 255])  # a path, a PIL image, a float tensor
    assert a["image_size"] == (h, w) and b["image_size"] == (2 * h, 2 * w)
    # both are resized to the same input; the boxes come back in each image's own pixels
    assert torch.allclose(b["boxes"], 2 * a["boxes"], atol=2.0)
    assert torch.allclose(c["boxes"], a["boxes"], atol=0.05)  # the uint8 resize rounds, the float one not
    assert len(predictor(torch.stack([small, small]))) == 2
    assert Predictor(cfg, score_threshold=1.1)(path)[0]["boxes"].shape == (0, 4)


def test_bf16_predicts_as_fp32_does_within_its_precision(tiny_coco, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_coco, tmp_path))
    path = next((tiny_coco / "val2017").iterdir())
    fp32 = Predictor(cfg, score_threshold=0.0)(path)[0]  # the same random weights: build_eval_model seeds them
    bf16 = Predictor(cfg, score_threshold=0.0, precision="bf16")(path)[0]
    assert bf16["boxes"].dtype == torch.float32 and torch.allclose(bf16["boxes"], fp32["boxes"], atol=2.0)
    assert torch.allclose(bf16["scores"], fp32["scores"], atol=0.05)
    assert not torch.equal(bf16["scores"], fp32["scores"])  # it did run in bf16


def test_masks_and_the_panoptic_map_come_at_the_original_size(tiny_coco, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_coco, tmp_path) + PANOPTIC_FPN)
    predictor = Predictor(cfg, score_threshold=0.0)  # random weights; classes from the config's val file
    assert predictor.classes.names[-1] == "wall" and predictor.classes.is_thing[-1] is False
    path = next((tiny_coco / "val2017").iterdir())
    result = predictor(path)[0]
    h, w = result["image_size"]
    assert result["masks"].dtype == torch.bool and result["masks"].shape == (len(result["labels"]), h, w)
    assert result["panoptic"].shape == (h, w)
    ids = set(result["panoptic"].unique().tolist()) - {0}
    assert ids == {s["id"] for s in result["segments"] if s["area"] > 0}
    for segment in result["segments"]:
        assert segment["class_name"] == predictor.classes.names[segment["label"]]
        assert segment["area"] == int((result["panoptic"] == segment["id"]).sum())


def test_classes_come_from_the_checkpoint_a_file_or_the_class_count(tiny_run, custom_coco, tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "no_coco", tmp_path))
    val_file = next(o for o in custom_coco if o.startswith("data.val_annotations=")).split("=", 1)[1]
    assert Predictor(cfg, annotations=val_file).classes.names[1] == "shape ellipse"
    counted = load_config(None, tiny_overrides(tmp_path / "no_coco", tmp_path, **{"model.num_classes": 3}))
    assert Predictor(counted).classes.names == ["class_0", "class_1", "class_2"]
    with pytest.raises(ConfigError, match="classes are unknown.*give an annotation file") as e:
        Predictor(cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="eval.precision: fp16 needs CUDA"):
        Predictor(cfg, annotations=val_file, precision="fp16")


def test_the_averaged_weights_of_an_ema_run_are_used(tiny_coco, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_coco, tmp_path))
    model = Predictor(cfg).model
    raw = model.state_dict()
    averaged = {f"module.{k}": v + 1 if v.is_floating_point() else v for k, v in raw.items()}
    save_checkpoint({"model": raw, "ema": {**averaged, "n_averaged": torch.tensor(3)}}, tmp_path / "ema.pth")
    loaded = Predictor(cfg, tmp_path / "ema.pth").model.state_dict()
    name = "class_embed.weight"
    assert torch.equal(loaded[name], raw[name] + 1)
    # the tools' models (benchmark, tradeoff, visualize_sparsity) read the same weights
    from engine.checkpoint import build_eval_model

    tool_model = build_eval_model(cfg.model, len(Predictor(cfg).classes.names), str(tmp_path / "ema.pth"), "cpu")
    assert torch.equal(tool_model.state_dict()[name], raw[name] + 1)


def test_an_authors_checkpoint_takes_the_rows_of_the_datasets_categories(tiny_coco, tmp_path):
    torch.manual_seed(0)
    reference = ReferenceDETR()
    torch.save({"model": reference.state_dict()}, tmp_path / "official.pth")
    opts = [o for o in tiny_overrides(tiny_coco, tmp_path) if not o.startswith("model.")] + DETR_OPTS
    predictor = Predictor(load_config(None, opts), tmp_path / "official.pth")
    # the config's val annotation file names the classes; its category ids pick the head's rows
    assert predictor.classes.names[0] == "circle" and predictor.classes.category_ids == list(range(1, 9))
    assert torch.equal(predictor.model.class_embed.bias, reference.class_embed.bias[list(range(1, 9)) + [91]])
    # no dataset here: COCO's 80 category ids, unnamed
    elsewhere = Predictor(load_config(None, opts + [f"data.root={tmp_path / 'no_coco'}"]), tmp_path / "official.pth")
    assert len(elsewhere.classes.names) == 80 and elsewhere.classes.names[0] == "class_0"
    assert elsewhere.classes.category_ids[-1] == 90
