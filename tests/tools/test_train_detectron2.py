"""tools/train_detectron2.py: detectron2's loop on a LazyConfig of the project's recipes."""
import json
import os
import sys

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (DETECTRON2=1 bash launch.sh --setup)")

from helpers import REPO, run_checked  # noqa: E402


def run(tiny_coco, out, flags: list, *opts):
    cmd = [sys.executable, str(REPO / "tools" / "train_detectron2.py"), "--config-file",
           str(REPO / "configs" / "detectron2" / "mask_rcnn_pvt_t_dge_synthetic.py"), *flags,
           "model.backbone.bottom_up.pretrained=''", f"data.root={tiny_coco}", "data.name=tiny_tool",
           "data.synthetic.generate=false", f"train.output_dir={out}", "train.log_period=1",
           "train.checkpointer.period=1", "train.eval_period=100", "dataloader.train.total_batch_size=2",
           "dataloader.train.mapper.augmentations.1.short_edge_length=[64]", "dataloader.test.batch_size=2",
           *opts]
    return run_checked(cmd, cwd=REPO)


def iterations(out) -> list[int]:
    return [r["iteration"] for r in map(json.loads, (out / "metrics.json").read_text().splitlines())
            if "total_loss" in r]


def test_a_run_writes_checkpoints_that_resume_and_evaluate(tiny_coco, tmp_path):
    out = tmp_path / "run"
    run(tiny_coco, out, [], "train.max_iter=2")
    assert (out / "last_checkpoint").read_text() == "model_final.pth" and (out / "model_0000001.pth").is_file()
    first = iterations(out)
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert "dge_beta" in records[0] and "loss_budget" in records[0]  # the backbone's statistic and loss
    assert "segm/AP50" in records[-1]  # the COCO evaluation at the end
    run(tiny_coco, out, ["--resume"], "train.max_iter=4")
    assert iterations(out) == first + [2, 3]  # went on from iteration 2, not from 0
    done = run(tiny_coco, out, ["--eval-only"], f"train.init_checkpoint={out / 'model_final.pth'}")
    assert "copypaste: Task: segm" in done.stdout + done.stderr


def test_torchrun_trains_with_two_processes(tiny_coco, tmp_path):
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           str(REPO / "tools" / "train_detectron2.py"), "--config-file",
           str(REPO / "configs" / "detectron2" / "mask_rcnn_r18_synthetic.py"),
           "model.backbone.bottom_up.pretrained=''", f"data.root={tiny_coco}", "data.name=tiny_torchrun",
           "data.synthetic.generate=false", f"train.output_dir={out}", "train.max_iter=2", "train.eval_period=100",
           "dataloader.train.total_batch_size=4", "dataloader.train.mapper.augmentations.1.short_edge_length=[64]"]
    run_checked(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (out / "log.txt.rank1").is_file() and (out / "model_final.pth").is_file()
    assert iterations(out)[-1] == 1
