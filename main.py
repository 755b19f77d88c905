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

from engine.config import ConfigError, load_config
from engine.distributed import cleanup, init_distributed
from engine.logger import setup_logging
from engine.memory import reuse_freed_memory
from engine.trainer import Trainer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--eval", action="store_true", help="only evaluate (the --resume checkpoint)")
    p.add_argument("--resume", default="", help="checkpoint to resume from; default: the last "
                   "checkpoint in the output folder, if any")
    p.add_argument("--output-dir", default="", help="overrides output_dir of the config")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. model.num_queries=50 train.lr=2e-4")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    reuse_freed_memory()
    overrides = list(args.opts) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    dist = init_distributed(cfg.device)
    log = setup_logging(cfg.output_dir, dist.is_main)
    log.info("world size %d (%d per node), device %s", dist.world_size,
             int(os.environ.get("LOCAL_WORLD_SIZE", 1)), dist.device)
    try:
        trainer = Trainer(cfg, dist, eval_only=args.eval)
        if args.resume:
            trainer.resume(args.resume, weights_only=args.eval)
        elif not trainer.resume_latest(weights_only=args.eval) and args.eval:
            log.warning("--eval without a checkpoint: evaluating randomly initialised weights")
        stats = trainer.evaluate() if args.eval else trainer.train()
        trainer.close()
        return stats
    finally:
        cleanup()


if __name__ == "__main__":
    logging.captureWarnings(True)
    main()
