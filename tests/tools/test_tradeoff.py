import json

from helpers import REPO, TINY_DEFORMABLE, tiny_overrides
from tools import tradeoff

SPARSE = TINY_DEFORMABLE + ["model.name=sparse_detr", "model.two_stage=true", "model.with_box_refine=true",
                            "model.transformer.enc_layers=2"]


def test_tradeoff_table_over_keep_ratios(tiny_coco, tmp_path, capsys):
    opts = tiny_overrides(tiny_coco, tmp_path) + SPARSE
    rows = tradeoff.main(["--config", str(REPO / "configs/sparse_detr_r50.yaml"), "--ratio", "0.2", "1.0",
                          "--runs", "1", "--json", "--opts", *opts])
    assert [r["ratio"] for r in rows] == [0.2, 1.0]
    assert all(0 <= r["AP50"] <= 1 and r["latency_s"] > 0 for r in rows)
    assert rows[0]["gflops_encoder"] < rows[1]["gflops_encoder"]
    assert rows[0]["gflops_without_sampling"] < rows[0]["gflops"]
    assert rows[1]["kept_in_boxes"] == 1.0 and rows[0]["kept_outside"] < 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ratio | AP | AP50") and json.loads(out[-1])["ratio"] == 1.0


def test_tradeoff_over_poll_ratios(tiny_coco, tmp_path):
    opts = tiny_overrides(tiny_coco, tmp_path) + ["model.name=pnp_detr", "model.pnp.num_coarse=2",
                                                  "eval.precision=bf16"]
    rows = tradeoff.main(["--config", str(REPO / "configs/pnp_detr_r50.yaml"), "--ratio", "0.3", "1.0",
                          "--runs", "1", "--opts", *opts])
    assert {r["precision"] for r in rows} == {"bf16"}  # evaluated and timed in bf16
    assert rows[0]["gflops_transformer"] < rows[1]["gflops_transformer"]
    # every token polled at 1.0; at 0.3 fewer (a random model's need not be in the boxes)
    assert rows[1]["kept_in_boxes"] == rows[1]["kept_outside"] == 1.0
    assert rows[0]["kept_in_boxes"] < 1 and 0 < rows[0]["kept_outside"] < 1
