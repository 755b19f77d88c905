import json

import pytest

from helpers import REPO, TINY_MODEL
from tools import compare


def test_two_tiny_configs_give_the_table_json_and_plot(tmp_path):
    configs = [REPO / "configs" / "detr_r50.yaml", REPO / "configs" / "deformable_detr_plus_r50.yaml"]
    out = compare.main(["--configs", *map(str, configs), "--size", "64", "96", "--runs", "1",
                        "--out", str(tmp_path), "--opts", *TINY_MODEL])  # tiny versions of both
    rows = out["models"]
    assert [(r["name"], r["precision"]) for r in rows] == [
        ("detr_r50", "fp32"), ("detr_r50", "bf16"), ("deformable_detr_plus_r50", "fp32"),
        ("deformable_detr_plus_r50", "bf16")]
    assert [r["family"] for r in rows[::2]] == ["DETR", "Deformable DETR"]
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert len(table) == 4 and "latency s (bf16)" in table[0] and table[2].startswith("| detr_r50 | DETR | 64x96")
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert len(saved["models"]) == 4 and all(r["params_m"] > 0 and r["gflops"] > 0 for r in saved["models"])
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_the_family_of_each_coco_config():
    families = {p.stem: compare.family(compare.load_config(p)) for p in compare.coco_configs()}
    assert families["sparse_detr_swin"] == "Sparse DETR" and families["pnp_detr_r50_dc5"] == "PnP-DETR"
    assert families["mask_rcnn_pvt_s_dge"] == "DGE" and families["mask_rcnn_deit_s_adapter_svit"] == "SViT"
    assert families["mask_rcnn_spt_t12"] == "SPT" and families["mask_rcnn_swin_t"] == "dense two-stage"
    assert families["deformable_detr_plus_swin"] == "Deformable DETR" and families["detr_r50_dc5"] == "DETR"
    assert not any("synthetic" in name for name in families)


def test_a_trained_run_is_found_with_its_ap50_and_latency(tiny_coco, tmp_path):
    from engine.config import load_config
    from engine.distributed import DistInfo
    from engine.logger import setup_logging
    from engine.trainer import Trainer
    from helpers import tiny_overrides

    run = tmp_path / "runs" / "tiny_detr"
    setup_logging(run, True)
    trainer = Trainer(load_config(None, tiny_overrides(tiny_coco, run, **{"train.max_iters": 1})), DistInfo())
    trainer.train()
    trainer.close()
    (tmp_path / "runs" / "no_checkpoint").mkdir()
    (tmp_path / "runs" / "no_checkpoint" / "config.yaml").write_text((run / "config.yaml").read_text())
    found = compare.synthetic_runs(tmp_path / "runs", 1, "fp32")
    assert [(r["run"], r["family"], r["size"]) for r in found] == [("tiny_detr", "DETR", [80, 80])]
    assert 0 <= found[0]["AP50"] <= 1 and found[0]["latency_s"] > 0
    image = compare.first_val_image(load_config(run / "config.yaml").data)  # timed on its own first val image
    assert image.is_file() and image.parent.name == "val2017"
    assert compare.first_val_image(load_config(None, ["data.root=" + str(tmp_path / "none")]).data) == ""
    out = tmp_path / "compare"  # --runs-only: the runs again, the models' table of an earlier run kept
    out.mkdir()
    (out / "compare.json").write_text(json.dumps({"models": [{"name": "earlier"}], "synthetic_runs": []}))
    result = compare.main(["--runs-only", "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--runs", "1"])
    assert result["models"] == [{"name": "earlier"}] and len(result["synthetic_runs"]) == 1
    assert json.loads((out / "compare.json").read_text()) == result and (out / "compare_synthetic.png").is_file()
    with pytest.raises(SystemExit):  # --runs-only without runs to time
        compare.main(["--runs-only", "--out", str(out)])
