"""Model wrappers for many processes and little memory: DistributedDataParallel, and
activation checkpointing through fairscale (the sharded optimizer lives in engine/optim.py)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def wrap_ddp(model: torch.nn.Module, device: torch.device, grad_compression: str = "none"):
    """DDP whose gradients are reduced in place in their buckets (no extra copy). Buffers are
    broadcast from rank 0 before each forward only when training changes them (batch norm
    statistics); "bf16" / "fp16" halve the bytes of the gradient all-reduce."""
    trained_buffers = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                          for m in model.modules())
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  broadcast_buffers=trained_buffers, gradient_as_bucket_view=True)
    if grad_compression != "none":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hooks = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}
        if grad_compression not in hooks:
            raise ValueError(f"train.grad_compression: unknown '{grad_compression}' (none | bf16 | fp16)")
        ddp.register_comm_hook(None, hooks[grad_compression])
    return ddp


def checkpoint_activations(model: nn.Module, parts: list[str]) -> None:
    """Recompute the activations of `parts` ("backbone", "encoder", "decoder", as named in
    model.parts) in the backward pass instead of storing them: each block (backbone stage,
    transformer layer) is wrapped with fairscale's checkpoint_wrapper."""
    if not parts:
        return
    from fairscale.nn.checkpoint import checkpoint_wrapper

    for part in parts:
        if part not in model.parts:
            raise ValueError(f"train.activation_checkpointing: unknown part '{part}' "
                             f"({' | '.join(model.parts)})")
        module = model.get_submodule(model.parts[part])
        blocks = module.stages if hasattr(module, "stages") else module
        for block in blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks:
            checkpoint_wrapper(block)
