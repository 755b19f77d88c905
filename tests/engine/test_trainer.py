import json
import os
import sys

import pytest
import torch
from omegaconf import read_write

from helpers import REPO, run_checked, tiny_overrides
from engine.config import load_config
from engine.distributed import DistInfo
from engine.logger import setup_logging
from engine.train import NonFiniteLossError
from engine.trainer import Trainer


def _trainer(tiny_coco, out, **extra):
    cfg = load_config(None, tiny_overrides(tiny_coco, out, **extra))
    setup_logging(out, True)
    return Trainer(cfg, DistInfo())


def _params(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_resume_equals_uninterrupted_run(tiny_coco, tmp_path):
    straight = _trainer(tiny_coco, tmp_path / "a", **{"train.epochs": 2})
    straight.train()
    half = _trainer(tiny_coco, tmp_path / "b", **{"train.epochs": 1})
    half.train()
    resumed = _trainer(tiny_coco, tmp_path / "b", **{"train.epochs": 2})
    resumed.resume(tmp_path / "b" / "checkpoint.pth")
    assert resumed.state.epoch == 1 and resumed.state.iteration == half.state.iteration
    resumed.train()
    assert resumed.state.iteration == straight.state.iteration
    assert resumed.scheduler.state_dict() == straight.scheduler.state_dict()
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    for t in (straight, half, resumed):
        t.close()


def test_crash_after_a_mid_epoch_checkpoint_resumes_to_the_uninterrupted_result(tiny_coco, tmp_path):
    # 8 images, batch 2: 4 iterations per epoch; checkpoints at iterations 2, 4, 6; the crash
    # comes during iteration 7, so the newest checkpoint is 2 steps into epoch 1
    opts = {"train.epochs": 2, "train.checkpoint_every_iters": 2, "train.keep_checkpoints": 5}
    straight = _trainer(tiny_coco, tmp_path / "a", **opts)
    straight.train()
    crashing = _trainer(tiny_coco, tmp_path / "b", **opts)
    forward, calls = crashing.model.criterion.forward, []

    def crash_on_the_seventh(*args):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("simulated crash")
        return forward(*args)

    crashing.model.criterion.forward = crash_on_the_seventh
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    resumed = _trainer(tiny_coco, tmp_path / "b", **opts)
    assert resumed.resume_latest()
    assert (resumed.state.epoch, resumed.state.step_in_epoch, resumed.state.iteration) == (1, 2, 6)
    resumed.train()
    assert resumed.state.iteration == straight.state.iteration == 8
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    for t in (straight, crashing, resumed):
        t.close()


def test_non_finite_loss_stops_with_names_and_keeps_checkpoint(tiny_coco, tmp_path):
    first = _trainer(tiny_coco, tmp_path, **{"train.epochs": 1})
    first.train()
    saved = (tmp_path / "checkpoint.pth").read_bytes()
    second = _trainer(tiny_coco, tmp_path, **{"train.epochs": 2})
    second.resume(tmp_path / "checkpoint.pth")
    criterion = second.model.criterion
    original = criterion.forward
    criterion.forward = lambda *a: {**original(*a), "loss_giou": torch.tensor(float("nan"))}
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, iteration 4: .*loss_giou=nan"):
        second.train()
    assert (tmp_path / "checkpoint.pth").read_bytes() == saved
    first.close()
    second.close()


def test_two_process_torchrun_trains_logs_and_evaluates(tiny_coco, tmp_path):
    out = tmp_path / "run"
    opts = tiny_overrides(tiny_coco, out, **{"train.epochs": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "main.py"), "--config", str(REPO / "configs/detr_r50.yaml"), "--opts", *opts]
    run_checked(cmd, cwd=tmp_path, env=env)
    assert (out / "checkpoint.pth").is_file() and (out / "config.yaml").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    # 8 images, 2 processes x batch 2: 2 iterations, logged once each by rank 0 only
    assert [r["step"] for r in train] == [1, 2]
    assert any(r["kind"] == "val" and "bbox_AP" in r for r in records)
    # rank 0 writes the results of both ranks' images, gathered (4 val images, DETR: 8 queries each)
    results = json.loads((out / "eval_epoch1_bbox.json").read_text())
    assert len(results) == 4 * 8 and len({r["image_id"] for r in results}) == 4
    assert (out / "eval_epoch1_per_category.md").is_file()
    # the checkpoint evaluates alone
    cmd = [sys.executable, str(REPO / "main.py"), "--config", str(out / "config.yaml"), "--eval",
           "--resume", str(out / "checkpoint.pth")]
    run_checked(cmd, cwd=tmp_path, env=env)
    last = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    assert (last["kind"], last["epoch"], last["step"]) == ("val", 1, 2)  # at the checkpoint's epoch and step


def test_a_split_of_its_own_folder_and_file_trains_evaluates_and_names_its_classes(tiny_run):
    # tiny_run: data.root names no folder, custom_coco's data.{train,val}_{images,annotations} give the splits
    records = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]  # 8 images, batch 2
    assert any(r["kind"] == "val" and "bbox_AP" in r for r in records)
    classes = torch.load(tiny_run / "checkpoint.pth", weights_only=True)["classes"]
    assert classes["names"][:2] == ["shape circle", "shape ellipse"]  # the annotation file's, renamed there
    assert classes["category_ids"] == list(range(1, 9)) and all(classes["is_thing"])
    assert not (tiny_run / "no_coco_here").exists()  # data.synthetic.generate: nothing to generate for


def test_synthetic_folder_made_with_other_arguments_is_not_overwritten(tiny_coco, tmp_path):
    from engine.trainer import ensure_synthetic_data

    cfg = load_config(None, tiny_overrides(tiny_coco, tmp_path, **{
        "data.synthetic.generate": "true", "data.synthetic.num_train": 9}))
    before = (tiny_coco / "meta.json").read_text()
    with pytest.raises(ValueError, match="other arguments"):
        ensure_synthetic_data(cfg.data, DistInfo())
    assert (tiny_coco / "meta.json").read_text() == before


def test_panoptic_run_reports_pq_and_the_frozen_schedule_trains_only_the_mask_branch(tiny_coco, tmp_path):
    pan = {"data.panoptic": "true", "model.panoptic.enabled": "true", "model.panoptic.threshold": 0.0,
           "model.backbone.out_features": "[res2,res3,res4,res5]", "train.epochs": 1}
    joint = _trainer(tiny_coco, tmp_path / "joint", **pan)
    stats = joint.train()
    assert 0 <= stats["panoptic"]["PQ"] <= 1 and "AP50" in stats["bbox"]
    # DETR's schedule: the trained detector's weights, frozen, under a mask branch that trains
    frozen = _trainer(tiny_coco, tmp_path / "frozen", **pan, **{
        "model.panoptic.freeze_detector": "true", "model.weights": tmp_path / "joint" / "checkpoint.pth"})
    before = _params(frozen)
    assert all(torch.equal(before[k], v) for k, v in joint.model.state_dict().items())
    frozen.train()
    after = _params(frozen)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("panoptic_head.") for k in changed)
    for t in (joint, frozen):
        t.close()


def test_two_stage_runs_report_what_they_predict(tiny_coco, tmp_path):
    common = {"model.backbone.out_features": "[res2,res3,res4,res5]", "train.epochs": 1,
              "train.clip_max_norm": 0.0}
    mask_rcnn = _trainer(tiny_coco, tmp_path / "mask_rcnn", **common, **{"model.name": "mask_rcnn", "data.masks": "true"})
    assert set(mask_rcnn.train()) == {"bbox", "segm"}
    panoptic = _trainer(tiny_coco, tmp_path / "panoptic", **common, **{"model.name": "panoptic_fpn", "data.panoptic": "true"})
    stats = panoptic.train()  # masks scored by PQ: the panoptic set has no instance annotations
    assert set(stats) == {"bbox", "panoptic"} and 0 <= stats["panoptic"]["PQ"] <= 1
    for t in (mask_rcnn, panoptic):
        t.close()


def test_a_warmed_up_run_logs_the_warmed_lr_and_ends_on_the_schedule(tiny_coco, tmp_path):
    trainer = _trainer(tiny_coco, tmp_path, **{"train.epochs": 2, "train.warmup_iters": 4, "train.warmup_ratio": 0.2,
                                               "train.eval_every": 100})
    trainer.train()
    trainer.close()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    # 4 iterations per epoch: the first four warm up from 0.2 x, the rest run at the scheduled lr
    assert lrs == pytest.approx([1e-4 * (1 - (1 - i / 4) * 0.8) for i in range(4)] + [1e-4] * 4)


def test_eval_precision_bf16_evaluates_under_autocast_and_a_bad_mode_stops_at_the_start(tiny_coco, tmp_path):
    trainer = _trainer(tiny_coco, tmp_path / "bf16", **{"eval.precision": "bf16", "train.amp": "none"})
    dtypes = []
    trainer.model.class_embed.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    stats = trainer.evaluate()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert 0 <= stats["bbox"]["AP50"] <= 1
    dtypes.clear()
    with read_write(trainer.cfg):
        trainer.cfg.eval.precision = "fp32"
    trainer.evaluate()
    assert set(dtypes) == {torch.float32}
    trainer.close()
    with pytest.raises(ValueError, match="eval.precision: unknown mode 'fp8'"):
        _trainer(tiny_coco, tmp_path / "bad", **{"eval.precision": "fp8"})


def test_accumulation_steps_every_n_batches_and_resumes_mid_epoch_at_the_right_sample(tiny_coco, tmp_path):
    # 8 images, batch 2: 4 batches per epoch, 2 optimizer steps with accumulate 2
    trainer = _trainer(tiny_coco, tmp_path, **{"train.epochs": 1, "train.accumulate": 2, "train.eval_every": 100})
    assert trainer.total_iters() == 2
    trainer.train()
    assert trainer.state.iteration == 2
    trainer.state.step_in_epoch = 1
    trainer.train_loader.sampler.start = 0
    trainer.train_epoch(lambda: None)  # the second step's two batches only
    assert trainer.state.iteration == 3
    assert trainer.train_loader.sampler.start == 1 * 2 * 2
    trainer.close()
    with pytest.raises(ValueError, match="train.accumulate: 0"):
        _trainer(tiny_coco, tmp_path / "bad", **{"train.accumulate": 0})


def test_the_weight_average_follows_each_step_is_evaluated_and_resumes(tiny_coco, tmp_path):
    trainer = _trainer(tiny_coco, tmp_path, **{"train.epochs": 1, "train.ema": 0.5, "train.eval_every": 100})
    snapshots = []

    def after_step():
        snapshots.append({k: v.detach().clone() for k, v in trainer.model.named_parameters()})
        trainer._after_step()

    trainer.train_epoch(after_step)
    expected = snapshots[0]  # the average starts at the first step's weights, then halves towards each
    for snap in snapshots[1:]:
        expected = {k: 0.5 * expected[k] + 0.5 * snap[k] for k in expected}
    averaged = dict(trainer.ema.module.named_parameters())
    assert all(torch.allclose(averaged[k], expected[k], atol=1e-6) for k in expected)
    assert not torch.equal(averaged["class_embed.weight"], trainer.model.class_embed.weight)
    called = []
    trainer.ema.module.class_embed.register_forward_hook(lambda m, i, o: called.append("average"))
    trainer.model.class_embed.register_forward_hook(lambda m, i, o: called.append("model"))
    trainer.evaluate()
    assert called and set(called) == {"average"}
    trainer.save()
    trainer.close()
    resumed = _trainer(tiny_coco, tmp_path / "resumed", **{"train.epochs": 1, "train.ema": 0.5})
    resumed.resume(tmp_path / "checkpoint.pth")
    again = dict(resumed.ema.module.named_parameters())
    assert all(torch.equal(again[k], averaged[k]) for k in averaged)
    resumed.close()


def test_a_random_backbone_with_frozen_parts_is_warned_about(tiny_coco, tmp_path):
    # the tiny recipe's ResNet-18 has a trainable norm (gn); frozen batch norm freezes its stem and res2
    _trainer(tiny_coco, tmp_path / "a", **{"model.backbone.norm": "frozen_bn"}).close()
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "model.backbone.pretrained is empty" in log and "freeze_at -1" in log
    _trainer(tiny_coco, tmp_path / "b").close()
    assert "model.backbone.pretrained is empty" not in (tmp_path / "b" / "log.txt").read_text()
