import torch

from detr_sparse.criterion import SetCriterion
from detr_sparse.matcher import HungarianMatcher


def _criterion(k=3):
    return SetCriterion(k, HungarianMatcher(), cls_weight=1, bbox_weight=5, giou_weight=2, eos_coef=0.1)


def _outputs(bs=2, nq=4, k=3, aux=0):
    out = {"pred_logits": torch.randn(bs, nq, k + 1, requires_grad=True),
           "pred_boxes": torch.rand(bs, nq, 4).mul(0.3).add(0.3).requires_grad_()}
    out["aux_outputs"] = [{"pred_logits": torch.randn(bs, nq, k + 1), "pred_boxes": torch.rand(bs, nq, 4)}
                          for _ in range(aux)]
    return out


def test_perfect_boxes_have_zero_box_losses():
    crit = _criterion()
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])
    logits = torch.full((1, 2, 4), -10.0)
    logits[0, 0, 1] = logits[0, 1, 2] = 10.0
    losses = crit({"pred_logits": logits, "pred_boxes": boxes[None]},
                  [{"labels": torch.tensor([1, 2]), "boxes": boxes}])
    assert losses["loss_bbox"].item() < 1e-6 and losses["loss_giou"].item() < 1e-5
    assert losses["loss_ce"].item() < 1e-3 and losses["class_error"].item() == 0


def test_losses_are_weighted_and_aux_keys_present():
    torch.manual_seed(0)
    crit = _criterion()
    out = _outputs(aux=2)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.2]])},
               {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.4, 0.6, 0.1, 0.1]])}]
    losses = crit(out, targets)
    assert {"loss_ce_0", "loss_bbox_1", "loss_giou_1", "loss_ce", "loss_bbox", "loss_giou"} <= set(losses)
    unweighted = SetCriterion(3, HungarianMatcher(), 1, 1, 1, 0.1)(out, targets)
    assert torch.allclose(losses["loss_bbox"], 5 * unweighted["loss_bbox"])
    assert torch.allclose(losses["loss_giou"], 2 * unweighted["loss_giou"])


def test_empty_targets_give_only_no_object_loss():
    crit = _criterion()
    out = _outputs()
    losses = crit(out, [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    # same keys as a batch with objects: ranks average them in one collective
    full = crit(out, [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2)
    assert set(losses) == set(full)
    assert torch.isfinite(losses["loss_ce"])
    losses["loss_ce"].backward()


def test_zero_area_predictions_give_finite_losses_and_gradients():
    crit = _criterion()
    boxes = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.0, 0.1]]], requires_grad=True)
    losses = crit({"pred_logits": torch.randn(1, 2, 4), "pred_boxes": boxes},
                  [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.3, 0.3, 0.1, 0.1]])}])
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(boxes.grad).all()


def test_no_object_weight_applies():
    out = _outputs(bs=1)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    low = SetCriterion(3, HungarianMatcher(), eos_coef=0.1)(out, empty)["loss_ce"]
    high = SetCriterion(3, HungarianMatcher(), eos_coef=1.0)(out, empty)["loss_ce"]
    # with only no-object targets the weighted mean does not depend on the weight
    assert torch.allclose(low, high)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    low = SetCriterion(3, HungarianMatcher(), eos_coef=0.1)(out, targets)["loss_ce"]
    high = SetCriterion(3, HungarianMatcher(), eos_coef=1.0)(out, targets)["loss_ce"]
    assert not torch.allclose(low, high)


def _focal(k=3, binary_enc=True):
    return SetCriterion(k, HungarianMatcher(focal=True), cls_weight=2, bbox_weight=5, giou_weight=2,
                        focal_alpha=0.25, binary_enc=binary_enc)


def test_focal_loss_matches_the_deformable_detr_formula():
    torch.manual_seed(0)
    logits, boxes = torch.randn(2, 4, 3), torch.rand(2, 4, 4).mul(0.3).add(0.3)
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.2]])},
               {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.4, 0.6, 0.1, 0.1]])}]
    crit = _focal()
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    indices = crit.matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    onehot = torch.zeros_like(logits)
    for b, ((q, t), tgt) in enumerate(zip(indices, targets)):
        onehot[b, q, tgt["labels"][t]] = 1
    p = logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    focal = ce * (1 - p_t) ** 2 * (0.25 * onehot + 0.75 * (1 - onehot))
    # the official code: focal.mean(1).sum() / num_boxes, times the number of queries
    expected = focal.mean(1).sum() / 3 * 4
    assert torch.allclose(losses["loss_ce"], 2 * expected)
    assert "class_error" in losses and losses["class_error"].shape == ()


def test_encoder_outputs_are_matched_to_foreground_or_real_labels():
    torch.manual_seed(0)
    out = {"pred_logits": torch.randn(1, 4, 3), "pred_boxes": torch.rand(1, 4, 4).mul(0.3).add(0.3),
           "enc_outputs": {"pred_logits": torch.randn(1, 6, 3), "pred_boxes": torch.rand(1, 6, 4).mul(0.3).add(0.3)}}
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.2]])}]
    binary, real = _focal()(out, targets), _focal(binary_enc=False)(out, targets)
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "class_error_enc"} <= set(binary)
    relabelled = [{**targets[0], "labels": torch.tensor([0])}]
    assert torch.allclose(binary["loss_ce_enc"], _focal().single(out["enc_outputs"], relabelled, 1.0)["loss_ce"])
    assert torch.allclose(real["loss_ce_enc"], _focal().single(out["enc_outputs"], targets, 1.0)["loss_ce"])
    assert torch.allclose(binary["loss_ce"], real["loss_ce"])


def test_focal_empty_targets_keep_keys_and_stay_finite():
    out = {"pred_logits": torch.randn(2, 4, 3, requires_grad=True), "pred_boxes": torch.rand(2, 4, 4)}
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    full = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    losses = _focal()(out, empty)
    assert set(losses) == set(_focal()(out, full))
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_ce"] > 0
    losses["loss_ce"].backward()
