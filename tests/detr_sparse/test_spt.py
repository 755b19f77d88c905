import pytest
import torch

from detr_sparse.backbones import build_backbone
from detr_sparse.backbones.spt import SPT_MODELS, SPTBackbone
from detr_sparse.backbones.swin import SwinBackbone
from detr_sparse.sparsity.spa import selection_labels, window_order
from engine.config import BackboneConfig


def _select_everything(spt: SPTBackbone) -> None:
    """Gates that select every token with sigmoid(score) = 1 (to float precision)."""
    for gate in [spt.gate0] + [b.gate for s in (5, 7) for b in spt.features[s]]:
        torch.nn.init.zeros_(gate.weight)
        torch.nn.init.constant_(gate.bias, 30.0)


@pytest.fixture
def mini16(monkeypatch):
    """swin_mini with 2 extra stage-3 blocks (as SPT-T/16 adds 4 to Swin-T)."""
    monkeypatch.setitem(SPT_MODELS, "spt_mini16", ("swin_mini", 2))
    return "spt_mini16"


def test_every_token_selected_and_images_packed_apart_is_swin_and_extra_blocks_start_as_identities(mini16, tmp_path):
    torch.manual_seed(0)
    swin = SwinBackbone("swin_mini", ("res2", "res3", "res4", "res5"), drop_path_rate=0.0).eval()
    torch.save({k: v for k, v in swin.state_dict().items() if k.startswith("features.")}, tmp_path / "swin.pth")
    spt = SPTBackbone(mini16, pretrained=str(tmp_path / "swin.pth"), drop_path_rate=0.0).eval()
    spt.norms.load_state_dict(swin.norms.state_dict())
    assert len(spt.features[5]) == 6 and spt.fresh("features.5.5.attn.qkv.weight")
    assert not spt.fresh("features.5.3.attn.qkv.weight") and spt.fresh("features.5.0.gate.weight")
    _select_everything(spt)
    x = torch.randn(2, 3, 224, 224)  # maps of 56, 28, 14, 7: whole windows, stage 3 shifted
    with torch.no_grad():
        dense, sparse = swin(x), spt(x)
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], atol=1e-5, rtol=1e-5)
    assert all(bool(p.all()) for _, _, p in spt.record if p is not None)


def test_extra_blocks_get_swins_initialisation_with_zero_residual_outputs(mini16):
    torch.manual_seed(0)
    extra = SPTBackbone(mini16).features[5][4]
    assert abs(float(extra.attn.qkv.weight.std()) - 0.02) < 0.003 and not extra.attn.qkv.bias.any()
    assert abs(float(extra.mlp[0].weight.std()) - 0.02) < 0.003
    assert not extra.attn.proj.weight.any() and not extra.mlp[3].weight.any()


def test_one_gate_per_stage_selects_once_for_all_its_blocks():
    torch.manual_seed(0)
    spt = SPTBackbone("spt_mini", drop_path_rate=0.0, gate_per="stage").train()
    gated = [[hasattr(b, "gate") for b in spt.features[s]] for s in (5, 7)]
    assert gated == [[True, False, False, False], [True, False]]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 120.0, 100.0]])}]
    maps, stats = spt.forward_with_losses(torch.randn(1, 3, 160, 192), targets)
    for stage in (2, 3):  # one relaxed sample per stage: every block of it used the same selection
        picks = [p for s, _, p in spt.record if s == stage]
        assert len(picks) == len(spt.features[2 * stage + 1]) and all(p is picks[0] for p in picks)
    assert len({id(score) for _, score, _ in spt.record}) == 3  # the loss's terms: gate 0 and the two stages'
    (stats["loss_select"] + sum(m.square().mean() for m in maps.values())).backward()
    assert spt.features[5][0].gate.weight.grad.abs().sum() > 0 and spt.features[7][0].gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="gate_per: 'layer' is not block or stage"):
        SPTBackbone("spt_mini", gate_per="layer")


def _pair_batch():
    torch.manual_seed(1)
    spt = SPTBackbone("spt_mini", drop_path_rate=0.0).eval()
    torch.nn.init.constant_(spt.gate0.bias, -30.0)  # the blocks' gates select some tokens, the first none
    for gate in [b.gate for s in (5, 7) for b in spt.features[s]]:
        torch.nn.init.normal_(gate.weight, std=0.5)
        torch.nn.init.constant_(gate.bias, -8.0)
    images = [torch.randn(3, 250, 300), torch.randn(3, 180, 236)]
    batch = torch.zeros(2, 3, 250, 300)
    batch[0] = images[0]
    batch[1, :, :180, :236] = images[1]
    return spt, images, batch


def test_a_padded_batch_equals_each_image_alone_padding_is_never_selected_and_evaluation_is_deterministic():
    spt, images, batch = _pair_batch()
    sizes = [(250, 300), (180, 236)]
    with torch.no_grad():
        together = spt(batch, sizes)
        record = [(s, p) for s, _, p in spt.record if p is not None]
        again = spt(batch, sizes)
        alone = [spt(img[None]) for img in images]
    shares = [float(p[0].mean()) for _, p in record]
    assert 0.05 < min(shares) and max(shares) < 0.95  # some tokens selected, not all
    for stage, picked in record:
        assert not picked[spt.valid[stage] == 0].any()  # the second image's padding
    for name in together:
        assert torch.equal(together[name], again[name])
        for i, out in enumerate(alone):
            h, w = out[name].shape[-2:]
            torch.testing.assert_close(together[name][i, :, :h, :w], out[name][0], atol=1e-4, rtol=1e-4)


def test_images_packed_end_to_end_never_attend_to_each_other():
    spt, _, batch = _pair_batch()
    spt.align_images_eval = False  # the paper's packing: containers shared by the images
    sizes = [(250, 300), (180, 236)]
    with torch.no_grad():
        first = spt(batch, sizes)
        batch[1] = torch.randn_like(batch[1])
        second = spt(batch, sizes)
    for name in first:
        assert torch.equal(first[name][0], second[name][0])


def test_training_selects_by_the_relaxed_sample_and_every_gate_gets_a_gradient():
    spt, _, batch = _pair_batch()
    spt.train()
    targets = [{"boxes": torch.tensor([[40.0, 40.0, 200.0, 180.0]])}, {"boxes": torch.zeros(0, 4)}]
    maps, stats = spt.forward_with_losses(batch, targets, [(250, 300), (180, 236)])
    assert set(stats) == {"loss_select", "spt_select_res4", "spt_select_res5", "spt_object_selected",
                          "spt_background_selected"}
    for stage, _, picked in spt.record[1:]:
        assert not picked[spt.valid[stage] == 0].any()
    (stats["loss_select"] + sum(m.square().mean() for m in maps.values())).backward()
    for block in [spt.features[5][0], spt.features[7][1]]:
        assert block.gate.weight.grad.abs().sum() > 0 and block.attn.qkv.weight.grad.abs().sum() > 0
    assert spt.gate0.weight.grad.abs().sum() > 0


def test_a_training_step_lowers_the_loss():
    spt, _, batch = _pair_batch()
    spt.train()
    targets = [{"boxes": torch.tensor([[40.0, 40.0, 200.0, 180.0]])}, {"boxes": torch.tensor([[0.0, 0.0, 50.0, 60.0]])}]
    optimizer = torch.optim.SGD(spt.parameters(), lr=1e-3)

    def loss():
        torch.manual_seed(7)  # the same relaxed samples both times
        maps, stats = spt.forward_with_losses(batch, targets, [(250, 300), (180, 236)])
        return 100 * stats["loss_select"] + sum(m.square().mean() for m in maps.values())

    first = loss()
    first.backward()
    optimizer.step()
    with torch.no_grad():
        assert loss() < first


def test_labels_mark_the_cells_a_box_overlaps_at_each_stride():
    target = {"boxes": torch.tensor([[10.0, 20.0, 100.0, 120.0]]), "masks": torch.zeros(1, 128, 160, dtype=torch.bool)}
    target["masks"][0, 40:50, 33:34] = True
    at16 = selection_labels([target], (8, 10), 16)[0]
    assert at16.nonzero()[:, 0].unique().tolist() == list(range(1, 8))  # rows 16..128 overlap 20..120
    assert at16.nonzero()[:, 1].unique().tolist() == list(range(0, 7))  # columns 0..112 overlap 10..100
    assert at16.sum() == 7 * 7
    at32 = selection_labels([target], (4, 5), 32)[0]
    assert at32.sum() == 4 * 4 and at32[:, 4].sum() == 0
    from_masks = selection_labels([target], (8, 10), 16, from_masks=True)[0]
    assert from_masks.nonzero().tolist() == [[2, 2], [3, 2]]  # rows 40..49 span cells 2 and 3, column 33 cell 2


def test_window_order_follows_swin_with_its_shift_and_regions():
    rows, coords, region = window_order(9, 10, 7, 0)
    assert rows[:7].tolist() == list(range(7)) and rows[7:14].tolist() == list(range(10, 17))
    assert len(rows) == 90 and (region == 0).all()
    rows, coords, region = window_order(9, 10, 7, 3)
    # rolled by 3: the first window starts at token (3, 3); the wrapped rows/columns form regions of their own
    assert rows[0] == 3 * 10 + 3 and tuple(coords[0].tolist()) == (0, 0)
    # the real tokens' regions: the wrapped rows / columns (2) and the rest (0); 1 is all padding
    assert region.unique().tolist() == [0, 2, 6, 8]
    rows, _, region = window_order(5, 6, 7, 3)  # one window covers the map: no shift, as torchvision
    assert rows.tolist() == list(range(30)) and (region == 0).all()


def test_forced_selection_keeps_its_share_and_the_builder_reads_the_config():
    cfg = BackboneConfig(name="spt_mini")
    cfg.spt.label_from, cfg.spt.region_mask = "masks", False
    spt = build_backbone(cfg, ("res2", "res3", "res4", "res5")).eval()
    assert spt.from_masks and not spt.region_mask
    spt.forced = 0.25
    with torch.no_grad():
        spt(torch.randn(1, 3, 224, 224))
    shares = [float(p.mean()) for _, _, p in spt.record[1:]]
    assert shares == pytest.approx([(int(196 * 0.25) + 1) / 196] * 4 + [(int(49 * 0.25) + 1) / 49] * 2)
    with pytest.raises(ValueError, match="label_from"):
        SPTBackbone("spt_mini", label_from="points")


def test_flex_attention_gives_what_sdpa_gives(monkeypatch):
    import detr_sparse.sparsity.spa as spa

    monkeypatch.setattr(spa, "FLEX_COMPILED", False)  # the reference form: no compilation in a test
    monkeypatch.setattr(spa, "_flex", None)
    spt, _, batch = _pair_batch()
    sizes = [(250, 300), (180, 236)]
    with torch.no_grad():
        sdpa = spt(batch, sizes)
        spt.attention = "flex"
        flex = spt(batch, sizes)
    for name in sdpa:
        torch.testing.assert_close(flex[name], sdpa[name], atol=1e-5, rtol=1e-5)


def test_a_mask_rcnn_on_spt_learns_selection_from_its_instance_boxes():
    from detr_sparse import build_model
    from detr_sparse.image_batch import ImageBatch
    from engine.config import load_config

    torch.manual_seed(0)
    model = build_model(load_config(None, [
        "model.name=mask_rcnn", "model.backbone.name=spt_mini", "model.backbone.out_features=[res2,res3,res4,res5]",
        "model.rcnn.fpn_channels=32", "model.rcnn.box_head_dim=64", "model.rcnn.mask_head_dim=16"]).model, 3).train()
    images = ImageBatch.from_images([torch.randn(3, 96, 128), torch.randn(3, 120, 80)])
    targets = []
    for (h, w), box in zip(images.sizes.tolist(), ([8.0, 8.0, 60.0, 40.0], [10.0, 50.0, 70.0, 110.0])):
        masks = torch.zeros(1, h, w, dtype=torch.bool)
        masks[0, int(box[1]):int(box[3]), int(box[0]):int(box[2])] = True
        targets.append({"boxes": torch.tensor([box]), "labels": torch.tensor([1]), "masks": masks,
                        "iscrowd": torch.tensor([0])})
    losses = model(images, targets)
    assert {"loss_select", "spt_select_res4", "spt_object_selected", "loss_mask"} <= set(losses)
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    assert model.backbone.features[5][0].gate.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.eval()(images)
    assert model.backbone.selection_usage().shape == (2, 8, 8)  # the padded batch's stride-16 grid


def test_a_block_that_selects_nothing_passes_every_token_through_the_ffn_only():
    spt, _, batch = _pair_batch()
    spt.train()
    for gate in [spt.gate0] + [b.gate for s in (5, 7) for b in spt.features[s]]:
        torch.nn.init.zeros_(gate.weight)
        torch.nn.init.constant_(gate.bias, -1e3)  # never above the threshold
    maps, stats = spt.forward_with_losses(batch, [{"boxes": torch.zeros(0, 4)}] * 2, [(250, 300), (180, 236)])
    assert stats["spt_select_res4"] == 0 and all(torch.isfinite(m).all() for m in maps.values())
    sum(m.sum() for m in maps.values()).backward()
    qkv = spt.features[5][0].attn.qkv.weight
    assert qkv.grad is not None and not qkv.grad.any()  # in the graph, with a zero gradient
