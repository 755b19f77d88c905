import json

import torch

from helpers import REPO, TINY_DEFORMABLE, TINY_MODEL, tiny_overrides
from engine.benchmark import count_flops
from tools import benchmark


def test_benchmark_prints_table_and_json(capsys):
    rows = benchmark.main(["--config", str(REPO / "configs/detr_r50.yaml"), "--size", "64", "96",
                           "--runs", "1", "--warmup", "0", "--json", "--opts", *TINY_MODEL])
    out = capsys.readouterr().out.splitlines()
    record = json.loads(out[-1])
    assert {"config", "size", "batch", "gflops", "gflops_by_part", "latency_s", "peak_mem_mb",
            "gflops_deform_sampling"} <= set(record)
    assert record["gflops_deform_sampling"] == 0  # DETR has no deformable attention
    assert record["size"] == [64, 96] and record["batch"] == 1
    assert set(record["gflops_by_part"]) == {"backbone", "encoder", "decoder", "other"}
    assert abs(sum(record["gflops_by_part"].values()) - record["gflops"]) < 1e-2
    assert record["gflops_by_part"]["encoder"] > 0 and record["latency_s"] > 0
    assert rows[0]["gflops"] == record["gflops"]


def test_deformable_sampling_is_reported_apart():
    rows = benchmark.main(["--config", str(REPO / "configs/deformable_detr_plus_r50.yaml"), "--size", "64", "96",
                           "--runs", "1", "--warmup", "0", "--opts", *TINY_DEFORMABLE,
                           "model.name=deformable_detr_plus"])
    # 1 encoder layer over 8x12 + 4x6 + 2x3 tokens and 2 decoder layers over 10 queries,
    # 4 heads x 3 levels x 2 points x 16 channels, 5 multiply-adds per sample and channel
    samples = (96 + 24 + 6 + 2 * 10) * 4 * 3 * 2 * 16
    assert abs(rows[0]["gflops_deform_sampling"] * 1e9 - 5 * samples) <= 1e3  # JSON keeps 1e-6 GFLOPs
    assert rows[0]["gflops_by_part"]["encoder"] > 0


def test_sampling_flops_land_in_their_part_whichever_kernel_runs():
    from detr_sparse import build_model
    from detr_sparse.transformers.ms_deform_attn import MSDeformAttn
    from engine.config import load_config

    torch.manual_seed(0)
    model = build_model(load_config(None, TINY_DEFORMABLE).model, 3).eval()
    inputs = benchmark.make_input((64, 96), 1, "", "cpu")
    counts = {}
    try:
        for impl in ("fast", "reference"):
            MSDeformAttn.impl = impl
            counts[impl] = count_flops(model, inputs, model.parts)
    finally:
        MSDeformAttn.impl = "auto"
    assert counts["fast"].by_part == counts["reference"].by_part
    # the encoder's sampling is counted inside the encoder: its 126 tokens, 4 heads x 3 levels
    # x 2 points x 16 channels, 5 multiply-adds each (torch's counter counts 2 per multiply-add)
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(inputs)
    encoder = {str(op): n for op, n in counter.get_flop_counts()["DeformableDETR.transformer.encoder"].items()}
    assert encoder["detr_sparse.msda_forward"] == 2 * 5 * 126 * 4 * 3 * 2 * 16


def test_attention_matmuls_are_counted_as_multiply_adds():
    attn = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            q = x + 1  # position added to queries and keys, as DETR does
            return self.attn(q, q, x, need_weights=False)[0]

    n, d = 10, 8
    total = count_flops(Wrap(), torch.randn(1, n, d)).total
    projections = 4 * n * d * d  # q, k, v and output projections
    attention = 2 * n * n * d  # q @ k^T and weights @ v
    assert abs(total * 1e9 - (projections + attention)) < 1


def test_training_throughput_for_one_and_two_processes(tiny_coco, tmp_path, capsys):
    opts = tiny_overrides(tiny_coco, tmp_path, **{"train.batch_size": 1})
    rows = benchmark.main(["--train", "--config", str(REPO / "configs/detr_r50.yaml"), "--iters", "3", "--repeats", "1",
                           "--warmup", "1", "--json", "--opts", *opts])
    assert [r["processes"] for r in rows] == [1, 2]
    assert [len(r["images_per_s_per_process"]) for r in rows] == [1, 2]
    assert all(v > 0 for r in rows for v in r["images_per_s_per_process"])
    assert rows[1]["efficiency"] == rows[1]["images_per_s"] / (2 * rows[0]["images_per_s"])
    assert "scaling efficiency" in capsys.readouterr().out


def test_deformable_attention_component_prints_speedups(capsys):
    rows = benchmark.main(["--component", "msda", "--size", "64", "96", "--runs", "1", "--warmup", "0"])
    assert [r["batch"] for r in rows] == [1, 2]
    # 4 levels at strides 8..64 of a 64x96 image: 8x12 + 4x6 + 2x3 + 1x2 tokens
    assert all(r["queries"] == 128 for r in rows)
    assert all(r["forward_speedup"] > 0 and r["train_speedup"] > 0 for r in rows)
    assert "forward+backward" in capsys.readouterr().out


def test_dge_backbone_at_a_forced_budget_against_its_dense_baseline(capsys):
    small_heads = ["model.rcnn.fpn_channels=32", "model.rcnn.box_head_dim=64", "model.rcnn.mask_head_dim=16",
                   "model.rcnn.rpn_post_nms_top_n_test=50"]
    rows = benchmark.main(["--config", str(REPO / "configs/mask_rcnn_pvt_s.yaml"),
                           str(REPO / "configs/mask_rcnn_pvt_s_dge.yaml"), "--size", "256", "384",
                           "--runs", "1", "--warmup", "0", "--dge-budget", "0.5", "--opts", *small_heads])
    dense, dge = rows
    assert "dge_beta" not in dense and abs(dge["dge_beta"] - 0.5) < 0.02
    ratio = dge["gflops_by_part"]["backbone"] / dense["gflops_by_part"]["backbone"]
    assert 0.45 < ratio < 0.56  # beta counts the backbone as the FLOP counter does
    assert dge["backbone_latency_s"] > 0
    assert "DGE beta" in capsys.readouterr().out


def test_svit_backbone_at_its_keep_targets_against_its_dense_baseline(capsys):
    small_heads = ["model.rcnn.fpn_channels=32", "model.rcnn.box_head_dim=64", "model.rcnn.mask_head_dim=16",
                   "model.rcnn.rpn_post_nms_top_n_test=50"]
    rows = benchmark.main(["--config", str(REPO / "configs/mask_rcnn_deit_s_adapter.yaml"),
                           str(REPO / "configs/mask_rcnn_deit_s_adapter_svit.yaml"), "--size", "160", "224",
                           "--runs", "1", "--warmup", "0", "--svit-targets", "--opts", *small_heads])
    dense, svit = rows
    # the targets' mean, 0.511, each image keeping int(N * t) + 1 of its N tokens
    assert "svit_keep" not in dense and abs(svit["svit_keep"] - 0.511) < 0.02
    ratio = svit["gflops_by_part"]["backbone"] / dense["gflops_by_part"]["backbone"]
    assert ratio < 0.9  # the gathered blocks compute on the kept tokens only
    assert "SViT keep" in capsys.readouterr().out


def test_dge_training_forms_are_timed_against_the_dense_backbone(capsys):
    rows = benchmark.main(["--component", "dge_train", "--dge-backbone", "pvt_t_dge", "--size", "64", "96",
                           "--batch", "2", "--runs", "1", "--warmup", "0"])
    row = rows[0]
    assert row["dense_backbone_s"] > 0 and row["dense_form_s"] > 0 and row["sparse_form_s"] > 0
    assert abs(row["beta"] - 0.5) < 0.1
    assert "DGE sparse form" in capsys.readouterr().out


def test_gather_component_times_the_token_core_against_torch_gather(capsys):
    rows = benchmark.main(["--component", "gather", "--runs", "1", "--warmup", "0"])
    assert [(r["tokens"], r["channels"]) for r in rows] == [(64000, 64), (16000, 128), (4000, 320)]
    assert all(r["forward_ours_s"] > 0 and r["train_torch_gather_s"] > 0 for r in rows)
    assert "torch.gather" in capsys.readouterr().out


def test_attention_component_times_both_forms_and_names_the_pick(capsys):
    rows = benchmark.main(["--component", "attention", "--runs", "1", "--warmup", "0", "--precision", "fp32", "bf16"])
    assert len(rows) == 8 and all(r["fused_s"] > 0 and r["written_out_s"] > 0 for r in rows)
    assert [r["picked"] for r in rows if r["precision"] == "bf16"] == ["written-out"] * 3 + ["fused"]
    assert {r["picked"] for r in rows if r["precision"] == "fp32"} == {"fused"}
    assert "written / fused" in capsys.readouterr().out


def test_each_config_takes_its_own_checkpoint(tmp_path, capsys):
    import pytest

    from engine.checkpoint import build_eval_model
    from engine.config import load_config

    configs = [str(REPO / f"configs/mask_rcnn_pvt_t{kind}_synthetic.yaml") for kind in ("", "_dge")]
    opts = ["model.backbone.pretrained=''"]
    paths = []
    for i, config in enumerate(configs):
        model = build_eval_model(load_config(config, opts).model, 91, "", torch.device("cpu"))
        for name, value in model.state_dict().items():  # trained routers that choose the coarsest
            if name.endswith("router.gate.bias"):
                value.copy_(torch.tensor([-5.0, -5.0, 5.0]))
        paths.append(tmp_path / f"{i}.pth")
        torch.save({"model": model.state_dict()}, paths[-1])
    rows = benchmark.main(["--config", *configs, "--checkpoint", *map(str, paths), "--size", "64", "96",
                           "--runs", "1", "--warmup", "0", "--opts", *opts])
    assert "dge_beta" not in rows[0] and rows[1]["dge_beta"] < 0.4  # the DGE model's own gates
    with pytest.raises(SystemExit):
        benchmark.main(["--config", *configs, "--checkpoint", *map(str, paths * 2), "--opts", *opts])
    assert "4 files for 2 configs" in capsys.readouterr().err


def test_a_row_per_precision_with_ratios_against_the_first(capsys):
    rows = benchmark.main(["--config", str(REPO / "configs/deformable_detr_plus_r50.yaml"), "--size", "64", "96",
                           "--runs", "1", "--warmup", "0", "--precision", "fp32", "bf16", "--opts",
                           *TINY_DEFORMABLE, "model.name=deformable_detr_plus"])
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    assert rows[0]["gflops"] == rows[1]["gflops"] and all(r["latency_s"] > 0 for r in rows)
    table = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if "deformable_detr_plus" in line]
    assert [cells[1] for cells in table] == ["fp32", "bf16"]


def test_swin_against_timm_or_a_clear_word_without_timm():
    import importlib.util

    import pytest

    args = ["--component", "swin_timm", "--size", "64", "96", "--runs", "1", "--warmup", "0"]
    if importlib.util.find_spec("timm") is None:  # not a dependency: installed apart
        with pytest.raises(SystemExit, match="needs timm"):
            benchmark.main(args)
        return
    rows = benchmark.main(args)
    assert rows[0]["ours_s"] > 0 and rows[0]["timm_s"] > 0


def test_things_timed_in_turns_each_get_their_median():
    from engine.benchmark import time_calls

    calls = []
    fast, slow = (lambda: calls.append("fast")), (lambda: (calls.append("slow"), sum(range(200_000))))
    fast_s, slow_s = time_calls([fast, slow], runs=3, warmup=1)
    assert calls == ["fast", "slow"] * 4  # one of each per round, the warm-up round first
    assert 0 < fast_s < slow_s


def test_gflops_averaged_over_val_images_at_the_evaluation_size(tiny_coco, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    from omegaconf import OmegaConf

    from engine.config import load_config

    OmegaConf.save(load_config(None, tiny_overrides(tiny_coco, tmp_path / "out")), config)
    rows = benchmark.main(["--config", str(config), "--size", "64", "96", "--runs", "1", "--warmup", "0",
                           "--val-images", "2", "--num-classes", "8"])
    row = rows[0]
    assert row["val_images"] == 2 and 0 < row["val_backbone_gflops"] < row["val_gflops"]
    assert row["val_gflops"] != row["gflops"]  # 80-pixel val images, not the 64 x 96 input
    assert "the mean over 2 val images" in capsys.readouterr().out
