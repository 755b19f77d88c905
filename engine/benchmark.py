"""FLOPs by model part, latency and peak memory of one forward pass.

GFLOPs follow the detection literature (DETR, Deformable DETR, fvcore): one multiply-add
counts as one operation. torch's FlopCounterMode counts two, so its totals are halved here."""
from __future__ import annotations

import statistics
import threading
import time
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from .memory import allocated_bytes

aten = torch.ops.aten


def _register_cpu_attention_flops() -> None:
    """The CPU flash-attention kernel behind scaled_dot_product_attention has no formula
    in torch's counter; without one the attention matmuls of every transformer vanish."""
    op = aten._scaled_dot_product_flash_attention_for_cpu
    if op in torch.utils.flop_counter.flop_registry:
        return

    @register_flop_formula(op)
    def _flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_attention_flops()


class FlopCount(NamedTuple):
    """GFLOPs of one forward pass: in total, by model part (with the remainder as "other")
    and by operator (e.g. "aten.convolution", "detr_sparse.msda_forward")."""
    total: float
    by_part: dict[str, float]
    by_op: dict[str, float]


@torch.no_grad()
def count_flops(model: torch.nn.Module, inputs, parts: dict[str, str] | None = None) -> FlopCount:
    """Run model(inputs) once under the counter; `parts` maps a part name to a module-name
    prefix."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(inputs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    total = counter.get_total_flops() / 2e9
    by_part = {}
    for part, prefix in (parts or {}).items():
        by_part[part] = _module_flops(counts, f"{root}.{prefix}") / 2e9
    if by_part:
        by_part["other"] = total - sum(by_part.values())
    by_op = {str(op): n / 2e9 for op, n in counts.get("Global", {}).items()}
    return FlopCount(total, by_part, by_op)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters by part (model.parts: name -> module-name prefix; the rest is "other"),
    with "trainable" and "total"."""
    counts = {part: 0 for part in getattr(model, "parts", {})}
    counts["other"] = 0
    for name, p in model.named_parameters():
        part = next((k for k, prefix in getattr(model, "parts", {}).items() if name.startswith(prefix + ".")), "other")
        counts[part] += p.numel()
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def _module_flops(counts: dict, name: str) -> int:
    """FLOPs under module `name`; a container that is never called itself (ModuleList) is
    the sum of its direct children."""
    if name in counts:
        return sum(counts[name].values())
    depth = name.count(".") + 1
    return sum(sum(c.values()) for key, c in counts.items()
               if key.startswith(name + ".") and key.count(".") == depth)


def time_call(fn, runs: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of fn() after `warmup` untimed calls."""
    return time_calls([fn], runs, warmup)[0]


def time_calls(fns, runs: int = 3, warmup: int = 1) -> list[float]:
    """Median wall-clock seconds of each of fns, timed in turns (one call of each per round,
    after `warmup` untimed rounds), so a machine slowing down or speeding up during the
    measurement moves them all alike: for ratios between things timed in one process."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, mine in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            mine.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def measure_latency(model: torch.nn.Module, inputs, runs: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of model(inputs) after `warmup` untimed runs."""
    return time_call(lambda: model(inputs), runs, warmup)


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose "mb" is, on exit, the peak memory above the level at entry:
    allocator statistics on CUDA, the bytes in use (engine.memory) sampled every 2 ms on
    the CPU."""
    result = {"mb": 0.0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        result["mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    base = allocated_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], allocated_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["mb"] = (max(peak[0], allocated_bytes()) - base) / 2**20


def train_images_per_second(trainer, iters: int, warmup: int) -> float:
    """This process's training throughput: images per second over `iters` optimizer steps
    after `warmup` untimed ones (the config's train.max_iters must allow warmup + iters)."""
    stamps: list[float] = []
    cfg = trainer.cfg.train
    if cfg.max_iters < warmup + iters:
        raise ValueError(f"train.max_iters={cfg.max_iters} < warmup + iters = {warmup + iters}")
    while trainer.state.iteration < warmup + iters:
        trainer.train_epoch(lambda: stamps.append(time.perf_counter()))
        trainer.state.epoch += 1
        trainer.state.step_in_epoch = 0
    return iters * cfg.batch_size / (stamps[warmup + iters - 1] - stamps[warmup - 1])
