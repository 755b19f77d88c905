import torch

from engine.visualize import (draw_detections, draw_panoptic, overlay, side_by_side, sparsity_panels,
                              token_heatmap)

# two levels over an 8x8 padded batch: 4x4 tokens (stride 2) then 2x2 (stride 4)
SHAPES = torch.tensor([[4, 4], [2, 2]])
STARTS = torch.tensor([0, 16])


def _valid():
    """A 6x6 image in the 8x8 batch: level 0 has its last row and column padded."""
    valid = torch.ones(20, dtype=torch.bool)
    level0 = valid[:16].view(4, 4)
    level0[3, :] = False
    level0[:, 3] = False
    return valid


def test_a_kept_token_lights_its_block_at_both_resolutions_cropped_to_the_image():
    values = torch.zeros(20)
    values[0 + 1 * 4 + 2] = 1.0  # level 0, row 1, column 2: pixels rows 2-3, columns 4-5
    values[16 + 0 * 2 + 1] = 1.0  # level 1, row 0, column 1: pixels rows 0-3, columns 4-7
    heat = token_heatmap(values, SHAPES, STARTS, _valid(), (6, 6), (8, 8))
    expected = torch.zeros(6, 6)
    expected[0:4, 4:6] = 0.5  # level 1 only
    expected[2:4, 4:6] = 1.0  # both levels
    assert heat.shape == (6, 6) and heat.dtype == torch.float32
    assert torch.equal(heat, expected)


def test_levels_are_normalised_apart_and_padded_tokens_ignored():
    values = torch.zeros(20)
    values[0] = 0.25  # level 0, row 0, column 0 -> 1 after its level's normalisation
    values[16 + 3] = 40.0  # level 1, row 1, column 1 -> 1 as well
    values[0 + 2 * 4 + 3] = 1000.0  # a padded level-0 token (cropped away anyway)
    values[0 + 1 * 4 + 1] = 1000.0  # a token marked as padding inside the image: ignored too
    valid = _valid()
    valid[0 + 1 * 4 + 1] = False
    heat = token_heatmap(values, SHAPES, STARTS, valid, (6, 6), (8, 8))
    assert heat[0, 0] == 0.5 and heat[5, 5] == 0.5 and heat[0, 5] == 0
    assert heat.max() == 0.5 and heat.min() == 0  # the padded tokens do not count
    # an empty map stays zero rather than dividing by zero
    assert torch.equal(token_heatmap(torch.zeros(20), SHAPES, STARTS, _valid(), (6, 6), (8, 8)),
                       torch.zeros(6, 6))


def test_overlay_keeps_shape_and_dtype_and_tints_only_where_hot():
    image = torch.full((3, 5, 7), 100, dtype=torch.uint8)
    heat = torch.zeros(5, 7)
    heat[2, 3] = 1.0
    out = overlay(image, heat, color=(255, 0, 0), alpha=0.5)
    assert out.shape == image.shape and out.dtype == torch.uint8
    assert out[:, 2, 3].tolist() == [178, 50, 50]  # halfway to red (rounded)
    out[:, 2, 3] = 100
    assert torch.equal(out, image)


def test_panels_are_two_images_wide_with_a_gap():
    image = torch.randint(0, 256, (3, 6, 6), dtype=torch.uint8)
    kept = torch.zeros(20, dtype=torch.bool)
    kept[5] = True
    panels = sparsity_panels(image, {"kept": kept, "DAM": torch.rand(20)}, SHAPES, STARTS, _valid(), (8, 8))
    assert panels.dtype == torch.uint8 and panels.shape == (3, 6, 2 * 6 + 4)
    assert (panels[:, :, 6:10] == 255).all()  # the white gap
    assert side_by_side([image, image, image], gap=2).shape == (3, 6, 3 * 6 + 2 * 2)


def test_trainer_evaluation_logs_sparsity_pictures(tiny_coco, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.config import load_config
    from engine.distributed import DistInfo
    from engine.logger import setup_logging
    from engine.trainer import Trainer
    from helpers import TINY_DEFORMABLE, tiny_overrides

    opts = tiny_overrides(tiny_coco, tmp_path) + TINY_DEFORMABLE + [
        "model.name=sparse_detr", "model.two_stage=true", "model.with_box_refine=true",
        "model.sparse.rho=0.3", "train.epochs=1", "train.max_iters=2", "eval.num_vis_images=3"]
    setup_logging(tmp_path, True)
    trainer = Trainer(load_config(None, opts), DistInfo())
    trainer.train()
    trainer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["images"])
    assert {"val/prediction_0", "val/sparsity_0", "val/sparsity_2"} <= tags
    assert "val/sparsity_3" not in tags  # 3 asked for, 4 val images
    first = events.Images("val/sparsity_0")[-1]
    prediction = events.Images("val/prediction_0")[-1]
    assert first.height == prediction.height and first.width == 2 * prediction.width + 4



def test_grain_panel_tints_each_region_by_its_granularity_and_leaves_padding():
    from engine.visualize import GRAIN_COLORS, grain_panel

    image = torch.full((3, 20, 30), 100, dtype=torch.uint8)
    choice = torch.tensor([[0, 2], [1, -1]])  # regions of 16 px; the image covers 2 x 2 of them partly
    panel = grain_panel(image, choice, 16, alpha=1.0)
    assert panel.shape == image.shape
    assert panel[:, 5, 5].tolist() == list(GRAIN_COLORS[0])
    assert panel[:, 5, 20].tolist() == list(GRAIN_COLORS[2])
    assert panel[:, 18, 5].tolist() == list(GRAIN_COLORS[1])
    assert panel[:, 18, 20].tolist() == [100, 100, 100]  # a padding region stays as it is
    assert panel[:, 16, 5].tolist() == [255, 255, 255]  # the grid line between regions


def test_usage_panel_tints_each_patch_by_its_share_of_the_gated_blocks():
    from engine.visualize import MAP_COLORS, usage_panel

    image = torch.zeros((3, 20, 30), dtype=torch.uint8)
    usage = torch.tensor([[4, 0], [2, -1]])  # patches of 16 px, 4 gated blocks
    panel = usage_panel(image, usage, 16, blocks=4, alpha=1.0)
    assert panel.shape == image.shape
    assert panel[:, 5, 5].tolist() == list(MAP_COLORS[0])  # through every gated block
    assert panel[:, 5, 20].tolist() == [0, 0, 0]  # through none
    assert panel[:, 18, 5].tolist() == [round(c / 2) for c in MAP_COLORS[0]]
    assert panel[:, 18, 20].tolist() == [0, 0, 0]  # outside the image


def test_detections_draw_their_masks_and_a_panoptic_map_its_segments():
    image = torch.full((3, 20, 30), 100, dtype=torch.uint8)
    masks = torch.zeros(2, 1, 20, 30)
    masks[0, 0, 12:18, 2:8] = 0.9  # a kept detection's mask, away from the boxes
    masks[1, 0, 12:18, 20:28] = 0.9  # below the threshold: not drawn
    prediction = {"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0], [15.0, 1.0, 25.0, 9.0]]),
                  "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([0, 1]), "masks": masks}
    drawn = draw_detections(image, prediction, ["a", "b"], threshold=0.5)
    without = draw_detections(image, {k: v for k, v in prediction.items() if k != "masks"}, ["a", "b"], threshold=0.5)
    changed = (drawn != without).any(0)
    assert changed[12:18, 2:8].all() and changed.sum() == 6 * 6  # the kept detection's mask only
    id_map = torch.zeros(20, 30, dtype=torch.int64)
    id_map[:, 15:] = 4
    segments = draw_panoptic(image, id_map)
    assert (segments[:, :, :15] == 100).all() and (segments[:, :, 15:] != 100).any()
    assert torch.equal(draw_panoptic(image, torch.zeros_like(id_map)), image)


def test_a_backbones_pictures_reuse_the_pass_just_made_on_the_same_images():
    from detr_sparse import build_model
    from detr_sparse.image_batch import ImageBatch
    from engine.config import load_config
    import helpers
    from engine.visualize import sparsity_pictures

    cfg = load_config(helpers.REPO / "configs/mask_rcnn_deit_s.yaml", [
        "model.backbone.name=deit_t_svit", "model.rcnn.box_head_dim=64", "model.rcnn.mask_head_dim=16",
        "model.rcnn.rpn_post_nms_top_n_test=50"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3).eval()
    images = ImageBatch.from_images([torch.randn(3, 64, 96), torch.randn(3, 80, 64)])
    calls = []
    model.backbone.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(images)
        reused = sparsity_pictures(model, images, 2, ran=True)
        assert len(calls) == 1  # no second pass
        fresh = sparsity_pictures(model, images, 2)
    assert len(calls) == 2 and all(torch.equal(a, b) for a, b in zip(reused, fresh))
