import pytest
from PIL import Image

from engine.visualize import GAP
from helpers import REPO, TINY_DEFORMABLE, tiny_overrides
from tools import visualize_sparsity

SPARSE = ["model.name=sparse_detr", "model.two_stage=true", "model.with_box_refine=true",
          "model.sparse.rho=0.3"]


def _opts(tiny_coco, tmp_path, *extra):
    return ["--config", str(REPO / "configs/sparse_detr_r50.yaml"), "--out", str(tmp_path / "pictures"),
            "--opts", *tiny_overrides(tiny_coco, tmp_path), *TINY_DEFORMABLE, *SPARSE, *extra]


def test_writes_three_panel_pictures_and_prints_the_sparsity(tiny_coco, tmp_path, capsys):
    rows = visualize_sparsity.main(["--num-images", "2", *_opts(tiny_coco, tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert len(rows) == 2 and len(lines) == 2
    for i, (row, line) in enumerate(zip(rows, lines)):
        path = tmp_path / "pictures" / f"sparsity_{i}.png"
        assert row["path"] == str(path) and line.startswith(f"{path}: image ")
        assert "kept 0." in line and "DAM-referenced kept" in line
        h, w = row["size"]
        assert Image.open(path).size == (3 * w + 2 * GAP, h)  # detections | kept | DAM
        assert len(row["kept_levels"]) == len(row["dam_in_kept_levels"]) == 3
        assert abs(row["kept"] - 0.3) < 0.05  # int(valid * rho) + 1 of the valid tokens
        assert 0 <= row["dam_in_kept"] <= 1


def test_rho_override_and_a_dense_encoder_is_refused(tiny_coco, tmp_path, capsys):
    rows = visualize_sparsity.main(["--num-images", "1", "--ratio", "0.6", *_opts(tiny_coco, tmp_path)])
    assert abs(rows[0]["kept"] - 0.6) < 0.05
    with pytest.raises(SystemExit):
        visualize_sparsity.main(["--ratio", "0", *_opts(tiny_coco, tmp_path)])
    assert "dense encoder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        visualize_sparsity.main(_opts(tiny_coco, tmp_path, "model.name=deformable_detr_plus"))
    assert "no token maps" in capsys.readouterr().err


def test_pnp_detr_poll_scores_and_density(tiny_coco, tmp_path, capsys):
    opts = ["--config", str(REPO / "configs/pnp_detr_r50.yaml"), "--out", str(tmp_path / "pics"), "--opts",
            *tiny_overrides(tiny_coco, tmp_path), "model.name=pnp_detr", "model.pnp.num_coarse=2"]
    rows = visualize_sparsity.main(["--num-images", "2", "--ratio", "0.5", *opts])
    for row in rows:
        h, w = row["size"]
        assert Image.open(row["path"]).size == (3 * w + 2 * GAP, h)  # detections | scores | density
        assert abs(row["polled"] - 0.5) < 0.1
    assert "polled 0." in capsys.readouterr().out


def _mask_rcnn_rows(tiny_coco, tmp_path, capsys, config: str, *extra):
    """Two val images drawn by a tiny Mask R-CNN -> the rows and the printed lines."""
    opts = tiny_overrides(tiny_coco, tmp_path) + [
        "model.name=mask_rcnn", "model.rcnn.box_head_dim=64", "model.rcnn.mask_head_dim=16",
        "model.rcnn.rpn_post_nms_top_n_test=50", "data.masks=true", *extra]
    rows = visualize_sparsity.main(["--num-images", "2", "--config", str(REPO / "configs" / config),
                                    "--out", str(tmp_path / "pictures"), "--opts", *opts])
    return rows, capsys.readouterr().out.splitlines()


def test_a_dge_backbone_detector_draws_its_granularities(tiny_coco, tmp_path, capsys):
    rows, lines = _mask_rcnn_rows(tiny_coco, tmp_path, capsys, "mask_rcnn_pvt_s.yaml", "model.backbone.name=pvt_t_dge",
                                  "model.backbone.out_features=[res2,res3,res4,res5]", "model.rcnn.fpn_channels=32")
    assert len(rows) == 2 and all("backbone cost share" in line for line in lines)
    for i, row in enumerate(rows):
        h, w = row["size"]
        # detections | the first block of each of the 4 stages
        assert Image.open(tmp_path / "pictures" / f"sparsity_{i}.png").size == (5 * w + 4 * GAP, h)
        assert row["blocks"][0] == "stage 1 block 1" and abs(sum(row["grains"]) - 1) < 1e-6
        assert 0 < row["beta"] <= 1.05  # no query wholly in padding is computed


def test_an_svit_backbone_detector_draws_its_token_usage(tiny_coco, tmp_path, capsys):
    rows, lines = _mask_rcnn_rows(tiny_coco, tmp_path, capsys, "mask_rcnn_deit_s.yaml", "model.backbone.name=deit_t_svit")
    assert len(rows) == 2 and all("keep shares of the gated blocks" in line for line in lines)
    for i, row in enumerate(rows):
        h, w = row["size"]
        # detections | token usage
        assert Image.open(tmp_path / "pictures" / f"sparsity_{i}.png").size == (2 * w + GAP, h)
        assert len(row["keep_shares"]) == 9 and all(0 <= s <= 1 for s in row["keep_shares"])


def test_an_spt_backbone_detector_draws_its_selections(tiny_coco, tmp_path, capsys):
    rows, lines = _mask_rcnn_rows(tiny_coco, tmp_path, capsys, "mask_rcnn_spt_t12.yaml", "model.backbone.name=spt_mini",
                                  "model.rcnn.fpn_channels=32")
    assert len(rows) == 2 and all("object tokens selected" in line for line in lines)
    for i, row in enumerate(rows):
        h, w = row["size"]
        # detections | selection count
        assert Image.open(tmp_path / "pictures" / f"sparsity_{i}.png").size == (2 * w + GAP, h)
        assert 0 < row["select_res4"] <= 1 and 0 <= row["object_selected"] <= 1


def test_a_panoptic_fpn_is_built_with_its_datasets_thing_and_stuff_classes(tiny_coco, tmp_path, capsys):
    rows, lines = _mask_rcnn_rows(tiny_coco, tmp_path, capsys, "mask_rcnn_deit_s.yaml", "model.backbone.name=deit_t_svit",
                                  "model.name=panoptic_fpn", "data.panoptic=true", "data.masks=false",
                                  "model.rcnn.semantic_channels=32")
    assert len(rows) == 2 and all("keep shares of the gated blocks" in line for line in lines)
