import os
import subprocess

import pytest
import torch

from helpers import REPO, checkpoint_model, tiny_overrides, train_losses


def _same(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6) for k in a)


def test_sharded_optimizer_gives_the_same_losses_and_resumes(tiny_coco, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "2"}
    runs = {}
    for name, shard in (("plain", "false"), ("sharded", "true")):
        out = tmp_path / name
        opts = tiny_overrides(tiny_coco, out, **{"train.epochs": 3, "train.shard_optimizer": shard,
                                                 "train.eval_every": 100})
        cmd = ["bash", str(REPO / "launch.sh"), "--config", str(REPO / "configs/detr_r50.yaml"), "--opts", *opts]
        subprocess.run(cmd + ["train.epochs=2"], cwd=tmp_path, env=env, check=True, timeout=300)
        # the third epoch resumes from the checkpoint, whose optimizer state OSS consolidated
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, timeout=300)
        runs[name] = out
    assert len(train_losses(runs["plain"])) == 6
    assert train_losses(runs["plain"]) == pytest.approx(train_losses(runs["sharded"]), rel=1e-5)
    assert _same(checkpoint_model(runs["plain"]), checkpoint_model(runs["sharded"]))
