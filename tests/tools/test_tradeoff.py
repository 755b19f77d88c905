import json

from helpers import REPO, TINY_DEFORMABLE, tiny_overrides
from tools import tradeoff

SPARSE = TINY_DEFORMABLE + ["model.name=sparse_detr", "model.two_stage=true", "model.with_box_refine=true",
                            "model.transformer.enc_layers=2"]


def test_tradeoff_table_over_keep_ratios(tiny_coco, tmp_path, capsys):
    opts = tiny_overrides(tiny_coco, tmp_path) + SPARSE
    rows = tradeoff.main(["--config", str(REPO / "configs/sparse_detr_r50.yaml"), "--rho", "0.2", "1.0",
                          "--runs", "1", "--json", "--opts", *opts])
    assert [r["rho"] for r in rows] == [0.2, 1.0]
    assert all(0 <= r["AP50"] <= 1 and r["latency_s"] > 0 for r in rows)
    assert rows[0]["gflops_encoder"] < rows[1]["gflops_encoder"]
    assert rows[0]["gflops_without_sampling"] < rows[0]["gflops"]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("rho | AP | AP50") and json.loads(out[-1])["rho"] == 1.0
