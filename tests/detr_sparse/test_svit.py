"""SViT's parts on one ViT block: dense parity when every token is kept, training form =
inference form for fixed gates, pruned tokens unchanged, padding, an image keeping nothing,
the ratio loss on a hand-made example, deterministic evaluation decisions."""
import pytest
import torch

from detr_sparse.backbones.vit import ViTBlock
from detr_sparse.sparsity.svit import (KEEP_TARGETS, SelectGate, forced_keep, keep_decisions, keep_ratio_loss,
                                       keep_targets, svit_update)
from helpers import record_host_reads


def _block() -> ViTBlock:
    torch.manual_seed(0)
    return ViTBlock(32, heads=2, drop_path=0.0).eval()


def _update(block, x, keep, key_mask=None, grad=False):
    with torch.set_grad_enabled(grad):
        return svit_update(lambda t, m: block(t, m), x, keep, key_mask)


def test_gated_blocks_and_targets_follow_the_paper():
    assert keep_targets(12) == (list(range(3, 12)), pytest.approx(list(KEEP_TARGETS)))
    assert keep_targets(4) == ([1, 2, 3], pytest.approx([0.7, 0.49, 0.343]))
    with pytest.raises(ValueError, match="depth 6"):
        keep_targets(6)


@pytest.mark.parametrize("grad", [False, True])
def test_keeping_every_token_is_the_dense_block(grad):
    block, x = _block(), torch.randn(2, 20, 32)
    torch.testing.assert_close(_update(block, x, torch.ones(2, 20), grad=grad), block(x), atol=1e-5, rtol=1e-5)


def test_training_form_equals_inference_form_and_pruned_tokens_pass_unchanged():
    block, x = _block(), torch.randn(2, 20, 32)
    keep = (torch.rand(2, 20, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    keep[1, :13] = 1.0  # different counts per image
    masked, gathered = _update(block, x, keep, grad=True), _update(block, x, keep)
    torch.testing.assert_close(masked, gathered, atol=1e-5, rtol=1e-5)
    pruned = keep == 0
    assert torch.equal(gathered[pruned], x[pruned]) and torch.equal(masked.detach()[pruned], x[pruned])
    # a kept token's result is the block over the kept tokens alone
    image = keep[0].bool()
    torch.testing.assert_close(gathered[0, image], block(x[:1, image])[0], atol=1e-5, rtol=1e-5)


def test_one_image_s_gathered_form_reads_only_its_kept_positions_back(monkeypatch):
    """On CUDA every host read is a sync, per gated block here: one image needs only the
    positions of its kept tokens (their count sets the shapes)."""
    block, x = _block(), torch.randn(1, 20, 32)
    keep = (torch.rand(1, 20, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    reads = record_host_reads(monkeypatch)
    out = _update(block, x, keep)
    assert reads == ["nonzero"]
    image = keep[0].bool()
    torch.testing.assert_close(out[0, image], block(x[:, image])[0], atol=1e-5, rtol=1e-5)


def test_the_gate_gets_a_gradient_through_the_straight_through_decisions():
    block, gate = _block(), SelectGate(32)
    x = torch.randn(1, 20, 32)
    torch.manual_seed(3)
    with torch.enable_grad():
        keep = keep_decisions(gate(x), None, training=True)
        _update(block, x, keep, grad=True).square().sum().backward()
    assert gate.net[1].weight.grad is not None and gate.net[1].weight.grad.abs().sum() > 0


def test_a_padded_batch_equals_each_image_alone_and_padding_is_never_kept():
    block, gate = _block(), SelectGate(32)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, 12:] = False  # the second image has 12 tokens
    x = torch.randn(2, 20, 32)
    key_mask = valid[:, None, None, :]
    with torch.no_grad():
        keep = keep_decisions(gate(x), valid, training=False)
        assert not keep[~valid].any()
        both = _update(block, x, keep, key_mask)
        alone = _update(block, x[1:, :12], keep[1:, :12])
    torch.testing.assert_close(both[1, :12], alone[0], atol=1e-5, rtol=1e-5)
    keep_train = keep_decisions(gate(x), valid, training=True)
    assert not keep_train[~valid].any()


@pytest.mark.parametrize("grad", [False, True])
def test_an_image_keeping_nothing_stays_as_it_is_without_nan(grad):
    block, x = _block(), torch.randn(2, 20, 32)
    keep = torch.zeros(2, 20)
    keep[0, :5] = 1.0
    out = _update(block, x, keep, grad=grad)
    assert out.isfinite().all() and torch.equal(out[1].detach(), x[1])
    assert torch.equal(_update(block, x, torch.zeros(2, 20), grad=grad).detach(), x)


def test_ratio_loss_on_a_hand_made_example():
    # two gated blocks, two images of 4 tokens, the second with one padded token
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    keeps = [torch.tensor([[1., 1., 0., 0.], [1., 1., 1., 0.]]), torch.tensor([[1., 0., 0., 0.], [0., 0., 0., 0.]])]
    loss, shares = keep_ratio_loss(keeps, valid, [0.5, 0.25])
    # shares over the 7 valid tokens: 5/7 and 1/7
    torch.testing.assert_close(shares, torch.tensor([5 / 7, 1 / 7]))
    torch.testing.assert_close(loss, torch.tensor(((5 / 7 - 0.5) ** 2 + (1 / 7 - 0.25) ** 2) / 2))
    per_image, _ = keep_ratio_loss(keeps, valid, [0.5, 0.25], per_image=True)
    expected = (((0.5 - 0.5) ** 2 + (1 - 0.5) ** 2) / 2 + ((0.25 - 0.25) ** 2 + (0 - 0.25) ** 2) / 2) / 2
    torch.testing.assert_close(per_image, torch.tensor(expected))


def test_evaluation_decisions_are_deterministic_unless_asked_to_sample():
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(2, 50, 2), -1)
    first, second = (keep_decisions(log_probs, None, training=False) for _ in range(2))
    assert torch.equal(first, second)
    assert torch.equal(first, (log_probs[..., 0] > log_probs[..., 1]).float())
    sampled = [keep_decisions(log_probs, None, training=False, stochastic=True) for _ in range(2)]
    assert not torch.equal(*sampled)


def test_forced_keep_keeps_the_target_share_of_each_images_tokens_by_gate_score():
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(2, 20, 2), -1)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, 10:] = False
    keep = forced_keep(log_probs, valid, 0.5)
    assert keep.sum(1).tolist() == [11, 6]  # int(valid * share) + 1, as the token core counts
    assert not keep[~valid].any()
    score = log_probs[0, :, 0] - log_probs[0, :, 1]
    assert set(score.topk(11).indices.tolist()) == set(keep[0].nonzero().flatten().tolist())
