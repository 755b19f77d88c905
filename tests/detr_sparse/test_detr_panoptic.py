import pytest
import torch

from detr_sparse import build_model
from detr_sparse.detr import DETR
from detr_sparse.heads.detr_panoptic import AttentionMaps, MaskHead
from detr_sparse.postprocess import panoptic_segments, postprocess_panoptic
from engine.config import load_config
from helpers import TINY_DEFORMABLE, TINY_MODEL, two_image_batch


def test_attention_maps_ignore_padding_and_sum_to_one():
    torch.manual_seed(0)
    attn = AttentionMaps(16, 16, heads=2)
    memory = torch.randn(2, 16, 4, 6)
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, :, 4:] = True
    query = torch.randn(2, 3, 16)
    maps = attn(query, memory, mask)
    assert maps.shape == (2, 3, 2, 4, 6)
    assert (maps[1, ..., 4:] == 0).all()
    # DETR's MHAttentionMap: one softmax over heads x H x W, the heads share one unit of mass
    torch.testing.assert_close(maps.sum((-3, -2, -1)), torch.ones(2, 3))
    assert (maps.sum((-2, -1)) < 0.999).all()
    # a padded image gives what it gives alone
    alone = attn(query[1:], memory[1:, :, :, :4], mask[1:, :, :4])
    torch.testing.assert_close(alone[0], maps[1, ..., :4])


def test_panoptic_head_initialised_as_detr():
    attn = AttentionMaps(64, 64, heads=8)
    for linear in (attn.q, attn.k):  # xavier_uniform, zero bias
        bound = (6 / (64 + 64)) ** 0.5
        assert 0.9 * bound < linear.weight.abs().max() <= bound and (linear.bias == 0).all()
    head = MaskHead(dim=64, heads=8, fpn_channels=[24, 12])
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:  # kaiming_uniform with a=1: bound sqrt(3 / fan_in), zero bias
        bound = (3 / (conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])) ** 0.5
        assert 0.9 * bound < conv.weight.abs().max() <= bound and (conv.bias == 0).all()


def test_mask_head_upsamples_through_the_fpn_levels_per_query():
    torch.manual_seed(0)
    head = MaskHead(dim=32, heads=2, fpn_channels=[24, 12, 8])
    features = torch.randn(2, 32, 4, 6)
    maps = torch.rand(2, 5, 2, 4, 6)
    fpn = [torch.randn(2, 24, 8, 12), torch.randn(2, 12, 16, 24), torch.randn(2, 8, 32, 48)]
    masks = head(features, maps, fpn)
    assert masks.shape == (2, 5, 32, 48)
    # each query's mask depends on its own attention maps only
    other = maps.clone()
    other[:, 1] = torch.rand(2, 2, 4, 6)
    changed = head(features, other, fpn)
    torch.testing.assert_close(changed[:, 0], masks[:, 0])
    assert not torch.allclose(changed[:, 1], masks[:, 1])


# ---- post-processing -------------------------------------------------------------------------

IS_THING = [True, True, False, False]  # labels 0, 1 things; 2, 3 stuff


def _logits_winning(regions, shape=(4, 6)):
    """Mask logits (K, H, W): query k scores 10 on its region, 5 on its second-choice
    region (if any), 0 elsewhere."""
    out = torch.zeros(len(regions), *shape)
    for k, (first, second) in enumerate(regions):
        out[k][second] = 5.0
        out[k][first] = 10.0
    return out


def test_panoptic_merge_joins_stuff_queries_and_drops_small_segments():
    def c(a, b):  # columns a..b-1
        return slice(None), slice(a, b)

    regions = [(c(0, 2), c(0, 0)),   # thing label 0: columns 0-1 (8 px)
               (c(2, 4), c(5, 6)),   # stuff label 2: columns 2-3, second choice column 5
               (c(4, 5), c(0, 0)),   # stuff label 2 again: column 4, merged with the query above
               ((slice(0, 1), slice(5, 6)), c(0, 0))]  # thing label 1: 1 px, dropped
    logits = _logits_winning(regions)
    logits[3][:, 5] = 7.0  # query 3 wins all of column 5 (4 px) over query 1's second choice
    id_map, segments = panoptic_segments(logits, torch.tensor([0, 2, 2, 1]), IS_THING)
    # query 3 owns column 5 (4 px <= 4): dropped, its pixels go to query 1's stuff segment
    assert [(s["label"], s["isthing"], s["area"]) for s in segments] == [(0, True, 8), (2, False, 16)]
    assert (id_map[:, :2] == 1).all() and (id_map[:, 2:] == 2).all()


def test_panoptic_merge_without_queries_is_empty():
    id_map, segments = panoptic_segments(torch.zeros(0, 3, 5), torch.zeros(0, dtype=torch.long), IS_THING)
    assert id_map.shape == (3, 5) and (id_map == 0).all() and segments == []


def test_postprocess_keeps_confident_queries_and_crops_to_each_image():
    # 2 images padded to 8x8, masks at stride 2 (4x4); 3 queries, 4 classes + no-object
    logits = torch.full((2, 3, 5), -10.0)
    logits[:, 0, 0] = 10.0  # confident thing
    logits[:, 1, 2] = 10.0  # confident stuff
    logits[:, 2, 4] = 10.0  # no-object
    masks = torch.zeros(2, 3, 4, 4)
    masks[:, 0, :, :2] = 10.0
    masks[:, 1, :, 2:] = 10.0
    masks[:, 2] = 20.0  # would win everywhere, but is no-object
    out = postprocess_panoptic({"pred_logits": logits, "pred_masks": masks},
                               torch.tensor([[8, 8], [6, 5]]), (8, 8), torch.tensor(IS_THING), 0.85)
    assert out[0]["panoptic"].shape == (8, 8) and out[1]["panoptic"].shape == (6, 5)
    assert [s["label"] for s in out[0]["segments_info"]] == [0, 2]
    assert (out[0]["panoptic"][:, :4] == 1).all() and (out[0]["panoptic"][:, 4:] == 2).all()
    assert [s["area"] for s in out[1]["segments_info"]] == [24, 6]
    logits[1, :2, :4] = 0.0  # image 1: no confident query left
    out = postprocess_panoptic({"pred_logits": logits, "pred_masks": masks},
                               torch.tensor([[8, 8], [6, 5]]), (8, 8), torch.tensor(IS_THING), 0.85)
    assert out[1]["segments_info"] == [] and (out[1]["panoptic"] == 0).all()


# ---- mask losses -----------------------------------------------------------------------------

def _criterion():
    from detr_sparse.criterion import SetCriterion
    from detr_sparse.matcher import HungarianMatcher
    return SetCriterion(3, HungarianMatcher())


def test_mask_losses_vanish_on_perfect_masks_and_reach_only_matched_queries():
    masks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    masks[0, 0, :2] = True
    masks[0, 1, 2:] = True
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.25, 1.0, 0.5], [0.5, 0.75, 1.0, 0.5]]),
                "masks": masks[0]}]
    crit = _criterion()
    indices = [(torch.tensor([2, 0]), torch.tensor([0, 1]))]  # queries 2 and 0 matched
    perfect = torch.full((1, 3, 2, 2), -30.0)
    perfect[0, 2, 0], perfect[0, 0, 1] = 30.0, 30.0  # stride 2: upsampled to the 4x4 targets
    losses = crit.loss_masks(perfect, targets, indices, num_boxes=2)
    assert losses["loss_mask"] < 1e-6 and losses["loss_dice"] < 1e-3
    swapped = crit.loss_masks(perfect, targets, [(torch.tensor([0, 2]), torch.tensor([0, 1]))], num_boxes=2)
    assert swapped["loss_dice"] > 0.9 and swapped["loss_mask"] > 1.0
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    sum(crit.loss_masks(logits, targets, indices, num_boxes=2).values()).backward()
    assert (logits.grad[0, 1] == 0).all() and (logits.grad[0, [0, 2]] != 0).all()
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4), "masks": masks[0, :0]}]
    no_match = crit.loss_masks(logits, empty, [(torch.zeros(0, dtype=torch.long),) * 2], num_boxes=1)
    assert no_match["loss_mask"] == 0 and no_match["loss_mask"].requires_grad


# ---- DETR and PnP-DETR with the panoptic branch ----------------------------------------------

PANOPTIC = ["model.backbone.out_features=[res2,res3,res4,res5]", "model.panoptic.enabled=true",
            "model.panoptic.threshold=0.0"]


def _panoptic_model(name="detr", *extra):
    torch.manual_seed(0)
    opts = TINY_MODEL + PANOPTIC + [f"model.name={name}", *extra]
    return build_model(load_config(None, opts).model, 4, is_thing=IS_THING)


def _panoptic_batch():
    images, targets = two_image_batch((64, 96), (96, 64))
    for t, (h, w) in zip(targets, images.sizes.tolist()):
        t["masks"] = torch.zeros(len(t["boxes"]), h, w, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(t["masks"], t["boxes"].long().tolist()):
            mask[y0:y1, x0:x1] = True
    return images, targets


@pytest.mark.parametrize("name", ["detr", "pnp_detr"])
def test_panoptic_model_trains_its_mask_branch_and_segments_each_image_at_its_size(name):
    model = _panoptic_model(name).train()
    images, targets = _panoptic_batch()
    losses = model(images, targets)
    assert {"loss_mask", "loss_dice", "loss_ce"} <= set(losses)
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    assert all(p.grad is not None for p in model.panoptic_head.parameters())
    assert model.input_proj.weight.grad is not None  # trained jointly
    model.eval()
    with torch.no_grad():
        out = model(images)
    for o, (h, w) in zip(out, images.sizes.tolist()):
        assert o["panoptic"].shape == (h, w) and o["boxes"].shape == (8, 4)
        ids = set(o["panoptic"].unique().tolist()) - {0}
        assert ids == {s["id"] for s in o["segments_info"]} and ids  # threshold 0: segments


def test_frozen_detector_leaves_only_the_mask_branch_to_train():
    model = _panoptic_model("pnp_detr", "model.panoptic.freeze_detector=true").train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("panoptic_head.") for n in trainable)
    losses = model(*_panoptic_batch())
    assert not losses["loss_ce"].requires_grad and losses["loss_mask"].requires_grad


def test_pnp_memory_map_at_full_ratio_puts_each_token_back_in_place():
    model = _panoptic_model("pnp_detr", "model.pnp.poll_ratio=1.0", "model.pnp.num_coarse=0").eval()
    src, pos = torch.randn(2, 64, 3, 5), torch.randn(2, 64, 3, 5)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[1, :, 4:] = True
    with torch.no_grad():
        _, memory, extra = model.run_transformer(src, mask, pos)
        mapped = model.memory_map(memory, extra, src.shape)  # (B, C, 3, 5)
    # every valid token is polled, in map order: image 0 is DETR's layout, image 1 its 12
    # valid tokens in order (the padded fine slots come last)
    torch.testing.assert_close(mapped[:1], DETR.memory_map(model, memory[:1], {}, (1, 64, 3, 5)))
    valid = mapped[1].flatten(1)[:, ~mask[1].flatten()].T
    torch.testing.assert_close(valid, memory[1, :12])


def test_panoptic_needs_finer_maps_a_panoptic_dataset_and_a_detr_model():
    with pytest.raises(ValueError, match="out_features"):
        build_model(load_config(None, TINY_MODEL + ["model.panoptic.enabled=true"]).model, 4, IS_THING)
    with pytest.raises(ValueError, match="data.panoptic"):
        build_model(load_config(None, TINY_MODEL + PANOPTIC).model, 4)
    with pytest.raises(ValueError, match="detr and pnp_detr"):
        build_model(load_config(None, TINY_DEFORMABLE + PANOPTIC).model, 4, IS_THING)
