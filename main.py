"""Train or evaluate a detector. Runs as one process or under torchrun:

    python main.py --config configs/quickstart.yaml
    torchrun --nproc-per-node 2 main.py --config configs/detr_r50.yaml --opts train.batch_size=4
    python main.py --config X.yaml --eval --resume out/x/checkpoint.pth
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from engine.checkpoint import CheckpointError
from engine.config import ConfigError, load_config
from engine.distributed import barrier, broadcast_object, cleanup, init_distributed
from engine.logger import setup_logging
from engine.memory import reuse_freed_memory
from engine.run_guard import OutputInUseError, OutputLock, exit_with_agent
from engine.trainer import Trainer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--eval", action="store_true", help="only evaluate (the --resume checkpoint)")
    p.add_argument("--resume", default="", help="checkpoint to resume from; default: the last "
                   "checkpoint in the output folder, if any")
    p.add_argument("--output-dir", default="", help="overrides output_dir of the config")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and the model's "
                   "parameters by part, then exit (a dry run: no data read, nothing written)")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. model.num_queries=50 train.lr=2e-4")
    return p.parse_args(argv)


# errors a user can act on: they end the run with one line naming the file, key or folder
USER_ERRORS = (ConfigError, CheckpointError, OutputInUseError)


def fail(message: str) -> None:
    """End with one line on stderr; under launch.sh it is also the console's last line."""
    error_file = os.environ.get("DETR_SPARSE_ERROR_FILE")
    if error_file:
        with open(error_file, "a") as f:
            f.write(message + "\n")
    sys.exit(message)


def lock_output(output_dir: str, dist) -> OutputLock | None:
    """Training: rank 0 locks output_dir; every rank stops when another live run holds it."""
    lock, error = None, None
    if dist.is_main:
        try:
            lock = OutputLock(output_dir)
        except OutputInUseError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise OutputInUseError(error)
    return lock


def print_config(cfg) -> dict[str, int]:
    """The resolved config as YAML, then the model's parameters by part (millions); the class
    count is the config's, or COCO's 91 when the data gives it (not read here)."""
    from omegaconf import OmegaConf

    from engine.benchmark import parameter_counts
    from engine.checkpoint import build_eval_model

    print(OmegaConf.to_yaml(cfg), end="")
    shapes_only = OmegaConf.merge(cfg.model, {"backbone": {"pretrained": ""}})  # counting needs no weights file
    model = build_eval_model(shapes_only, cfg.model.num_classes or 91, "", "cpu")
    counts = parameter_counts(model)
    classes = f"{cfg.model.num_classes} classes" if cfg.model.num_classes else "91 classes (the data's count at training)"
    print(f"# {cfg.model.name}, {classes}: parameters (M) " +
          ", ".join(f"{part} {n / 1e6:.2f}" for part, n in counts.items()))
    return counts


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.print_config:
        try:
            return print_config(load_config(args.config, args.opts))
        except USER_ERRORS as e:
            fail(f"error: {e}")
    exit_with_agent()
    reuse_freed_memory()
    overrides = list(args.opts) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    lock = None
    try:
        cfg = load_config(args.config, overrides)
        dist = init_distributed(cfg.device)
        log = setup_logging(cfg.output_dir, dist.is_main)
        # evaluation writes no checkpoint: it may run beside the training of the same folder
        lock = None if args.eval else lock_output(cfg.output_dir, dist)
        log.info("world size %d (%d per node), device %s", dist.world_size,
                 int(os.environ.get("LOCAL_WORLD_SIZE", 1)), dist.device)
        trainer = Trainer(cfg, dist, eval_only=args.eval)
        if args.resume:
            trainer.resume(args.resume, weights_only=args.eval)
        elif not trainer.resume_latest(weights_only=args.eval) and args.eval:
            log.warning("--eval without a checkpoint: evaluating randomly initialised weights")
        stats = trainer.evaluate() if args.eval else trainer.train()
        trainer.close()
        # no rank leaves before all are done: rank 0's process hosts the store the others use
        barrier()
        return stats
    except USER_ERRORS as e:
        fail(f"error: {e}")
    finally:
        if lock is not None:
            lock.release()
        cleanup()


if __name__ == "__main__":
    logging.captureWarnings(True)
    main()
