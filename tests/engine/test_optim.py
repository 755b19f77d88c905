import os

import pytest
import torch

from helpers import REPO, checkpoint_model, run_checked, tiny_overrides, train_losses


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
        run_checked(cmd + ["train.epochs=2"], cwd=tmp_path, env=env)
        # the third epoch resumes from the checkpoint, whose optimizer state OSS consolidated
        run_checked(cmd, cwd=tmp_path, env=env)
        runs[name] = out
    assert len(train_losses(runs["plain"])) == 6
    assert train_losses(runs["plain"]) == pytest.approx(train_losses(runs["sharded"]), rel=1e-5)
    assert _same(checkpoint_model(runs["plain"]), checkpoint_model(runs["sharded"]))


def test_no_decay_names_get_no_weight_decay_and_groups_split_by_lr_and_decay():
    from engine.optim import param_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.backbone = torch.nn.Linear(4, 4)  # "backbone." parameters get the backbone's lr
    groups = param_groups(model, 1e-4, 1e-5, 0.05, no_decay=["bias", "1."])
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["0.weight"])] == (1e-4, 0.05)
    assert by_param[id(named["0.bias"])] == (1e-4, 0.0)
    assert by_param[id(named["1.weight"])] == (1e-4, 0.0)  # the norm, by name
    assert by_param[id(named["backbone.weight"])] == (1e-5, 0.05)
    assert by_param[id(named["backbone.bias"])] == (1e-5, 0.0)
    assert len(groups) == 4


def test_lr_multipliers_reach_the_backbones_parameters_too():
    from engine.optim import param_groups

    model = torch.nn.Module()
    model.head = torch.nn.Linear(4, 4)
    model.backbone = torch.nn.Module()
    model.backbone.block = torch.nn.Linear(4, 4)
    model.backbone.gate = torch.nn.Linear(4, 2)  # an SViT gate: new, it learns faster
    groups = param_groups(model, 1e-4, 1e-5, 0.0, lr_multipliers={"gate": 10, "head.bias": 0.1})
    named = dict(model.named_parameters())
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert by_param[id(named["backbone.gate.weight"])] == pytest.approx(1e-4)
    assert by_param[id(named["backbone.block.weight"])] == pytest.approx(1e-5)
    assert by_param[id(named["head.bias"])] == pytest.approx(1e-5)
    assert by_param[id(named["head.weight"])] == pytest.approx(1e-4)


def test_linear_warm_up_multiplies_the_scheduled_lr_and_restores_it():
    from engine.train import warmed_up, warmup_factor

    assert warmup_factor(0, 10, 0.001) == pytest.approx(0.001)
    assert warmup_factor(5, 10, 0.001) == pytest.approx(0.5005)
    assert warmup_factor(10, 10, 0.001) == warmup_factor(0, 0, 0.001) == 1.0
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with warmed_up(optimizer, 0.5):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert optimizer.param_groups[0]["lr"] == 0.1



def test_cosine_schedule_runs_from_lr_to_the_floor_after_the_warm_up():
    from types import SimpleNamespace

    from engine.optim import build_scheduler
    from engine.train import lr_factor

    cfg = SimpleNamespace(warmup_iters=0, warmup_ratio=0.001, lr_schedule="cosine", min_lr_ratio=0.1, lr_drops=[1])
    assert [lr_factor(i, 100, cfg) for i in (0, 50, 100, 120)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    cfg.warmup_iters = 10
    assert lr_factor(0, 100, cfg) == pytest.approx(0.001)  # the warm-up's first factor, on top of cosine's 1
    assert lr_factor(50, 100, cfg) == pytest.approx(0.55)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, cfg)  # cosine: lr_drops ignored
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    cfg.lr_schedule = "poly"
    with pytest.raises(ValueError, match="train.lr_schedule: unknown schedule 'poly'"):
        build_scheduler(optimizer, cfg)
