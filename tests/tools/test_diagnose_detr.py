from detr_sparse import build_model
from engine.checkpoint import save_checkpoint
from engine.config import load_config
from helpers import REPO, tiny_overrides
from tools import diagnose_detr


def test_diagnose_detr_reports_variation(tiny_coco, tmp_path):
    opts = tiny_overrides(tiny_coco, tmp_path)
    cfg = load_config(None, opts)
    save_checkpoint({"model": build_model(cfg.model, 8).state_dict()}, tmp_path / "c.pth")
    stats = diagnose_detr.main(["--config", str(REPO / "configs/detr_r50.yaml"), "--checkpoint",
                                str(tmp_path / "c.pth"), "--images", "3", "--opts", *opts])
    # a freshly initialised model still passes its input through
    assert stats["memory_std_over_images"] > 0.05 and stats["box_std_over_images"] > 0
