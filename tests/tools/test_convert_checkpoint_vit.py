"""The ViT formats of detr_sparse.official: StevenGrove/vtpack's DGE DeiT classification weights (a
backbone) and uzh-rpg/svit's mmdet ViT-Adapter / SViT-Adapter Mask R-CNN. Their key -> shape
layouts (tests/official_reference_vit.py) convert completely into the configs' models; the class,
box, mask and anchor rows land where they should; converted parts compute what the authors'
compute (their DGE blocks and routers, ViT blocks, SViT gates, FPN, RPN, box and mask heads);
the errors; the tool and the direct loading paths."""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from functools import lru_cache

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from detr_sparse import build_model
from detr_sparse.backbones import DGEViTBackbone
from detr_sparse.official import ConversionError, convert_state_dict, detect_layout, is_official
from engine.checkpoint import load_checkpoint, load_model_weights
from engine.config import load_config
from helpers import REPO, one_line_error
from official_reference_vit import (ReferenceDGEDeiT, delta2bbox, encoder_layer_block, mmdet_adapter_shapes,
                                    mmdet_anchors, mmdet_bbox_head, mmdet_fpn, mmdet_mask_head, mmdet_rpn,
                                    numbered_state, random_state, selective_module, timm_block, vtpack_shapes)

TOL = 1e-4
# the smallest Mask R-CNN the adapter configs allow: DeiT-T's width, 4 blocks, narrow FPN and heads
SMALL = ["model.rcnn.fpn_channels=32", "model.rcnn.box_head_dim=64", "model.rcnn.mask_head_dim=32"]
SMALL_SHAPES = {"depth": 4, "fpn": 32, "fc": 64, "mask": 32}
VARIANTS = {  # the authors' model -> (its key -> shape, the config of the same network)
    "vtpack deit_dge_s124_tiny": (lambda: vtpack_shapes(192), "mask_rcnn_deit_t_dge.yaml"),
    "vtpack deit_dge_s124_small": (lambda: vtpack_shapes(384), "mask_rcnn_deit_s_dge.yaml"),
    "svit vit-adapter-t-3x": (lambda: mmdet_adapter_shapes(192), "mask_rcnn_deit_t_adapter.yaml"),
    "svit vit-adapter-s-3x": (lambda: mmdet_adapter_shapes(384), "mask_rcnn_deit_s_adapter.yaml"),
    "svit svit-adapter-t-0.5x-ftune": (lambda: mmdet_adapter_shapes(192, gates=True),
                                       "mask_rcnn_deit_t_adapter_svit.yaml"),
    "svit svit-adapter-s-0.33x-ftune": (lambda: mmdet_adapter_shapes(384, gates=True),
                                        "mask_rcnn_deit_s_adapter_svit.yaml"),
}


# our modules whose rows the conversion moves, and the position embedding
REORDERED = {"roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
             "roi_heads.mask_predictor.mask_fcn_logits", "rpn.head.cls_logits", "rpn.head.bbox_pred"}


@contextmanager
def no_init():
    """Models built without initialising their weights, which the tests load (or whose shapes
    alone they read): the full-size models build ten times faster."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                     "xavier_normal_", "constant_", "zeros_", "ones_"):
            patch.setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield


@lru_cache(maxsize=None)
def coco_model(config: str, *overrides: str, classes: int = 80):
    """The config's model for `classes` classes, its weights uninitialised (no_init)."""
    with no_init():
        return build_model(load_config(REPO / "configs" / config, list(overrides)).model, classes)


def small_svit(*extra: str, gates: bool = True):
    """The small (S)ViT-Adapter Mask R-CNN in eval mode holding a converted random state dict of
    the authors' names, and that state dict."""
    name = "deit_mini_adapter_svit" if gates else "deit_mini_adapter"
    model = coco_model("mask_rcnn_deit_t_adapter_svit.yaml", *SMALL, f"model.backbone.name={name}", *extra)
    official = random_state(mmdet_adapter_shapes(192, gates=gates, **SMALL_SHAPES), seed=1)
    model.load_state_dict(convert_state_dict(official, model, source="small").state_dict)
    return model.eval(), official


def consumed(result) -> set[str]:
    """The official keys a conversion took a value from (a concatenation's several)."""
    return {part for source in result.sources.values() if source for part in source.split("+")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_vit_layout_converts_completely(variant):
    shapes, config = VARIANTS[variant]
    official = numbered_state(shapes())
    model = coco_model(config)
    layout = detect_layout(official)
    assert layout.format == ("vtpack" if variant.startswith("vtpack") else "svit_mmdet")
    assert layout.config() == config and is_official(official)
    result = convert_state_dict(official, model, strict=not layout.backbone_only, source=variant)
    ours = model.state_dict()
    wanted = set(ours)
    if layout.backbone_only:  # the DeiT and its routers: all of the backbone but the detection pyramid
        wanted = {k for k in ours if k.startswith("backbone.") and not k.startswith(("backbone.rescale.",
                                                                                      "backbone.project."))}
    assert set(result.state_dict) == wanted
    assert all(result.state_dict[k].shape == ours[k].shape for k in wanted)
    dropped = {k for k in official if layout.unused(k)}
    assert consumed(result) | dropped == set(official) and not consumed(result) & dropped
    if layout.backbone_only:
        assert dropped == {"cls_token", "norm.weight", "norm.bias", "head.weight", "head.bias"} | {
            f"blocks.{i}.dge.splits" for i in range(12)}
    else:
        assert not dropped
    # values: the official tensors as they are, or fused (q + kv); the rows of the heads and of the
    # position embedding are other tests'
    rows = {k for k in wanted if k == "backbone.pos_embedding" or k.rsplit(".", 1)[0] in REORDERED}
    assert len(rows) == (1 if layout.backbone_only else 11)
    for key in wanted - rows:
        parts = [official[part] for part in result.sources[key].split("+")]
        value = torch.cat(parts) if len(parts) > 1 else parts[0]
        assert result.state_dict[key] is value or torch.equal(result.state_dict[key], value), key


def test_vtpack_fuses_q_and_kv_and_keeps_the_routers():
    official = random_state(vtpack_shapes(192))
    result = convert_state_dict(official, coco_model("mask_rcnn_deit_t_dge.yaml"), strict=False)
    fused = result.state_dict["backbone.layers.encoder_layer_5.self_attention.in_proj_weight"]
    assert torch.equal(fused, torch.cat([official["blocks.5.attn.q.weight"], official["blocks.5.attn.kv.weight"]]))
    assert result.sources["backbone.layers.encoder_layer_5.self_attention.in_proj_bias"] == \
        "blocks.5.attn.q.bias+blocks.5.attn.kv.bias"
    assert torch.equal(result.state_dict["backbone.layers.encoder_layer_11.router.gate.bias"],
                       official["blocks.11.dge.router.gate.bias"])
    # the class token's row goes; the 16 x 16 grid (256 px) becomes the backbone's 14 x 14
    positions = result.state_dict["backbone.pos_embedding"]
    grid = official["pos_embed"][0, 1:].T.reshape(1, 192, 16, 16)
    expected = torch.nn.functional.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False)
    assert torch.allclose(positions, expected.flatten(2).transpose(1, 2), atol=1e-6)


def test_mmdet_heads_become_background_first_rows():
    # row r of each hand-made head holds r: their background row 80 comes first in ours, class rows
    # follow in our label order (here three of COCO's ids), box rows 4 a class with 4 zero rows first
    official = random_state(mmdet_adapter_shapes(192, gates=True, **SMALL_SHAPES))
    official["roi_head.bbox_head.fc_cls.bias"] = torch.arange(81.0)
    official["roi_head.bbox_head.fc_reg.bias"] = torch.arange(320.0)
    official["roi_head.mask_head.conv_logits.bias"] = torch.arange(80.0)
    official["roi_head.mask_head.conv_logits.weight"] = torch.arange(80.0).view(80, 1, 1, 1).repeat(1, 32, 1, 1)
    model = coco_model("mask_rcnn_deit_t_adapter_svit.yaml", *SMALL, "model.backbone.name=deit_mini_adapter_svit",
                       classes=3)
    ids = [1, 3, 90]  # COCO's first, third and last class: mmdet labels 0, 2, 79
    result = convert_state_dict(official, model, categories=ids).state_dict
    assert result["roi_heads.box_predictor.cls_score.bias"].tolist() == [80, 0, 2, 79]
    assert result["roi_heads.box_predictor.bbox_pred.bias"].tolist() == [0] * 4 + [0, 1, 2, 3] + [8, 9, 10, 11] + [
        316, 317, 318, 319]
    assert result["roi_heads.mask_predictor.mask_fcn_logits.bias"].tolist() == [0, 0, 2, 79]
    assert result["roi_heads.mask_predictor.mask_fcn_logits.weight"][:, 5, 0, 0].tolist() == [0, 0, 2, 79]
    # the gates: selective module k before block k + depth / 4
    assert torch.equal(result["backbone.layers.encoder_layer_1.gate.net.3.weight"],
                       official["backbone.selective_modules.0.mlp.fc2.weight"])
    with pytest.raises(ConversionError, match=r"ids \[12, 200\] are not among them"):
        convert_state_dict(official, model, categories=[1, 12, 200])


def test_rpn_rows_follow_the_configs_anchor_order():
    # mmdet's anchors at a location: ratios 0.5, 1, 2; a config listing them as 2, 0.5, 1 takes rows 2, 0, 1
    model, official = small_svit("model.rcnn.anchor_ratios=[2.0,0.5,1.0]")
    cls = official["rpn_head.rpn_cls.bias"]
    assert torch.equal(model.rpn.head.cls_logits.bias, cls[[2, 0, 1]])
    deltas = official["rpn_head.rpn_reg.weight"].view(3, 4, 32, 1, 1)
    assert torch.equal(model.rpn.head.bbox_pred.weight, deltas[[2, 0, 1]].flatten(0, 1))
    # and anchor a of ours has the shape of the mmdet anchor whose row it took, at every location
    # (torchvision rounds the anchors' corners to whole pixels, mmdet does not: 0.5 px at most)
    strides = [4, 8, 16, 32, 64]
    maps = [torch.zeros(1, 32, 64 // s, 96 // s) for s in strides]
    ours = model.rpn.anchor_generator(ImageList(torch.zeros(1, 3, 64, 96), [(64, 96)]), maps)[0]
    theirs = torch.cat([mmdet_anchors(s, m.shape[-2:]).view(-1, 3, 4)[:, [2, 0, 1]].reshape(-1, 4)
                        for s, m in zip(strides, maps)])
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= 0.5


@torch.no_grad()
def test_converted_fpn_rpn_box_and_mask_heads_compute_the_authors():
    model, sd = small_svit()
    g = torch.Generator().manual_seed(2)
    maps = {f"res{i + 2}": torch.randn(2, 192, 32 // 2 ** i, 48 // 2 ** i, generator=g) for i in range(4)}
    ours = list(model.neck(maps).values())
    theirs = mmdet_fpn(sd, list(maps.values()))
    assert all(torch.allclose(a, b, atol=TOL) for a, b in zip(ours, theirs))
    for level in ours:  # the RPN: one objectness logit and 4 deltas per anchor, same anchor order
        (logits,), (deltas,) = model.rpn.head([level])
        their_logits, their_deltas = mmdet_rpn(sd, level)
        assert torch.allclose(logits, their_logits, atol=TOL) and torch.allclose(deltas, their_deltas, atol=TOL)
    rois = torch.tensor([[4.0, 6.0, 60.0, 40.0], [10.0, 2.0, 30.0, 90.0], [0.0, 0.0, 16.0, 16.0]])
    feats = torch.randn(3, 32, 7, 7, generator=g)
    logits, deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(feats))
    their_logits, their_deltas = mmdet_bbox_head(sd, feats)
    rows = [80] + list(range(80))  # COCO: our class c + 1 is their label c, the background first
    assert torch.allclose(logits.softmax(-1), their_logits.softmax(-1)[:, rows], atol=TOL)
    boxes = model.roi_heads.box_coder.decode(deltas, [rois]).view(3, 81, 4)[:, 1:]  # as torchvision's postprocessing
    assert torch.allclose(boxes, delta2bbox(rois, their_deltas).view(3, 80, 4), atol=TOL)
    feats = torch.randn(3, 32, 14, 14, generator=g)
    masks = model.roi_heads.mask_predictor(model.roi_heads.mask_head(feats))
    assert torch.allclose(masks[:, 1:], mmdet_mask_head(sd, feats), atol=TOL)


@torch.no_grad()
@pytest.mark.parametrize("gates", [False, True])
def test_converted_vit_blocks_and_gates_compute_the_authors(gates):
    model, sd = small_svit(gates=gates)
    x = torch.randn(2, 30, 192, generator=torch.Generator().manual_seed(3))
    for i, layer in enumerate(model.backbone.layers):
        # SViT's blocks normalise with eps 1e-5, ours (DeiT's) 1e-6: the outputs agree within 1e-4
        theirs = encoder_layer_block(sd, f"backbone.blocks.{i}", x, 3) if gates else timm_block(
            sd, f"backbone.blocks.{i}", x, 3)
        assert torch.allclose(layer(x), theirs, atol=TOL)
    for k, block in enumerate(model.backbone.gated if gates else []):
        log_probs, keep = selective_module(sd, f"backbone.selective_modules.{k}", x)
        ours = model.backbone.layers[block].gate(x)
        assert torch.allclose(ours, log_probs, atol=TOL) and torch.equal(ours[..., 0] > ours[..., 1], keep)


@torch.no_grad()
def test_converted_dge_deit_computes_the_authors_blocks():
    torch.manual_seed(4)
    reference = ReferenceDGEDeiT().eval()  # DeiT-T's width, 4 blocks, trained at 256 px (16 x 16)
    backbone = DGEViTBackbone("deit_mini_dge", pretrain_size=256).eval()
    result = convert_state_dict(reference.state_dict(), backbone, strict=False, source="reference")
    missing, unexpected = backbone.load_state_dict(result.state_dict, strict=False)
    assert not unexpected and all(k.startswith(("rescale.", "project.")) for k in missing)
    x = torch.randn(1, 3, 256, 256)
    tokens, grid, keep, key_mask = backbone.embed(x, [(256, 256)])
    theirs, logits = reference.tokens(x)
    ours = backbone.run_blocks(tokens, grid, keep, key_mask)
    assert torch.allclose(ours, theirs, atol=TOL)
    choices = [choice for _, choice, _ in backbone.choices]
    assert all(torch.equal(c, block_logits.argmax(-1)) for c, block_logits in zip(choices, logits))
    assert {int(v) for c in choices for v in c.unique()} == {0, 1, 2}  # every granularity chosen somewhere


def test_unknown_keys_wrong_shapes_and_misfits_are_named():
    official = random_state(mmdet_adapter_shapes(192, gates=True, **SMALL_SHAPES))
    model = coco_model("mask_rcnn_deit_t_adapter_svit.yaml", *SMALL, "model.backbone.name=deit_mini_adapter_svit")
    message = one_line_error(convert_state_dict, {**official, "backbone.extra.weight": torch.ones(1)}, model,
                             source="x.pth")
    assert message.startswith("x.pth: 1 keys unknown to the uzh-rpg/svit (SViT-Adapter-Ti Mask R-CNN, 3 SViT gates)")
    assert "backbone.extra.weight" in message
    wrong = {**official, "neck.fpn_convs.2.conv.weight": torch.ones(32, 32, 1, 1)}
    assert "neck.fpn.layer_blocks.2.0.weight (32, 32, 1, 1) vs (32, 32, 3, 3)" in one_line_error(
        convert_state_dict, wrong, model)
    dense = coco_model("mask_rcnn_deit_t_adapter.yaml", *SMALL, "model.backbone.name=deit_mini_adapter")
    assert "3 SViT gates have no place in the config's dense backbone" in one_line_error(
        convert_state_dict, official, dense)
    assert "mask_rcnn_deit_t_adapter_svit.yaml" in one_line_error(convert_state_dict, official, dense)
    message = one_line_error(convert_state_dict, official, coco_model(
        "mask_rcnn_deit_t_adapter_svit.yaml", *SMALL, "model.backbone.name=deit_mini_adapter_svit",
        "model.rcnn.anchor_scale=4"))
    assert "mmdet's anchors are 8 x the stride" in message
    assert "builds a DETR, the checkpoint is a MaskRCNN" in one_line_error(convert_state_dict, official,
                                                                           coco_model("detr_r18_synthetic.yaml", "model.backbone.pretrained=''"))
    # vtpack: unknown key, a shape, split sizes, another backbone, a backbone where a detector is evaluated
    vt = random_state(vtpack_shapes(192))
    dge = coco_model("mask_rcnn_deit_t_dge.yaml")
    assert "blocks.3.dge.extra" in one_line_error(convert_state_dict, {**vt, "blocks.3.dge.extra": torch.ones(1)}, dge,
                                                  strict=False)
    message = one_line_error(convert_state_dict, {**vt, "blocks.2.mlp.fc1.bias": torch.ones(5)}, dge, strict=False)
    assert "backbone.layers.encoder_layer_2.mlp.0.bias (5,) vs (768,)" in message
    assert "DGE split sizes ['blocks.0.dge.splits [2, 1]']" in one_line_error(
        convert_state_dict, {**vt, "blocks.0.dge.splits": torch.tensor([2, 1])}, dge, strict=False)
    message = one_line_error(convert_state_dict, vt, coco_model("mask_rcnn_deit_s_dge.yaml"), strict=False)
    assert "192 wide with 12 blocks, the config's backbone 384 wide" in message and "deit_t_dge" in message
    message = one_line_error(convert_state_dict, vt, dge)  # strict: --eval --resume of a classification file
    assert "keys of the model the checkpoint leaves empty" in message and "model.backbone.pretrained" in message
    missing_kv = {k: v for k, v in vt.items() if k != "blocks.4.attn.kv.weight"}
    assert "blocks.4.attn.q.weight without blocks.4.attn.kv.weight" in one_line_error(
        convert_state_dict, missing_kv, dge, strict=False)


def test_format_detection():
    vt, mm = random_state(vtpack_shapes(192, depth=2)), random_state(mmdet_adapter_shapes(192, depth=4))
    assert detect_layout(vt).describe() == "StevenGrove/vtpack (DeiT-Ti with DGE, classification)"
    assert detect_layout(mm).describe() == "uzh-rpg/svit (ViT-Adapter-Ti Mask R-CNN)"
    assert detect_layout(mm, "svit_mmdet").format == "svit_mmdet"
    assert "--format detr, but its keys are StevenGrove/vtpack's" in one_line_error(detect_layout, vt, "detr")
    assert "its keys are uzh-rpg/svit's" in one_line_error(detect_layout, mm, "vtpack")
    # a backbone of theirs alone, and the project's own checkpoints, are not these formats
    assert not is_official({k: v for k, v in mm.items() if k.startswith("backbone.")})
    assert not is_official(coco_model("mask_rcnn_deit_t_dge.yaml").state_dict())
    assert "not an authors' checkpoint" in one_line_error(detect_layout, {"blocks.0.attn.q.weight": torch.ones(1)})


def test_the_tool_and_direct_loading(tmp_path):
    from tools.convert_checkpoint import main

    # vtpack: a backbone file that model.backbone.pretrained loads, routers included
    vt = random_state(vtpack_shapes(192, depth=4))
    src = tmp_path / "deit_dge.pth"
    torch.save({"model": vt, "model_ema": None, "epoch": 299, "args": argparse.Namespace(model="deit_dge")}, src)
    with no_init():  # the tool builds the config's model, every weight of which it then loads
        done = main([str(src), str(tmp_path / "backbone.pth"), "--opts", "model.backbone.name=deit_mini_dge"])
    assert done["config"] == "configs/mask_rcnn_deit_t_dge.yaml" and done["backbone_only"]
    backbone = DGEViTBackbone("deit_mini_dge", pretrained=str(tmp_path / "backbone.pth"))
    assert torch.equal(backbone.layers.encoder_layer_3.router.gate.weight, vt["blocks.3.dge.router.gate.weight"])
    assert torch.equal(backbone.conv_proj.weight, vt["patch_embed.proj.weight"])
    # the authors' file itself as model.weights: the backbone converted, the rest as initialised
    model = coco_model("mask_rcnn_deit_t_dge.yaml", "model.backbone.name=deit_mini_dge")
    load_model_weights(model, load_checkpoint(src), str(src), strict=False)
    assert torch.equal(model.backbone.layers.encoder_layer_2.mlp[0].weight, vt["blocks.2.mlp.fc1.weight"])
    message = one_line_error(load_model_weights, model, load_checkpoint(src), "w.pth", allow_official=False)
    assert "not a detr_sparse training checkpoint to resume: train a detector from it with " \
           "model.backbone.pretrained=w.pth or model.weights=w.pth" in message
    # svit: mmdet's file ({"meta", "state_dict"}) converts, and loads directly as --eval --resume would
    official = random_state(mmdet_adapter_shapes(192, gates=True, **SMALL_SHAPES))
    src = tmp_path / "svit.pth"
    torch.save({"meta": {"CLASSES": ("person",) * 80, "epoch": 6}, "state_dict": official}, src)
    opts = SMALL + ["model.backbone.name=deit_mini_adapter_svit"]
    with no_init():
        done = main([str(src), str(tmp_path / "ours.pth"), "--opts", *opts])
    assert done["config"] == "configs/mask_rcnn_deit_t_adapter_svit.yaml" and not done["backbone_only"]
    state = load_checkpoint(tmp_path / "ours.pth")
    assert state["converted_from"]["format"] == "svit_mmdet"
    model = coco_model("mask_rcnn_deit_t_adapter_svit.yaml", *opts)
    load_model_weights(model, load_checkpoint(src), str(src))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["model"].items())
    assert torch.equal(model.roi_heads.box_predictor.cls_score.bias[1:],
                       official["roi_head.bbox_head.fc_cls.bias"][:80])
