import torch

from detr_sparse import build_model
from detr_sparse.image_batch import ImageBatch
from detr_sparse.position_encoding import PositionEmbeddingSine
from engine.config import load_config
from helpers import TINY_MODEL, train_steps

def _tiny_model(num_classes=3):
    torch.manual_seed(0)
    return build_model(load_config(None, TINY_MODEL + ["model.transformer.dropout=0.0"]).model, num_classes)


def _batch():
    images = ImageBatch.from_images([torch.randn(3, 96, 128), torch.randn(3, 128, 96)])
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [50.0, 60.0, 90.0, 120.0]]),
                "labels": torch.tensor([0, 2])}]
    return images, targets


def test_training_returns_named_finite_losses():
    model = _tiny_model().train()
    images, targets = _batch()
    out = model(images, targets)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())


def test_eval_returns_absolute_boxes_inside_each_image():
    model = _tiny_model().eval()
    images, _ = _batch()
    with torch.no_grad():
        preds = model(images)
    assert len(preds) == 2
    for p, (h, w) in zip(preds, images.sizes.tolist()):
        assert p["boxes"].shape == (8, 4) and p["scores"].shape == (8,) and p["labels"].max() < 3
        assert (p["boxes"][:, 2] >= p["boxes"][:, 0]).all()
        assert p["boxes"][:, 0::2].max() <= w + 1e-3 and p["boxes"][:, 1::2].max() <= h + 1e-3


def test_training_steps_reduce_loss_on_fixed_batch():
    losses = train_steps(_tiny_model().train(), *_batch(), steps=20)
    assert losses[-1] < 0.9 * losses[0], losses


def test_position_embedding_ignores_padding():
    pe = PositionEmbeddingSine(16)
    mask = torch.zeros(1, 6, 8, dtype=torch.bool)
    padded = torch.ones(1, 9, 11, dtype=torch.bool)
    padded[:, :6, :8] = False
    assert torch.allclose(pe(mask), pe(padded)[:, :, :6, :8], atol=1e-5)


def test_bf16_autocast_training_step_is_finite():
    from engine.train import autocast

    model = _tiny_model().train()
    images, targets = _batch()
    with autocast(torch.device("cpu"), "bf16"):
        out = model(images, targets)
    loss = sum(v for k, v in out.items() if k.startswith("loss"))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_ffn_in_chunks_without_gradients_equals_the_whole():
    from detr_sparse.transformers.detr_transformer import FFN

    ffn = FFN(16, 64, 0.0)
    x = torch.randn(2, 3000, 16)  # 6000 tokens: three chunks of 2048 and a rest
    whole = ffn(x)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), whole)
