"""Optimizer and schedule: AdamW with a backbone learning rate (0 freezes it), optional
per-name multipliers and parameters without weight decay, optionally sharded over the ranks
(fairscale OSS); a step schedule over epochs (the warm-up over iterations is in engine/train.py)."""
from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError


def param_groups(model: nn.Module, lr: float, backbone_lr: float, weight_decay: float,
                 lr_multipliers: dict[str, float] | None = None, no_decay: list[str] | None = None,
                 backbone_prefix: str = "backbone.") -> list[dict]:
    """One group per distinct (learning rate, weight decay); the backbone's parameters are
    those whose name starts with `backbone_prefix` and train at `backbone_lr`, the others at
    `lr`. A parameter whose name contains a key of `lr_multipliers` (e.g. "sampling_offsets":
    0.1; "gate": 10 for the SViT gates of a backbone) gets its learning rate times that
    factor; one whose name contains a string of `no_decay` (e.g. "bias") gets no weight decay."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(backbone_prefix) and backbone_lr <= 0:
            p.requires_grad_(False)
            continue
        p_lr = backbone_lr if name.startswith(backbone_prefix) else lr
        for key, factor in (lr_multipliers or {}).items():
            if key in name:
                p_lr = p_lr * factor
        decay = 0.0 if any(key in name for key in no_decay or ()) else weight_decay
        groups.setdefault((p_lr, decay), []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": decay} for (g_lr, decay), ps in groups.items()]


def build_optimizer(model: nn.Module, train_cfg, backbone_lr: float) -> torch.optim.Optimizer:
    """AdamW; with train_cfg.shard_optimizer each rank keeps the optimizer state of its share
    of the parameters only (ZeRO stage 1) and broadcasts them after its step."""
    groups = param_groups(model, train_cfg.lr, backbone_lr, train_cfg.weight_decay,
                          dict(train_cfg.lr_multipliers), list(train_cfg.no_decay))
    if train_cfg.shard_optimizer and torch.distributed.is_initialized():  # one process: no shards
        from fairscale.optim import OSS

        return OSS(groups, optim=torch.optim.AdamW, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def optimizer_state(optimizer: torch.optim.Optimizer, is_main: bool) -> dict:
    """The full optimizer state for a checkpoint (on the main rank; {} elsewhere). A sharded
    optimizer first gathers its shards, which every rank must join."""
    if hasattr(optimizer, "consolidate_state_dict"):
        optimizer.consolidate_state_dict(recipient_rank=0)
        return optimizer.state_dict() if is_main else {}
    return optimizer.state_dict()


def build_scheduler(optimizer, train_cfg):
    """The per-epoch step schedule (lr_drops); a cosine schedule has no drops (its factor is
    applied per iteration, engine.train.lr_factor)."""
    if train_cfg.lr_schedule not in ("step", "cosine"):
        raise ConfigError(f"train.lr_schedule: unknown schedule '{train_cfg.lr_schedule}' (step | cosine)")
    drops = list(train_cfg.lr_drops) if train_cfg.lr_schedule == "step" else []
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=drops, gamma=0.1)
