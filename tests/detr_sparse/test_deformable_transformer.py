import math

import torch
from torch import nn

from detr_sparse.transformers.deformable_transformer import (
    DeformableTransformer, encoder_proposals, encoder_reference_points, inverse_sigmoid,
    proposal_pos_embed, refine_boxes, valid_ratios)


def _padded_masks():
    """Two levels (4, 6) and (2, 3); image 1 is padded on the right to 4/6 of the width."""
    masks = [torch.zeros(2, 4, 6, dtype=torch.bool), torch.zeros(2, 2, 3, dtype=torch.bool)]
    masks[0][1, :, 4:] = True
    masks[1][1, :, 2:] = True
    return masks


def _valid_tokens(shapes, valid_shapes):
    """Flat indices, in the padded layout, of the valid tokens of every level, in the order
    of the unpadded layout."""
    index, start = [], 0
    for (h, w), (vh, vw) in zip(shapes, valid_shapes):
        grid = torch.arange(h * w).view(h, w)[:vh, :vw]
        index.append(start + grid.flatten())
        start += h * w
    return torch.cat(index)


def test_valid_ratios_and_encoder_reference_points_of_a_padded_batch():
    masks = _padded_masks()
    ratios = valid_ratios(masks)
    assert torch.allclose(ratios[0], torch.ones(2, 2))
    assert torch.allclose(ratios[1], torch.tensor([[4 / 6, 1.0], [2 / 3, 1.0]]))
    shapes = [(4, 6), (2, 3)]
    ref = encoder_reference_points(shapes, ratios)
    assert ref.shape == (2, 24 + 6, 2, 2)
    valid = _valid_tokens(shapes, [(4, 4), (2, 2)])
    # scaled back by each level's ratio, the padded image's references are normalised to its
    # valid region and equal those of the image run alone
    back = ref[1, valid] / ratios[1][None]
    assert ((back > 0) & (back < 1)).all()
    alone = encoder_reference_points([(4, 4), (2, 2)], torch.ones(1, 2, 2))[0]
    assert torch.allclose(back, alone, atol=1e-6)
    # the first token of level 0 in level 1's padded coordinates: (0.5 / 4) * (2 / 3)
    assert math.isclose(ref[1, 0, 1, 0].item(), 0.125 * 2 / 3, rel_tol=1e-5)


def test_encoder_proposals_are_inf_at_padding_and_inside_the_valid_region():
    masks = _padded_masks()
    mask = torch.cat([m.flatten(1) for m in masks], 1)
    logits, valid = encoder_proposals(mask, [(4, 6), (2, 3)])
    assert logits.shape == (2, 30, 4)
    assert torch.isinf(logits[mask]).all() and (logits[mask] > 0).all()
    assert not valid[mask].any() and valid[~mask].all()
    boxes = logits[~mask].sigmoid()
    assert ((boxes[:, :2] > 0) & (boxes[:, :2] < 1)).all()
    # the padded image's last valid column of level 0 is centred at 3.5 / 4 of its width
    assert torch.allclose(logits[1, 3].sigmoid(), torch.tensor([3.5 / 4, 0.5 / 4, 0.05, 0.05]), atol=1e-5)
    assert torch.allclose(logits[0, 24].sigmoid()[2:], torch.tensor([0.1, 0.1]), atol=1e-5)


def test_proposals_at_the_border_of_a_large_map_are_invalid():
    logits, valid = encoder_proposals(torch.zeros(1, 60 * 60, dtype=torch.bool), [(60, 60)])
    # centre 0.5 / 60 < 0.01: no proposal for the first token
    assert not valid[0, 0] and torch.isinf(logits[0, 0]).all() and valid[0, 61]


def test_proposal_pos_embed_interleaves_sin_and_cos_per_coordinate():
    box = torch.tensor([[[0.0, 1.0, -1.0, 2.0]]])
    pos = proposal_pos_embed(box, 8)
    assert pos.shape == (1, 1, 32)
    angle = box.sigmoid() * 2 * math.pi
    assert torch.allclose(pos[0, 0, 0::8], angle[0, 0].sin(), atol=1e-6)
    assert torch.allclose(pos[0, 0, 1::8], angle[0, 0].cos(), atol=1e-6)
    # the next frequency pair is divided by temperature ** (2 / 8)
    assert torch.allclose(pos[0, 0, 2::8], (angle[0, 0] / 10000 ** 0.25).sin(), atol=1e-6)


def test_refine_boxes_and_inverse_sigmoid():
    ref = torch.tensor([[0.3, 0.6, 0.2, 0.1]])
    assert torch.allclose(refine_boxes(torch.zeros(1, 4), ref), ref, atol=1e-6)
    out = refine_boxes(torch.zeros(1, 4), ref[:, :2])
    assert torch.allclose(out, torch.tensor([[0.3, 0.6, 0.5, 0.5]]), atol=1e-6)
    assert torch.isfinite(inverse_sigmoid(torch.tensor([0.0, 1.0]))).all()


def _inputs(b=2, d=32, shapes=((6, 8), (3, 4))):
    torch.manual_seed(0)
    srcs = [torch.randn(b, d, h, w) for h, w in shapes]
    masks = [torch.zeros(b, h, w, dtype=torch.bool) for h, w in shapes]
    return srcs, masks, [torch.randn_like(s) for s in srcs]


def test_decoder_refines_detached_references_layer_by_layer():
    t = DeformableTransformer(32, 4, 1, 3, 64, 0.0, n_levels=2, enc_n_points=2, dec_n_points=2,
                              num_queries=5).eval()
    heads = nn.ModuleList(nn.Linear(32, 4) for _ in range(3))
    out = t(*_inputs(), query_embed=torch.randn(5, 64), box_heads=heads)
    hs, refs = out["hs"], out["references"]
    assert hs.shape == (3, 2, 5, 32) and len(refs) == 3
    assert refs[0].shape == (2, 5, 2) and refs[1].shape == refs[2].shape == (2, 5, 4)
    assert not refs[1].requires_grad
    assert torch.allclose(refs[1], refine_boxes(heads[0](hs[0]), refs[0]))
    assert torch.allclose(refs[2], refine_boxes(heads[1](hs[1]), refs[1]))
    # without refinement every layer keeps the first reference
    plain = t(*_inputs(), query_embed=torch.randn(5, 64))["references"]
    assert all(r is plain[0] for r in plain)


def test_two_stage_queries_come_from_valid_proposals():
    for query_init in ("embedding", "memory"):
        t = DeformableTransformer(32, 4, 1, 2, 64, 0.0, n_levels=2, enc_n_points=2, dec_n_points=2,
                                  two_stage=True, num_queries=6, query_init=query_init).train()
        srcs, masks, pos = _inputs()
        for m in masks:
            m[1, :, m.shape[2] // 2:] = True
        heads = (nn.Linear(32, 3), nn.Linear(32, 4))
        out = t(srcs, masks, pos, enc_heads=heads)
        assert out["enc_logits"].shape == (2, 48 + 12, 3) and out["hs"].shape == (2, 2, 6, 32)
        ref = out["references"][0]
        assert ref.shape == (2, 6, 4) and ((ref > 0) & (ref < 1)).all()
        assert torch.isinf(out["enc_boxes_unact"][out["mask"]]).all()
        with torch.no_grad():  # in eval only the selected proposals get boxes, the same ones
            evaluated = t.eval()(srcs, masks, pos, enc_heads=heads)
        assert evaluated["enc_boxes_unact"] is None
        torch.testing.assert_close(evaluated["references"][0], ref)
