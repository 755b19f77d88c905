import pytest
import torch

from detr_sparse.sparsity.tokens import (binary_concrete, block_diagonal_mask, box_shares, gather_tokens, keep_counts,
                                         keep_statistics, kept_from_mask, kept_in_boxes, pack_layout, pack_tokens,
                                         scatter_tokens, select_top, token_centres, unpack_tokens)


def _padding():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 6:] = True  # the second image has 6 valid tokens
    return mask


def test_keep_counts_follow_sparse_detr_and_never_exceed_the_valid_tokens():
    mask = _padding()
    assert keep_counts(mask, 0.1).tolist() == [2, 1]  # int(10 * 0.1) + 1, int(6 * 0.1) + 1
    assert keep_counts(mask, 0.5).tolist() == [6, 4]
    assert keep_counts(mask, 1.0).tolist() == [10, 6]
    with pytest.raises(ValueError, match="keep ratio"):
        keep_counts(mask, 0.0)


def test_top_tokens_never_include_padding():
    mask = _padding()
    scores = torch.arange(10.0).repeat(2, 1)  # padded tokens score best
    kept = select_top(scores, keep_counts(mask, 0.5), mask)
    assert kept.index[0].tolist() == [4, 5, 6, 7, 8, 9]  # in map order
    assert kept.index[1][kept.mask[1]].tolist() == [2, 3, 4, 5]
    assert kept.index[1][~kept.mask[1]].tolist() == [0, 1]  # the next best, never written back
    assert kept.mask.sum(1).tolist() == [6, 4]
    assert not (kept.dense(10) & mask).any()


def test_scatter_writes_only_each_images_own_kept_tokens():
    mask = _padding()
    kept = select_top(torch.arange(10.0).repeat(2, 1), torch.tensor([3, 1]), mask)
    x = torch.randn(2, 10, 4)
    out = scatter_tokens(x, kept, torch.full((2, 3, 4), 7.0))
    changed = (out != x).any(-1)
    assert changed[0].nonzero().flatten().tolist() == [7, 8, 9]
    assert changed[1].nonzero().flatten().tolist() == [5]  # not 4 and 3: slots beyond its count


def test_gather_then_scatter_is_identity_and_carries_gradients():
    kept = select_top(torch.randn(2, 10), torch.tensor([4, 2]), _padding())
    x = torch.randn(2, 10, 3, requires_grad=True)
    ref = torch.randn(2, 10, 2, 2)
    assert gather_tokens(ref, kept.index).shape == (2, 4, 2, 2)
    for b in (slice(None), slice(0, 1)):  # the batch and the one-image path equal torch.gather's
        torch.testing.assert_close(gather_tokens(x[b], kept.index[b]),
                                   x[b].gather(1, kept.index[b, :, None].expand(-1, -1, 3)), rtol=0, atol=0)
    values = gather_tokens(x, kept.index) * 2
    out = scatter_tokens(x.detach(), kept, values)
    out.sum().backward()
    expected = torch.zeros(2, 10)
    expected.scatter_(1, kept.index, kept.mask.float() * 2)
    torch.testing.assert_close(x.grad[..., 0], expected)


def test_kept_from_mask_lists_each_images_positions_in_order_and_pads_with_unselected_ones():
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    kept = kept_from_mask(mask)
    assert kept.counts.tolist() == [3, 1, 5, 0]
    assert kept.mask.sum(1).tolist() == [3, 1, 5, 0]
    assert kept.index[0, :3].tolist() == [1, 2, 4] and kept.index[1, :1].tolist() == [0]
    assert kept.index[2].tolist() == [0, 1, 2, 3, 4]
    # padding slots point at positions the image did not select
    assert not mask.gather(1, kept.index)[~kept.mask].any()
    assert torch.equal(kept.dense(5), mask)
    one = kept_from_mask(mask[:1])  # one image: no padding
    assert one.index.tolist() == [[1, 2, 4]] and one.mask.all() and one.counts.tolist() == [3]


def test_keep_statistics_per_level():
    mask = _padding()
    kept = select_top(torch.arange(10.0).repeat(2, 1), torch.tensor([4, 2]), mask)
    stats = keep_statistics(kept, mask, torch.tensor([0, 8]))
    assert stats["keep_ratio"].item() == pytest.approx((4 / 10 + 2 / 6) / 2)
    # image 0 keeps 6, 7 (level 0 of 8 tokens) and 8, 9 (level 1 of 2); image 1 keeps 4, 5 of 6
    assert stats["keep_ratio_level0"].item() == pytest.approx((2 / 8 + 2 / 6) / 2)
    assert stats["keep_ratio_level1"].item() == pytest.approx((2 / 2 + 0) / 2)


def test_token_centres_follow_each_level_over_the_padded_batch():
    centres = token_centres(torch.tensor([[2, 2], [1, 2]]), (8, 16))
    assert centres.tolist() == [[4, 2], [12, 2], [4, 6], [12, 6], [4, 4], [12, 4]]


def test_kept_in_boxes_counts_valid_tokens_inside_and_outside_the_thing_boxes():
    # one 2x2 level over a 8x16 batch: token centres (4, 2) (12, 2) (4, 6) (12, 6)
    kept = torch.tensor([[True, False, False, True], [True, True, False, False]])
    valid = torch.tensor([[True, True, True, True], [True, False, True, False]])
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "labels": torch.tensor([0])},
               # a thing on the top-left token; the stuff box over everything is left out
               {"boxes": torch.tensor([[0.0, 0.0, 6.0, 4.0], [0.0, 0.0, 16.0, 8.0]]),
                "labels": torch.tensor([0, 1])}]
    shapes = torch.tensor([[2, 2]])
    counts = kept_in_boxes(kept, valid, shapes, targets, (8, 16), is_thing=[True, False])
    # image 0: inside tokens 0, 2 (kept 1), outside 1, 3 (kept 1); image 1: inside token 0
    # (kept), outside the valid token 2 (not kept)
    assert counts.tolist() == [2, 3, 1, 3]
    assert kept_in_boxes(kept, valid, shapes, targets, (8, 16)).tolist() == [2, 4, 1, 2]  # stuff counted
    shares = box_shares(counts, "poll")
    assert shares["poll_in_boxes"].item() == pytest.approx(2 / 3) and shares["poll_outside"].item() == pytest.approx(1 / 3)
    assert box_shares(torch.zeros(4), "poll")["poll_in_boxes"] == 0  # no box: 0, not nan


def _two_image_keep():
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[0, [0, 2, 3, 5]] = True  # 4 kept
    keep[1, [1, 4]] = True  # 2 kept
    return keep


def test_packing_lays_the_kept_tokens_end_to_end_and_pads_only_the_last_container():
    keep = _two_image_keep()
    packing = pack_layout(keep, 6, length=4)
    assert packing.shape == (2, 4)
    assert packing.rows.tolist() == [0, 2, 3, 5, 6 + 1, 6 + 4]
    assert packing.slots.tolist() == list(range(6))
    assert (packing.ids[0] == 0).all() and (packing.ids[1, :2] == 1 << 20).all()
    assert packing.ids[1, 2:].tolist() == [-7, -8]  # each padding slot a group of its own
    aligned = pack_layout(keep, 6, length=4, align_images=True)
    assert aligned.slots.tolist() == [0, 1, 2, 3, 4, 5]  # image 1 starts the second container
    aligned = pack_layout(keep.flip(0), 6, length=4, align_images=True)
    assert aligned.slots.tolist() == [0, 1, 4, 5, 6, 7] and aligned.shape == (2, 4)


def test_pack_then_unpack_is_the_identity_and_order_and_groups_are_followed():
    torch.manual_seed(0)
    keep = _two_image_keep()
    x = torch.randn(2, 6, 3)
    order = torch.tensor([5, 4, 3, 2, 1, 0]).repeat(2, 1)  # pack order: the map reversed
    groups = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 1, 0]])
    packing = pack_layout(keep, 6, length=4, order=order, groups=groups)
    packed = pack_tokens(x, packing)
    assert torch.equal(packed[0, 0], x[0, 5])  # the first kept in pack order is map row 5
    assert torch.equal(packed[1, 2:], torch.zeros(2, 3))
    assert torch.equal(unpack_tokens(x, packing, packed), x)
    doubled = unpack_tokens(x, packing, packed, add=True)
    kept_rows = torch.zeros(2, 6, dtype=torch.bool)
    kept_rows.view(-1)[packing.rows] = True
    assert torch.equal(doubled[kept_rows], 2 * x[kept_rows]) and torch.equal(doubled[~kept_rows], x[~kept_rows])
    allowed = block_diagonal_mask(packing.ids)
    # container 0: image 0's tokens at map rows 5, 3 (group 1 at members 2, 3 -> rows 3, 2)
    assert packing.ids[0].tolist() == [0, 1, 1, 0]
    assert allowed[0].tolist() == [[a == b for b in [0, 1, 1, 0]] for a in [0, 1, 1, 0]]
    assert not allowed[1, :2, 2:].any() and allowed[1].diagonal().all()  # padding: only itself
    assert not allowed[1, 2, 3] and packing.images.tolist() == [0, 0, 0, 0, 1, 1]


def test_binary_concrete_selects_by_threshold_in_evaluation_and_passes_gradients_in_training():
    logits = torch.tensor([-6.0, -4.0, 0.0, 3.0])
    assert binary_concrete(logits, training=False).tolist() == [0.0, 1.0, 1.0, 1.0]  # sigmoid > 0.01
    torch.manual_seed(0)
    logits = torch.zeros(20000, requires_grad=True)
    picked = binary_concrete(logits, training=True)
    assert set(picked.unique().tolist()) <= {0.0, 1.0}
    # P(selected) = P(sigmoid(logit + noise) > 0.01) = sigmoid(logit + 4.595)
    assert picked.mean().item() == pytest.approx(torch.sigmoid(torch.tensor(4.595)).item(), abs=0.01)
    picked.sum().backward()
    assert (logits.grad > 0).all()
