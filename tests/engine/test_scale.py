import copy
import functools
import os

import pytest
import torch

from engine.config import load_config
from engine.distributed import DistInfo
from engine.logger import setup_logging
from engine.scale import checkpoint_activations
from engine.trainer import Trainer
from helpers import REPO, run_checked, tiny_overrides, train_losses


def test_activation_checkpointing_gives_the_sametrain_losses(tiny_coco, tmp_path):
    runs = {}
    for name, parts in (("plain", "[]"), ("checkpointed", "[backbone,encoder,decoder]")):
        out = tmp_path / name
        cfg = load_config(None, tiny_overrides(tiny_coco, out, **{
            "train.epochs": 2, "train.activation_checkpointing": parts,
            "model.transformer.dropout": 0.1}))  # dropout: the recomputation must replay its RNG
        setup_logging(out, True)
        trainer = Trainer(cfg, DistInfo())
        m = trainer.model
        blocks = [*m.backbone.stages.values(), *m.transformer.encoder, *m.transformer.decoder]
        wrapped = [isinstance(b.forward, functools.partial) for b in blocks]  # fairscale's wrapper
        assert wrapped == [name == "checkpointed"] * len(blocks)
        trainer.train()
        trainer.close()
        runs[name] = out
    # whole runs: the same losses (parameters drift apart at the float-rounding level, which
    # Adam's normalisation magnifies for near-zero gradients, so they are compared below)
    assert train_losses(runs["plain"]) == pytest.approx(train_losses(runs["checkpointed"]), rel=1e-5)


def test_activation_checkpointing_gives_the_same_gradients(tiny_coco, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_coco, tmp_path))
    trainer = Trainer(cfg, DistInfo())
    images, targets = next(iter(trainer.train_loader))
    grads = []
    for parts in ([], ["backbone", "encoder", "decoder"]):
        model = copy.deepcopy(trainer.model)
        checkpoint_activations(model, parts)
        torch.manual_seed(0)
        sum(v for k, v in model(images, targets).items() if k.startswith("loss")).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(trainer.model.parameters()))
    # equal up to float rounding of multithreaded sums: relative to each gradient's norm
    errors = {n: float((grads[1][n] - grads[0][n]).norm() / grads[0][n].norm().clamp_min(1e-12))
              for n in grads[0]}
    assert max(errors.values()) < 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    trainer.close()


def test_unknown_checkpointing_part_is_named(tiny_coco, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_coco, tmp_path, **{"train.activation_checkpointing": "[neck]"}))
    with pytest.raises(ValueError, match="unknown part 'neck'"):
        Trainer(cfg, DistInfo())


def test_bf16_gradient_compression_stays_close_to_the_plain_run(tiny_coco, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "2"}
    losses = {}
    for mode in ("none", "bf16"):
        out = tmp_path / mode
        opts = tiny_overrides(tiny_coco, out, **{"train.epochs": 2, "train.grad_compression": mode})
        run_checked(["bash", str(REPO / "launch.sh"), "--config", str(REPO / "configs/detr_r50.yaml"),
                        "--opts", *opts], cwd=tmp_path, env=env)
        losses[mode] = train_losses(out)
    assert losses["none"][0] == losses["bf16"][0]  # the first forward precedes any reduction
    assert losses["none"] == pytest.approx(losses["bf16"], rel=2e-2)
    assert losses["none"] != losses["bf16"]  # the hook did act on the gradients
