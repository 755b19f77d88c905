"""From a resolved config to a trained and evaluated model: data, model, optimizer,
resume, the epoch loop, checkpoints, evaluation and logging."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler

from datasets import build_dataset, check_same_categories, collate_fn, split_files
from datasets.coco_eval import CocoEvaluator
from datasets.panoptic_eval import PanopticEvaluator
from detr_sparse import build_model

from . import checkpoint as ckpt
from .config import ConfigError, save_config, to_dict
from .distributed import DistInfo, all_gather_objects, barrier
from .eval_outputs import write_eval_outputs
from .logger import RunLogger
from .optim import build_optimizer, build_scheduler, optimizer_state
from .scale import checkpoint_activations, wrap_ddp
from .train import TrainState, autocast, evaluate, train_one_epoch
from .visualize import denormalize, draw_detections, has_sparsity_pictures, sparsity_pictures

log = logging.getLogger("detr_sparse.trainer")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def ensure_synthetic_data(data_cfg, dist: DistInfo) -> None:
    """Generate the synthetic dataset on rank 0 when the config asks for it and data.root
    does not already hold it (nor is unused: both splits given by their own files). A folder
    made with other arguments is an error, not overwritten."""
    syn = data_cfg.synthetic
    if not syn.generate or all(split_files(data_cfg, split)[2] for split in ("train", "val")):
        return
    from datasets import synthetic

    args = dict(num_train=syn.num_train, num_val=syn.num_val, seed=syn.seed,
                min_size=syn.min_size or None, max_size=syn.max_size or None,
                max_objects=syn.max_objects, sparse=syn.sparse, min_object_size=syn.min_object_size)
    root = Path(data_cfg.root)
    if synthetic.matches(root, **args):
        return
    if dist.is_main:
        meta = root / "meta.json"
        if meta.is_file():
            raise ValueError(f"data.root {root} holds synthetic data made with other arguments "
                             f"({meta.read_text().strip()}) than data.synthetic asks for "
                             f"({synthetic.generation_args(**args)}): remove it or change data.root")
        log.info("generating synthetic data in %s", root)
        synthetic.generate(root, **args, workers=2)
    barrier()


def build_evaluators(model, val_set) -> list:
    """The evaluators of what the model predicts (`model.eval_types`, default boxes): COCO
    box and mask AP, PQ. Mask AP needs instance masks in the annotations (data.masks on a
    COCO instances set); on a panoptic set the model's masks are scored by PQ."""
    types = getattr(model, "eval_types", ("bbox",))
    coco_types = [t for t in types if t == "bbox" or (t == "segm" and not hasattr(val_set, "panoptic_anns"))]
    evaluators = [CocoEvaluator(val_set.coco, val_set.label_to_cat_id, tuple(coco_types))]
    if "panoptic" in types:
        evaluators.append(PanopticEvaluator(val_set.categories, val_set.label_to_cat_id))
    return evaluators


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way: `start` samples of this rank's
    order for the epoch are skipped, so a run resumed from a mid-epoch checkpoint sees exactly
    the batches the interrupted run had left."""

    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return super().__len__() - self.start


def make_loader(dataset, batch_size: int, train: bool, num_workers: int, seed: int, dist: DistInfo):
    sampler = ResumableSampler(dataset, dist.world_size, dist.rank, shuffle=train, seed=seed,
                               drop_last=train)
    # the loader's own generator keeps worker seeding off the global RNG, so evaluation
    # between epochs cannot change what training draws next (exact resume)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
                      num_workers=num_workers, collate_fn=collate_fn,
                      persistent_workers=False, generator=torch.Generator().manual_seed(seed),
                      pin_memory=dist.device.type == "cuda")


def warn_untrained_frozen_backbone(model, model_cfg) -> None:
    """A backbone that starts from random weights (no model.backbone.pretrained, no
    model.weights) but keeps parts frozen (freeze_at, frozen batch norm, lr 0) would train
    around random layers: say so, naming the keys (the COCO configs expect ImageNet weights)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or model_cfg.backbone.pretrained or model_cfg.weights:
        return
    frozen = sum(p.numel() for p in backbone.parameters() if not p.requires_grad)
    if frozen or model_cfg.backbone.lr <= 0 or model_cfg.backbone.norm == "frozen_bn":
        log.warning("model.backbone.pretrained is empty: the backbone starts from random weights, yet %.1f M of its "
                    "parameters are frozen (model.backbone.freeze_at %d), its norm is %s and its lr %g: give it "
                    "weights, or train it whole (freeze_at=0, a trainable norm such as gn, lr > 0)",
                    frozen / 1e6, model_cfg.backbone.freeze_at, model_cfg.backbone.norm, model_cfg.backbone.lr)


class Trainer:
    def __init__(self, cfg, dist: DistInfo, eval_only: bool = False):
        self.cfg, self.dist = cfg, dist
        self.out = Path(cfg.output_dir)
        seed_everything(cfg.train.seed + dist.rank)
        ensure_synthetic_data(cfg.data, dist)
        self.val_set = build_dataset(cfg.data, "val")
        self.train_set = None if eval_only else build_dataset(cfg.data, "train")
        if self.train_set is not None:
            check_same_categories(self.train_set, self.val_set)
        num_classes = cfg.model.num_classes or (self.train_set or self.val_set).num_classes
        self.class_names = list(self.val_set.cat_names)
        is_thing = getattr(self.val_set, "is_thing", None)  # panoptic sets: things vs stuff
        self.model = build_model(cfg.model, num_classes, is_thing).to(dist.device)
        # each label's category id: the rows an authors' class head gives (detr_sparse.official)
        self.categories = getattr(self.val_set, "label_to_cat_id", None)
        if cfg.model.weights:
            ckpt.load_model_weights(self.model, ckpt.load_checkpoint(cfg.model.weights), cfg.model.weights,
                                    strict=False, categories=self.categories)
        if not eval_only:
            warn_untrained_frozen_backbone(self.model, cfg.model)
        checkpoint_activations(self.model, list(cfg.train.activation_checkpointing))
        self.optimizer = build_optimizer(self.model, cfg.train, cfg.model.backbone.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        autocast(dist.device, cfg.train.amp), autocast(dist.device, cfg.eval.precision, "eval.precision")  # checked now
        if cfg.train.accumulate < 1:
            raise ConfigError(f"train.accumulate: {cfg.train.accumulate}, must be 1 or more batches per step")
        self.ema = self._new_ema()
        fp16 = cfg.train.amp == "fp16" and dist.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=fp16)
        self.state = TrainState()
        self.ddp = self.model
        if dist.world_size > 1 and not eval_only:
            self.ddp = wrap_ddp(self.model, dist.device, cfg.train.grad_compression)
        self.val_loader = make_loader(self.val_set, cfg.eval.batch_size, False,
                                      cfg.data.num_workers, cfg.train.seed, dist)
        if self.train_set is not None:
            self.train_loader = make_loader(self.train_set, cfg.train.batch_size, True,
                                            cfg.data.num_workers, cfg.train.seed, dist)
        self.run_logger = RunLogger(self.out, dist.is_main)
        if dist.is_main:
            save_config(cfg, self.out / "config.yaml")

    def _new_ema(self) -> AveragedModel | None:
        """The exponential moving average of the model's weights and buffers (train.ema, the
        decay per step), None when off; it starts from the weights as they are."""
        decay = self.cfg.train.ema
        return AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) if decay else None

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(),
                "optimizer": optimizer_state(self.optimizer, self.dist.is_main),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.state.epoch, "iteration": self.state.iteration,
                "step_in_epoch": self.state.step_in_epoch,
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                "classes": self.classes(),  # what detr_sparse.Predictor names the labels by
                "config": to_dict(self.cfg), "rng": all_gather_objects(ckpt.rng_state())}

    def classes(self) -> dict:
        """The dataset's classes in label order: names, category ids, which are things."""
        is_thing = getattr(self.val_set, "is_thing", None) or [True] * len(self.class_names)
        return {"names": list(self.class_names), "category_ids": list(self.categories), "is_thing": list(is_thing)}

    def save(self) -> None:
        state = self.state_dict()  # every rank joins the RNG gather
        if self.dist.is_main:
            path = ckpt.save_numbered(state, self.out, self.state.iteration,
                                      self.cfg.train.keep_checkpoints)
            save_config(self.cfg, self.out / "config.yaml")
            log.info("saved %s (epoch %d, iteration %d)", path, self.state.epoch, self.state.iteration)
        barrier()

    def resume_latest(self, weights_only: bool = False) -> bool:
        """Resume from the newest readable checkpoint of output_dir; False when there is none."""
        found = ckpt.load_latest(self.out)
        if found is not None:
            self.resume(*found, weights_only=weights_only)
        return found is not None

    def resume(self, path: str | Path, state: dict | None = None, weights_only: bool = False) -> None:
        state = state if state is not None else ckpt.load_checkpoint(path)
        # evaluation reads the authors' checkpoints too; a run resumes from its own only
        ckpt.load_model_weights(self.model, state, str(path), categories=self.categories,
                                allow_official=weights_only)
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:  # a run that turns the average on: it starts from the weights as they are
                log.warning("%s: no weight average saved: the average starts from its weights", path)
                self.ema = self._new_ema()
        if weights_only:  # evaluation: logged, and its files named, at the checkpoint's epoch and iteration
            if "iteration" in state:  # a detr_sparse training checkpoint
                self.state = TrainState(state["epoch"], state["iteration"])
            return
        if "optimizer" not in state:
            raise ckpt.CheckpointError(f"checkpoint {path}: model weights only (no optimizer state), nothing "
                                       f"to resume: evaluate it with --eval, or start a run from it with "
                                       f"model.weights={path}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(state["epoch"], state["iteration"], state.get("step_in_epoch", 0))
        rngs = state.get("rng", [])
        if len(rngs) == self.dist.world_size:
            ckpt.set_rng_state(rngs[self.dist.rank])
        else:
            log.warning("%s: saved with %d processes, running with %d: RNG states not restored",
                        path, len(rngs), self.dist.world_size)
        log.info("resumed from %s at epoch %d (step %d), iteration %d", path, self.state.epoch,
                 self.state.step_in_epoch, self.state.iteration)

    # ----------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        model = self.model if self.ema is None else self.ema.module  # the averaged weights when kept
        evaluators = build_evaluators(model, self.val_set)
        shown, sparsity = [], []
        count = self.cfg.eval.num_vis_images
        sparse = has_sparsity_pictures(model)  # pictures of its token maps / granularities too

        def show(images, targets, predictions):
            for img, tgt, pred in zip(images.tensors, targets, predictions):
                if len(shown) < count:
                    h, w = tgt["size"].tolist()
                    shown.append(draw_detections(denormalize(img[:, :h, :w].cpu()), pred,
                                                 self.class_names, self.cfg.eval.vis_score_threshold, tgt))
            if sparse and len(sparsity) < count:  # the first few images (token maps: a second pass)
                sparsity.extend(sparsity_pictures(model, images, count - len(sparsity), ran=True))

        stats = evaluate(model, self.val_loader, evaluators, self.dist.device,
                         self.cfg.eval.precision, self.dist.is_main, show if self.dist.is_main else None)
        flat = {f"{iou}_{k}": v for iou, d in stats.items() for k, v in d.items()}
        self.run_logger.scalars("val", flat, self.state.iteration, epoch=self.state.epoch)
        for i, image in enumerate(shown):
            self.run_logger.image(f"val/prediction_{i}", image, self.state.iteration)
        for i, image in enumerate(sparsity):
            self.run_logger.image(f"val/sparsity_{i}", image, self.state.iteration)
        log.info("eval at epoch %d: %s", self.state.epoch, json.dumps(stats))
        if self.dist.is_main:  # the ranks' results are gathered by now
            write_eval_outputs(self.out, self.state.epoch, evaluators)
        return stats

    # ----------------------------------------------------------------- training
    def train(self) -> dict:
        cfg = self.cfg.train
        stats = {}
        while self.state.epoch < cfg.epochs:
            if cfg.max_iters and self.state.iteration >= cfg.max_iters:
                break
            means = self.train_epoch(self._after_step)
            self.run_logger.scalars("train_epoch", means, self.state.iteration, epoch=self.state.epoch)
            self.scheduler.step()
            self.state.epoch += 1
            self.state.step_in_epoch = 0
            last = self.state.epoch >= cfg.epochs or (cfg.max_iters and self.state.iteration >= cfg.max_iters)
            if last or self.state.epoch % cfg.checkpoint_every == 0:
                self.save()
            if last or self.state.epoch % cfg.eval_every == 0:
                stats = self.evaluate()
        return stats

    def train_epoch(self, after_step=None) -> dict[str, float]:
        """Run the current epoch from where it stands (a resumed one skips its done steps);
        the caller advances the epoch."""
        sampler = self.train_loader.sampler
        sampler.set_epoch(self.state.epoch)
        sampler.start = self.state.step_in_epoch * self.cfg.train.batch_size * self.cfg.train.accumulate
        self.train_set.set_epoch(self.state.epoch)
        return train_one_epoch(self.ddp, self.train_loader, self.optimizer, self.scaler, self.cfg.train,
                               self.state, self.run_logger, self.dist.device, self.dist.is_main, after_step,
                               self.total_iters())

    def total_iters(self) -> int:
        """The run's optimizer steps: train.max_iters, else epochs x steps per epoch."""
        t = self.cfg.train
        return t.max_iters or t.epochs * (len(self.train_loader) // t.accumulate)

    def _after_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        every = self.cfg.train.checkpoint_every_iters
        if every and self.state.iteration % every == 0:
            self.save()

    def close(self) -> None:
        self.run_logger.close()
