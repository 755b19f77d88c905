"""One training epoch and one evaluation pass; the loop around them is in engine/trainer.py."""
from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .config import ConfigError
from .distributed import reduce_mean

log = logging.getLogger("detr_sparse.train")


class NonFiniteLossError(FloatingPointError):
    pass


@dataclass
class TrainState:
    epoch: int = 0  # the epoch to run next (or to finish, when step_in_epoch > 0)
    iteration: int = 0  # optimizer steps done so far
    step_in_epoch: int = 0  # steps of `epoch` already done (a checkpoint taken mid-epoch)


def autocast(device: torch.device, amp: str, key: str = "train.amp"):
    """bf16 on CPU or CUDA, fp16 on CUDA only; "none" / "fp32" run in fp32. `key`: the
    config key the mode came from, named in the error."""
    if amp in ("none", "fp32"):
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        raise ConfigError(f"{key}: unknown mode '{amp}' (none or fp32 | bf16 | fp16)")
    if dtype is torch.float16 and device.type != "cuda":
        raise ConfigError(f"{key}: fp16 needs CUDA; use bf16 on the CPU")
    return torch.autocast(device.type, dtype=dtype)


def to_device(images, targets, device):
    images = images.to(device, non_blocking=True)
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in t.items()} for t in targets]
    return images, targets


@contextmanager
def progress(iterable, desc: str, enabled: bool):
    """A progress bar over `iterable` only on a terminal (a log file gets the periodic log
    lines instead, never bar fragments); while it is drawn, the console's log lines go
    through tqdm, which writes them above the bar instead of through it."""
    if not (enabled and sys.stderr.isatty()):
        yield iterable
        return
    with tqdm(iterable, desc=desc, dynamic_ncols=True, mininterval=0.5) as bar, \
            logging_redirect_tqdm([logging.getLogger("detr_sparse")]):
        yield bar


def train_one_epoch(model, loader, optimizer, scaler, train_cfg, state: TrainState, run_logger,
                    device, show_progress: bool = True, after_step=None, total_iters: int = 0) -> dict[str, float]:
    """Runs until the loader ends or train_cfg.max_iters steps are done, one optimizer step
    every train_cfg.accumulate batches, calling `after_step()` after each step. total_iters:
    the run's optimizer steps (the cosine schedule's length). Returns the mean of every logged
    value over the steps run. Raises NonFiniteLossError, naming the iteration and the loss
    terms, before the optimizer applies a non-finite loss."""
    model.train()
    sums: dict[str, float] = {}
    steps, group = 0, []
    tic = time.perf_counter()
    with progress(loader, f"epoch {state.epoch}", show_progress) as batches:
        for batch in batches:
            if train_cfg.max_iters and state.iteration >= train_cfg.max_iters:
                break
            group.append(batch)
            if len(group) < train_cfg.accumulate:
                continue
            stats = _train_step(model, group, optimizer, scaler, train_cfg, state, device, total_iters)
            group = []
            toc = time.perf_counter()
            stats["iter_time"], tic = toc - tic, toc
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            if state.iteration % train_cfg.log_every == 0:
                run_logger.scalars("train", stats, state.iteration, epoch=state.epoch)
                log.info("epoch %d iter %d loss %.4f (%.2fs/it)", state.epoch, state.iteration,
                         stats["loss"], stats["iter_time"])
            if after_step is not None:
                after_step()
    return {k: v / max(steps, 1) for k, v in sums.items()}


def warmup_factor(iteration: int, warmup_iters: int, ratio: float) -> float:
    """The linear warm-up's multiplier of the scheduled learning rate at an iteration
    (counted from 0): from `ratio` up to 1 over `warmup_iters` steps, then 1 (mmcv's linear
    warm-up)."""
    if iteration >= warmup_iters:
        return 1.0
    return 1.0 - (1.0 - iteration / warmup_iters) * (1.0 - ratio)


def lr_factor(iteration: int, total_iters: int, train_cfg) -> float:
    """The multiplier of the epoch schedule's learning rate at an optimizer step (from 0):
    the warm-up's, times the cosine schedule's (train.lr_schedule: cosine) from 1 down to
    min_lr_ratio at total_iters."""
    factor = warmup_factor(iteration, train_cfg.warmup_iters, train_cfg.warmup_ratio)
    if train_cfg.lr_schedule == "cosine" and total_iters > 0:
        done = min(iteration / total_iters, 1.0)
        factor *= train_cfg.min_lr_ratio + (1 - train_cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))
    return factor


@contextmanager
def warmed_up(optimizer, factor: float):
    """Every group's learning rate times `factor` inside the block, as scheduled after it:
    the warm-up depends on the iteration alone, so resuming and the epoch scheduler are
    untouched."""
    if factor == 1.0:
        yield
        return
    scheduled = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, scheduled):
        group["lr"] = lr * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, scheduled):
            group["lr"] = lr


def _train_step(model, batches: list, optimizer, scaler, train_cfg, state: TrainState, device,
                total_iters: int = 0) -> dict:
    """One optimizer step over `batches` [(images, targets), ...] (gradients accumulated, the
    losses averaged; under DDP the gradients are synchronised on the last one only); returns
    the rank-averaged losses and statistics, averaged over the batches."""
    optimizer.zero_grad(set_to_none=True)
    stats: dict[str, float] = {}
    for i, (images, targets) in enumerate(batches):
        images, targets = to_device(images, targets, device)
        last = i == len(batches) - 1
        with (nullcontext() if last else getattr(model, "no_sync", nullcontext)()):
            with autocast(device, train_cfg.amp):
                outputs = model(images, targets)
            loss = sum(v for k, v in outputs.items() if k.startswith("loss"))
            # one collective gives every rank the same values, so all stop together on a bad loss
            batch_stats = reduce_mean({**outputs, "loss": loss})
            if not math.isfinite(batch_stats["loss"]):
                terms = ", ".join(f"{k}={v:.4g}" for k, v in batch_stats.items() if k.startswith("loss"))
                raise NonFiniteLossError(f"non-finite loss at epoch {state.epoch}, iteration "
                                         f"{state.iteration}: {terms}")
            scaler.scale(loss / len(batches)).backward()
        for k, v in batch_stats.items():
            stats[k] = stats.get(k, 0.0) + v / len(batches)
    if train_cfg.clip_max_norm > 0:
        scaler.unscale_(optimizer)
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.clip_max_norm))
    with warmed_up(optimizer, lr_factor(state.iteration, total_iters, train_cfg)):
        stats["lr"] = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
    scaler.update()
    state.iteration += 1
    state.step_in_epoch += 1
    return stats


@torch.no_grad()
def evaluate(model, loader, evaluators, device, precision: str = "fp32", show_progress: bool = True,
             on_batch=None) -> dict:
    """Evaluation over `loader` with one evaluator or a list of them (COCO boxes, PQ), in
    `precision` (eval.precision); `on_batch(images, targets, predictions)` sees every batch
    (visualisation). Returns the evaluators' summarize() merged (the same on every rank)."""
    evaluators = evaluators if isinstance(evaluators, (list, tuple)) else [evaluators]
    model.eval()
    with progress(loader, "eval", show_progress) as batches:
        for images, targets in batches:
            images, targets = to_device(images, targets, device)
            with autocast(device, precision, "eval.precision"):
                predictions = model(images)
            predictions = [{k: to_cpu(v) for k, v in p.items()} for p in predictions]
            targets = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            for evaluator in evaluators:
                evaluator.update(predictions, targets)
            if on_batch is not None:
                on_batch(images, targets, predictions)
    stats = {}
    for evaluator in evaluators:
        evaluator.gather()
        stats.update(evaluator.summarize())
    return stats


def to_cpu(value):
    """A prediction value on the CPU, floats as fp32 (bf16 evaluation); other values as they are."""
    if not torch.is_tensor(value):
        return value
    return (value.float() if value.is_floating_point() else value).cpu()
