import pytest
import torch

from detr_sparse import build_model
from detr_sparse.image_batch import ImageBatch
from engine.benchmark import count_flops
from engine.config import load_config
from helpers import TINY_DEFORMABLE, predict_batched_and_alone, train_steps, two_image_batch

SPARSE = ["model.name=sparse_detr", "model.two_stage=true", "model.with_box_refine=true",
          "model.transformer.enc_layers=3", "model.transformer.dropout=0.0"]


def _model(*extra, num_classes=3):
    torch.manual_seed(0)
    return build_model(load_config(None, TINY_DEFORMABLE + SPARSE + list(extra)).model, num_classes)


def _batch():
    return two_image_batch()


def _encode(model, images):
    srcs, masks = model.features(images)
    pos = [model.position_embedding(m) for m in masks]
    tokens = model.transformer.prepare(srcs, masks, pos)
    return tokens, *model.encode(tokens)


@pytest.mark.parametrize("saliency", ["dam", "os"])
def test_kept_tokens_are_real_and_the_others_keep_their_backbone_features(saliency):
    model = _model("model.sparse.rho=0.3", f"model.sparse.saliency={saliency}").eval()
    with torch.no_grad():
        tokens, memory, extra = _encode(model, _batch()[0])
    kept = extra["kept"].dense(tokens.mask.shape[1])
    valid = (~tokens.mask).sum(1)
    assert kept.sum(1).tolist() == ((valid * 0.3).long() + 1).tolist()
    assert not (kept & tokens.mask).any()
    assert torch.equal(memory[~kept], tokens.src[~kept])
    assert (memory[kept] != tokens.src[kept]).any(-1).all()


@pytest.mark.parametrize("saliency", ["dam", "os"])
def test_training_returns_encoder_aux_losses_and_sparsity_statistics(saliency):
    model = _model("model.sparse.rho=0.3", f"model.sparse.saliency={saliency}").train()
    images, targets = _batch()
    out = model(images, targets)
    expected = {"loss_ce_encaux0", "loss_bbox_encaux1", "loss_giou_encaux0", "loss_ce_enc",
                "keep_ratio", "keep_ratio_level0", "dam_in_kept_level2", "dam_in_kept",
                "keep_in_boxes", "keep_outside"}
    expected |= {"loss_mask"} if saliency == "dam" else {"loss_ce_os", "loss_bbox_os"}
    assert expected <= set(out)
    assert 0 <= out["keep_in_boxes"] <= 1 and 0 <= out["keep_outside"] <= 1
    assert "loss_ce_encaux2" not in out  # the last encoder layer feeds the decoder instead
    assert all(torch.isfinite(v) for v in out.values())
    sum(v for k, v in out.items() if k.startswith("loss")).backward()
    grads = model.scoring.head[-1].weight.grad if saliency == "dam" else model.objectness_class.weight.grad
    assert grads is not None and grads.abs().sum() > 0


def test_empty_targets_give_the_same_keys():
    model = _model("model.sparse.rho=0.3").train()
    images, targets = _batch()
    full = model(images, targets)
    empty = model(images, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2)
    assert set(full) == set(empty) and all(torch.isfinite(v) for v in empty.values())


@pytest.mark.parametrize("saliency", ["dam", "os"])
def test_a_padded_batch_gives_what_each_image_gives_alone(saliency):
    # training mode (dropout 0) also gives the encoder's auxiliary outputs
    model = _model("model.sparse.rho=0.3", f"model.sparse.saliency={saliency}").train()
    batched, singles, _ = predict_batched_and_alone(model, [torch.randn(3, 64, 96), torch.randn(3, 96, 64)])
    for i, single in enumerate(singles):
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(batched[key][i], single[key][0], atol=1e-4, rtol=1e-4)
            aux, aux_single = batched["extra_outputs"]["encaux1"], single["extra_outputs"]["encaux1"]
            n = int(aux_single["query_mask"].sum())
            torch.testing.assert_close(aux[key][i][:n], aux_single[key][0][:n], atol=1e-4, rtol=1e-4)


def test_rho_one_reproduces_the_dense_encoder():
    model = _model("model.sparse.rho=1.0").eval()
    images = _batch()[0]
    with torch.no_grad():
        sparse = model.forward_raw(images)
        model.rho = 0.0  # the dense Deformable DETR+ encoder, same weights
        dense = model.forward_raw(images)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(sparse[key], dense[key], atol=1e-5, rtol=1e-5)


def test_any_rho_at_inference_and_the_encoder_really_shrinks():
    model = _model("model.sparse.rho=0.1").eval()
    images = ImageBatch.from_images([torch.randn(3, 128, 192)])
    encoder = {}
    for rho in (0.0, 0.1, 0.5):
        model.rho = rho
        encoder[rho] = count_flops(model, images, model.parts).by_part["encoder"]
        with torch.no_grad():
            assert len(model(images)[0]["scores"]) > 0
    # linear layers scale with the kept tokens; the value projection still sees every token
    assert encoder[0.1] < 0.35 * encoder[0.0]
    assert encoder[0.1] < encoder[0.5] < encoder[0.0]
    cfg = load_config(None, TINY_DEFORMABLE + SPARSE + ["model.sparse.rho=0.2"])
    assert build_model(cfg.model, 3).rho == 0.2


def test_training_steps_reduce_loss():
    losses = train_steps(_model("model.sparse.rho=0.3").train(), *_batch(), steps=8)
    assert losses[-1] < 0.8 * losses[0]


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="model.sparse.saliency"):
        _model("model.sparse.saliency=objectness")
    with pytest.raises(ValueError, match="model.two_stage"):
        _model("model.two_stage=false")


def test_training_at_rho_zero_is_refused_but_evaluation_runs():
    model = _model("model.sparse.rho=0.0")
    images, targets = _batch()
    with pytest.raises(ValueError, match="model.sparse.rho"):
        model.train()(images, targets)
    with torch.no_grad():
        assert len(model.eval()(images)) == 2


def test_evaluation_skips_the_encoder_auxiliary_heads():
    model = _model("model.sparse.rho=0.3").eval()
    with torch.no_grad():
        out = model.forward_raw(_batch()[0])
    assert out["extra_outputs"] == {} and out["kept"].mask.any()
