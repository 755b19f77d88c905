import pytest
import torch

from detr_sparse import build_model
from detr_sparse.detr import normalized_targets
from detr_sparse.postprocess import postprocess_sigmoid
from engine.config import load_config
from engine.distributed import DistInfo
from engine.logger import setup_logging
from engine.optim import param_groups
from engine.train import autocast
from engine.trainer import Trainer
from helpers import (TINY_DEFORMABLE, checkpoint_model, predict_batched_and_alone, tiny_overrides, train_losses,
                     train_steps, two_image_batch)

PLUS = ["model.name=deformable_detr_plus", "model.two_stage=true", "model.with_box_refine=true"]
VARIANTS = {"plain": [], "refine": ["model.with_box_refine=true"], "two_stage": ["model.two_stage=true"],
            "plus": PLUS}


def _model(extra=(), num_classes=3):
    torch.manual_seed(0)
    opts = TINY_DEFORMABLE + ["model.transformer.dropout=0.0", *extra]
    return build_model(load_config(None, opts).model, num_classes)


def _batch():
    return two_image_batch()


def _total(losses):
    return sum(v for k, v in losses.items() if k.startswith("loss"))


@pytest.mark.parametrize("variant", ["plain", "refine", "two_stage", "plus"])
def test_a_padded_batch_gives_what_each_image_gives_alone(variant):
    """From the projected maps on: padding with garbage must not leak into the valid tokens.
    (The CNN backbone itself sees the zero-padded image differently at the valid border, so
    the maps of each image alone are padded here instead.)"""
    model = _model(VARIANTS[variant]).train()  # dropout 0; training also gives every proposal's box
    batched, singles, masks = predict_batched_and_alone(model, [torch.randn(3, 64, 96), torch.randn(3, 96, 64)])
    for i, single in enumerate(singles):
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(batched[key][i], single[key][0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(batched["aux_outputs"][0][key][i],
                                       single["aux_outputs"][0][key][0], atol=1e-4, rtol=1e-4)
        if "enc_outputs" in single:
            valid = ~torch.cat([mk[i].flatten() for mk in masks])
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(batched["enc_outputs"][key][i][valid],
                                           single["enc_outputs"][key][0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_training_steps_reduce_loss_on_fixed_batch(variant):
    losses = train_steps(_model(VARIANTS[variant]).train(), *_batch(), steps=8)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_loss_keys_are_complete_and_the_same_for_empty_targets(variant):
    model = _model(VARIANTS[variant]).train()
    images, targets = _batch()
    losses = model(images, targets)
    names = ["loss_ce", "loss_bbox", "loss_giou", "class_error"]
    expected = {*names, *(f"{n}_0" for n in names)}  # 2 decoder layers: one aux output
    if variant == "plus":
        expected |= {f"{n}_enc" for n in names}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = model(images, empty)
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"].item() == 0 and losses["loss_ce"].item() > 0
    _total(losses).backward()


def test_plain_two_stage_trains_the_encoder_head_on_foreground_only():
    model = _model(VARIANTS["two_stage"]).train()
    images, targets = _batch()
    out = model.forward_raw(images)
    enc = out["enc_outputs"]
    assert enc["pred_logits"].shape[:2] == enc["pred_boxes"].shape[:2]
    crit = model.criterion
    norm = normalized_targets(targets, images.sizes)
    relabelled = [{**t, "labels": torch.zeros_like(t["labels"])} for t in norm]
    alone = crit.single(enc, relabelled, 3.0)
    assert torch.allclose(crit(out, norm)["loss_ce_enc"], alone["loss_ce"])


def test_eval_returns_top_detections_inside_each_image():
    model = _model(PLUS).eval()
    images, _ = _batch()
    with torch.no_grad():
        preds = model(images)
    for p, (h, w) in zip(preds, images.sizes.tolist()):
        # top min(100, Q * K) = 30 (query, class) pairs
        assert p["boxes"].shape == (30, 4) and p["scores"].shape == (30,) and p["labels"].max() < 3
        assert (p["scores"][:-1] >= p["scores"][1:]).all()
        assert (p["boxes"][:, 2] >= p["boxes"][:, 0]).all()
        assert p["boxes"][:, 0::2].max() <= w + 1e-3 and p["boxes"][:, 1::2].max() <= h + 1e-3


def test_postprocess_sigmoid_picks_the_best_query_class_pairs():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 2, 1], logits[0, 0, 0], logits[0, 2, 0] = 5.0, 3.0, 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.25, 0.5, 0.5, 1.0]]])
    out = postprocess_sigmoid({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]), 3)[0]
    assert out["labels"].tolist() == [1, 0, 0]
    assert torch.allclose(out["scores"], torch.tensor([5.0, 3.0, 1.0]).sigmoid())
    expected = torch.tensor([[0.0, 0.0, 100.0, 100.0], [80.0, 40.0, 120.0, 60.0], [0.0, 0.0, 100.0, 100.0]])
    assert torch.allclose(out["boxes"], expected)
    # fewer pairs than asked for: all of them
    assert len(postprocess_sigmoid({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[1, 1]]))[0]["scores"]) == 6


def test_lr_multipliers_reach_sampling_offsets_and_reference_points():
    model = _model()
    groups = param_groups(model, 1e-4, 2e-5, 1e-4, {"sampling_offsets": 0.1, "reference_points": 0.1})
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    names = {n: lr_of[id(p)] for n, p in model.named_parameters()}
    slow = [n for n in names if "sampling_offsets" in n or "reference_points" in n]
    assert "transformer.reference_points.weight" in slow
    assert {"transformer.encoder.0.self_attn.sampling_offsets.weight",
            "transformer.decoder.1.cross_attn.sampling_offsets.bias"} <= set(slow)
    assert all(names[n] == pytest.approx(1e-5) for n in slow)
    assert names["transformer.level_embed"] == 1e-4 and names["class_embed.0.weight"] == 1e-4
    assert all(lr == 2e-5 for n, lr in names.items() if n.startswith("backbone."))


def test_heads_are_shared_without_refinement_and_copies_with_it():
    plain, refine, plus = _model(), _model(VARIANTS["refine"]), _model(PLUS)
    assert plain.bbox_embed[0] is plain.bbox_embed[1] and len(plain.class_embed) == 2
    assert refine.bbox_embed[0] is not refine.bbox_embed[1] and len(plus.class_embed) == 3
    # boxes relative to a bare centre start small; relative to a box they keep its size
    assert refine.bbox_embed[0].layers[-1].bias[2:].tolist() == [-2.0, -2.0]
    assert refine.bbox_embed[1].layers[-1].bias[2:].tolist() == [0.0, 0.0]
    assert all(h.layers[-1].bias[2:].tolist() == [0.0, 0.0] for h in plus.bbox_embed)
    assert torch.allclose(plain.class_embed[0].bias, torch.tensor(-4.59512), atol=1e-4)


def test_builder_config_errors_and_feature_levels():
    with pytest.raises(ValueError, match="model.two_stage"):
        _model(["model.name=deformable_detr_plus"])
    with pytest.raises(ValueError, match="model.loss.aux_loss"):
        _model(["model.with_box_refine=true", "model.loss.aux_loss=false"])
    # DETR's default single map is replaced by res3..res5; a 4th level is an extra conv
    model = _model(["model.backbone.out_features=[res5]", "model.transformer.num_feature_levels=4"])
    assert model.in_features == ["res3", "res4", "res5"] and len(model.input_proj) == 4
    images, _ = _batch()
    srcs, masks = model.features(images)
    assert [s.shape[-2:] for s in srcs] == [(12, 12), (6, 6), (3, 3), (2, 2)]
    # image 0 is 64 of 96 pixels high: nearest-sampled, the last of 3 rows is padding
    assert masks[2][0].tolist() == [[False] * 3, [False] * 3, [True] * 3]


def test_bf16_autocast_training_step_is_finite():
    model = _model(PLUS).train()
    images, targets = _batch()
    with autocast(torch.device("cpu"), "bf16"):
        loss = _total(model(images, targets))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bf16_autocast_inference_gives_fp32_boxes_close_to_fp32():
    model = _model(["model.with_box_refine=true"]).eval()  # (two-stage's top-k could pick other proposals)
    images, _ = _batch()
    with torch.no_grad():
        exact = model.forward_raw(images)["pred_boxes"]
        with autocast(torch.device("cpu"), "bf16"):
            boxes = model.forward_raw(images)["pred_boxes"]
    assert boxes.dtype == torch.float32  # refined layer after layer in fp32, not bf16's 2^-8 steps
    assert (boxes - exact).abs().max() < 0.02


def test_trainer_trains_evaluates_and_reloads_deformable_detr_plus(tiny_coco, tmp_path):
    opts = tiny_overrides(tiny_coco, tmp_path) + TINY_DEFORMABLE + PLUS + [
        "train.epochs=1", "train.lr_multipliers={sampling_offsets: 0.1, reference_points: 0.1}"]
    setup_logging(tmp_path, True)
    Trainer(load_config(None, opts), DistInfo()).train()
    assert all(torch.isfinite(torch.tensor(train_losses(tmp_path))))
    # with cloned heads (and shared ones, whose repeated keys hold one tensor) the
    # checkpoint loads back into a fresh model
    state = checkpoint_model(tmp_path)
    _model(PLUS, num_classes=state["class_embed.0.bias"].numel()).load_state_dict(state)
