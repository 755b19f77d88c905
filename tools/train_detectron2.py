"""Train or evaluate a detectron2 LazyConfig (configs/detectron2/*.py: the project's
backbones, sparse ones included, in detectron2's Mask R-CNN and Panoptic FPN), with
detectron2's training loop, COCO / panoptic evaluators and checkpoints. Needs detectron2
(`DETECTRON2=1 bash launch.sh --setup`).

    python tools/train_detectron2.py --config-file configs/detectron2/mask_rcnn_r18_synthetic.py
    python tools/train_detectron2.py --config-file ... --num-gpus 2        # 2 processes (gloo on a CPU)
    torchrun --nproc-per-node 2 tools/train_detectron2.py --config-file ... # or torchrun, any number of nodes
    python tools/train_detectron2.py --config-file ... --resume            # from output_dir's last checkpoint
    python tools/train_detectron2.py --config-file ... --eval-only train.init_checkpoint=out/.../model_final.pth
    ... train.max_iter=100 train.output_dir=out/x                           # LazyConfig overrides

A config's `data` (the project's data section) names the COCO-layout folder: a synthetic set
is generated first when missing (rank 0), then every split is registered on every rank.
Checkpoints are written atomically (a crash leaves the previous one whole).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (AMPTrainer, SimpleTrainer, default_argument_parser, default_setup, default_writers,
                               hooks, launch)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.checkpoint import save_checkpoint  # noqa: E402
from engine.distributed import DistInfo, resolve_device  # noqa: E402
from engine.trainer import ensure_synthetic_data  # noqa: E402
from detr_sparse.integrations.detectron2 import register_coco_folder  # noqa: E402

log = logging.getLogger("detectron2")


class AtomicCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, writing each file (and the last_checkpoint tag) whole or not
    at all."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), **{k: v.state_dict() for k, v in self.checkpointables.items()},
                **kwargs}
        path = save_checkpoint(data, Path(self.save_dir) / f"{name}.pth")
        self.logger.info("Saving checkpoint to %s", path)
        self.tag_last_checkpoint(path.name)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.save_dir, prefix="last_checkpoint.")
        with os.fdopen(fd, "w") as f:
            f.write(last_filename_basename)
        os.replace(tmp, Path(self.save_dir) / "last_checkpoint")


def prepare_data(data_cfg) -> None:
    """Generate a synthetic set on rank 0 when missing, then register the folder everywhere."""
    ensure_synthetic_data(data_cfg, DistInfo(comm.get_rank(), comm.get_world_size(), comm.get_local_rank()))
    register_coco_folder(data_cfg.root, (data_cfg.train_split, data_cfg.val_split), data_cfg.name)


def evaluate(cfg, model) -> dict:
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def device_of(cfg) -> torch.device:
    return resolve_device(cfg.train.device, comm.get_local_rank())


def train(args, cfg) -> None:
    device = device_of(cfg)
    model = instantiate(cfg.model).to(device)
    log.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, device_ids=[device.index] if device.type == "cuda" else None, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, loader, optimizer)
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: evaluate(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start, cfg.train.max_iter)


def main(args) -> None:
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    default_setup(cfg, args)
    if device_of(cfg).type == "cpu":  # one core slice per process
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    prepare_data(cfg.data)
    if not args.eval_only:
        return train(args, cfg)
    model = instantiate(cfg.model).to(device_of(cfg))
    AtomicCheckpointer(model).load(cfg.train.init_checkpoint)
    evaluate(cfg, model)


def run(args) -> None:
    """Under torchrun (WORLD_SIZE in the environment) join its process group; otherwise
    detectron2's launch starts --num-gpus processes per machine (NCCL on GPUs, gloo else)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and "LOCAL_RANK" in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
        comm.create_local_process_group(int(os.environ["LOCAL_WORLD_SIZE"]))
        main(args)
        dist.barrier()
        dist.destroy_process_group()
        return
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    run(default_argument_parser().parse_args())
