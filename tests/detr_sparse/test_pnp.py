import pytest
import torch
from torch import nn

from detr_sparse import build_model
from detr_sparse.sparsity.pnp import PollAndPool, reverse_project, score_regulariser
from engine.benchmark import count_flops
from engine.config import load_config
from helpers import TINY_MODEL, train_steps, two_image_batch


class FirstChannel(nn.Module):
    """A score network whose logit is the token's channel 0: hand-made scores."""

    def forward(self, x):
        return x[..., :1]


def _sampler(num_coarse=2, d=8):
    torch.manual_seed(0)
    sampler = PollAndPool(d, num_coarse)
    sampler.score = FirstChannel()
    return sampler


def _tokens(d=8):
    """Two images of 10 and 6 valid tokens; channel 0 ranks them."""
    torch.manual_seed(1)
    src, pos = torch.randn(2, 10, d), torch.randn(2, 10, d)
    src[:, :, 0] = torch.tensor([0.0, 9, 1, 8, 2, 7, 3, 6, 4, 5])
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 6:] = True
    src[1, 6:, 0] = 100.0  # padding would win if it were not excluded
    return src, mask, pos


def test_poll_picks_each_images_best_tokens_and_pool_takes_only_the_rest():
    src, mask, pos = _tokens()
    s = _sampler()(src, mask, pos, ratio=0.5)
    assert s.polled.index[0].tolist() == [1, 3, 5, 7, 9]  # int(10 * 0.5) best, in map order
    assert s.polled.index[1][s.polled.mask[1]].tolist() == [1, 3, 5]  # int(6 * 0.5) of 6 valid
    w = s.pool_weights
    polled = s.polled.dense(10)
    assert (w[polled] == 0).all() and (w[1, 6:] == 0).all()  # polled and padded get nothing
    torch.testing.assert_close(w.sum(1), torch.ones(2, 2))  # each coarse token: a softmax
    assert s.src.shape == (2, 5 + 2, 8) and s.mask.tolist()[1] == [False] * 3 + [True] * 2 + [False] * 2


def test_coarse_position_is_the_pool_weighted_average_and_fine_tokens_keep_theirs():
    src, mask, pos = _tokens()
    s = _sampler()(src, mask, pos, ratio=0.5)
    torch.testing.assert_close(s.pos[:, 5:], s.pool_weights.transpose(1, 2) @ pos)
    torch.testing.assert_close(s.pos[0, :5], pos[0, [1, 3, 5, 7, 9]])
    # fine tokens: normalised features times their score (the score net's gradient path)
    scores = torch.sigmoid(src[0, [1, 3, 5, 7, 9], 0])
    expected = nn.functional.layer_norm(src[0, [1, 3, 5, 7, 9]], (8,)) * scores[:, None]
    torch.testing.assert_close(s.src[0, :5], expected)


def test_ratio_one_without_coarse_tokens_passes_every_token():
    src, mask, pos = _tokens()
    s = _sampler(num_coarse=0)(src, mask, pos, ratio=1.0)
    assert s.src.shape == (2, 10, 8)
    assert s.polled.index[0].tolist() == list(range(10))
    assert s.polled.index[1][:6].tolist() == list(range(6)) and s.mask[1].tolist() == [False] * 6 + [True] * 4
    torch.testing.assert_close(s.pos[0], pos[0])


def test_reverse_projection_of_an_identity_encoder_and_the_density_map():
    src, mask, pos = _tokens()
    s = _sampler()(src, mask, pos, ratio=0.5)
    dense = reverse_project(s.src, s)  # an encoder that changes nothing
    polled = s.polled.dense(10)
    x = nn.functional.layer_norm(src, (8,)) * s.scores[..., None]
    torch.testing.assert_close(dense[polled], x[polled])
    torch.testing.assert_close(dense[~polled], (s.pool_weights @ s.src[:, -2:])[~polled])
    assert (dense[1, 6:] == 0).all()
    density = s.density()
    assert (density[polled] == 1).all()
    # each coarse token spreads a total weight of 1 over the remaining tokens
    torch.testing.assert_close(density.sum(1), torch.tensor([5.0 + 2, 3.0 + 2]))
    assert 0 < score_regulariser(s) < 1


def test_a_padded_batch_samples_what_each_image_samples_alone():
    src, mask, pos = _tokens()
    sampler = _sampler()
    batched = sampler(src, mask, pos, ratio=0.5)
    alone = sampler(src[1:, :6], mask[1:, :6], pos[1:, :6], ratio=0.5)
    torch.testing.assert_close(batched.src[1, :3], alone.src[0, :3])
    torch.testing.assert_close(batched.src[1, 5:], alone.src[0, 3:])  # coarse tokens
    torch.testing.assert_close(batched.pos[1, 5:], alone.pos[0, 3:])


def _model(*extra):
    torch.manual_seed(0)
    opts = TINY_MODEL + ["model.name=pnp_detr", "model.pnp.num_coarse=4", *extra]
    return build_model(load_config(None, opts).model, 3)


def test_training_random_ratio_losses_and_any_ratio_at_inference():
    model = _model("model.pnp.random_ratio=[0.3,0.9]").train()
    images, targets = two_image_batch((96, 128), (128, 96))
    ratios = set()
    for _ in range(4):
        out = model(images, targets)
        ratios.add(round(out["poll_ratio"].item(), 3))
    assert {"loss_poll_score", "loss_ce", "poll_ratio", "poll_in_boxes", "poll_outside"} <= set(out)
    assert len(ratios) > 1  # a ratio drawn per iteration
    model.random_ratio, model.poll_ratio = (), 1.0  # every token polled, inside the boxes and out
    out = model(images, targets)
    assert out["poll_in_boxes"] == out["poll_outside"] == 1
    model.eval()
    for ratio in (0.25, 1.0):
        model.poll_ratio = ratio
        with torch.no_grad():
            assert len(model(images)) == 2
    assert _model("model.pnp.poll_ratio=0.5").poll_ratio == 0.5
    with pytest.raises(ValueError, match="model.pnp.random_ratio"):
        _model("model.pnp.random_ratio=[0.9,0.3]")


def test_training_steps_reduce_loss_and_the_transformer_shrinks():
    losses = train_steps(_model("model.pnp.poll_ratio=0.33").train(), *two_image_batch((96, 128), (128, 96)), steps=12)
    assert losses[-1] < 0.9 * losses[0]
    model = _model().eval()
    images = two_image_batch((192, 256), (192, 256))[0]
    encoder = {}
    for ratio in (0.33, 1.0):
        model.poll_ratio = ratio
        encoder[ratio] = count_flops(model, images, model.parts).by_part["encoder"]
    assert encoder[0.33] < 0.45 * encoder[1.0]


def test_polling_every_token_leaves_finite_gradients():
    src, mask, pos = _tokens()
    sampler = _sampler()
    src.requires_grad_(True)
    s = sampler(src, mask, pos, ratio=1.0)  # nothing left to pool
    assert (s.pool_weights == 0).all() and (s.src[:, -2:] == 0).all()
    s.src.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in sampler.parameters() if p.grad is not None)
    assert torch.isfinite(src.grad).all()


def test_a_pre_norm_transformer_is_flagged(caplog):
    _model()
    assert "pre_norm" not in caplog.text  # DETR's post-norm: the poll score reaches attention
    _model("model.transformer.pre_norm=true")
    assert "model.transformer.pre_norm with pnp_detr" in caplog.text
